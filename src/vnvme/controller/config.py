"""Controller configuration: one frozen dataclass, every knob documented where it is defined."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class SqEventIdxPolicy(StrEnum):
    """What the controller publishes as an SQ's EventIdx (when to ask for a tail doorbell)."""

    #: Event-driven: after each pass EventIdx = the tail just consumed, then a full fence and a
    #: re-read of the shadow tail to close the race (QEMU, SPDK). The host rings once per batch
    #: it submits while the controller is idle.
    EAGER = "eager"
    #: The controller is polling the shadow tails: EventIdx is kept where the host can never
    #: cross it (one slot behind the head), so it never rings. Before the edge stops polling it
    #: calls :meth:`Controller.rearm`, which switches to EAGER values and re-checks. An edge
    #: that serves a doorbell without polling (its poll window shut) gets ADAPTIVE's EventIdx.
    POLL = "poll"
    #: Event-driven, and ahead of the host: when an SQ goes idle after consuming a burst of k
    #: commands, EventIdx = head + k - 1, so a host in a closed loop (k completions reaped, k
    #: new commands placed one at a time) rings once, for the last of them, instead of for
    #: the first. Should the host place fewer, the controller looks at the shadow tail anyway
    #: after ``batch_timeout``: a wrong guess costs that much latency, never a stall. A burst
    #: of 1 publishes exactly what EAGER does. If the controller then finds commands the host
    #: placed without ringing (a host slower than the timeout, e.g. a guest under emulation),
    #: the host is still working towards the prediction: it is kept, and the controller looks
    #: again after the next timeout; the first look that finds nothing publishes exactly.
    BATCH = "batch"
    #: Event-driven, learning per SQ how the host places commands: BATCH's prediction, sized by
    #: a window that grows while the host fills it and shrinks to what it placed when it does
    #: not, and a wait sized by the host's own pace (a weighted average of the time it takes per
    #: command to reach a prediction) between ``batch_timeout`` and ``max_batch_wait``. A host
    #: whose bursts are all 1 (one vCPU that takes every interrupt) is offered a larger batch
    #: now and then, less often after each offer it could not fill.
    ADAPTIVE = "adaptive"


class CqEventIdxPolicy(StrEnum):
    """What the controller publishes as a CQ's EventIdx (when to ask for a head doorbell)."""

    #: The controller reads the shadow head whenever it needs room, and asks for a doorbell only
    #: while it is blocked on a full CQ. Zero CQ doorbells in steady state; never stalls.
    NEVER = "never"
    #: EventIdx = the head last read, refreshed on every completion pass (QEMU since fa5db2aa):
    #: the host rings once per completion batch.
    EAGER = "eager"


@dataclass(frozen=True)
class ControllerConfig:
    # Identity (Identify Controller).
    pci_vendor_id: int = 0x4E56
    pci_subsystem_vendor_id: int = 0x4E56
    serial: str = "VNVME0001"
    model: str = "vnvme shadow doorbell controller"
    firmware: str = "0.1.0"
    #: CAP.MQES + 1: the largest I/O queue the host may create.
    max_queue_entries: int = 1024
    #: I/O submission / completion queues the controller can allocate (Number of Queues).
    max_io_queues: int = 64
    #: Interrupt vectors (MSI-X table size): vector 0 for the admin CQ, the rest for I/O CQs.
    interrupt_vectors: int = 65
    #: CAP.DSTRD: doorbell stride 4 << dstrd bytes.
    dstrd: int = 0
    #: CAP.TO in 500 ms units: how long the host waits for CSTS.RDY.
    timeout_500ms: int = 20
    #: Identify MDTS: largest transfer 2^mdts pages of CAP.MPSMIN.
    mdts: int = 7
    #: Memory page sizes the controller accepts in CC.MPS: 2^(12 + n).
    mps_min: int = 0
    mps_max: int = 4
    #: Advertise Doorbell Buffer Config (OACS bit 8). Off: the command is an invalid opcode.
    shadow_doorbells: bool = True
    sq_eventidx: SqEventIdxPolicy = SqEventIdxPolicy.EAGER
    #: With SQ policy BATCH: how long (seconds of ``now``) a predicted EventIdx may go unreached
    #: before the controller reads the shadow tail by itself.
    batch_timeout: float = 100e-6
    #: With SQ policy ADAPTIVE: the longest it waits for a prediction (a guest under emulation
    #: places a command every few hundred microseconds).
    max_batch_wait: float = 2e-3
    cq_eventidx: CqEventIdxPolicy = CqEventIdxPolicy.NEVER
    #: Let the admin queue follow its shadow slots after Doorbell Buffer Config, as the spec
    #: allows. Linux and SPDK hosts keep ringing MMIO for the admin queue; the controller notices
    #: (an MMIO value its shadow slot does not back) and makes MMIO authoritative for that queue.
    admin_queue_shadow: bool = True
    #: Write 0 to a queue's shadow slot when it is created while shadow doorbells are on, so a
    #: stale value from before a reset is never taken for a tail (SPDK's "garbage" note).
    zero_shadow_on_create: bool = True
    #: Rearm attempts before an SQ is left marked pending (lost races cost latency, not a hang).
    max_rearm_attempts: int = 3
    #: Commands taken from one SQ before moving to the next (round robin burst, §4.11): the
    #: Arbitration feature's default AB and Identify RAB, so a power of two in 1..64. The host
    #: may change it with Set Features Arbitration until the next reset.
    arbitration_burst: int = 64
    #: Advertise SGL support for NVM commands (Identify SGLS).
    sgls: bool = True
    #: NVM Subsystem Reset supported (CAP.NSSRS).
    nssr_supported: bool = True
    #: Composite temperature reported in SMART, Kelvin.
    temperature_kelvin: int = 313
    #: Error Information log entries kept (ELPE + 1).
    error_log_entries: int = 64
    #: Outstanding Asynchronous Event Requests allowed (AERL + 1).
    async_event_limit: int = 4
    #: Watch the host's side of the protocol and record every violation as a named rule
    #: (:mod:`vnvme.controller.hostcheck`; ``Controller.host_check``). Off: nothing is watched
    #: and the hot path runs exactly as without it.
    check_host: bool = False

    def __post_init__(self) -> None:
        if not 2 <= self.max_queue_entries <= 65536:
            raise ValueError("max_queue_entries must be in 2..65536")
        if not 1 <= self.max_io_queues <= 65535:
            raise ValueError("max_io_queues must be in 1..65535")
        if not 1 <= self.interrupt_vectors <= 2048:
            raise ValueError("interrupt_vectors must be in 1..2048 (MSI-X table size)")
        if not 0 <= self.dstrd <= 15:
            raise ValueError("dstrd must be in 0..15")
        if not 0 <= self.mps_min <= self.mps_max <= 15:
            raise ValueError("need 0 <= mps_min <= mps_max <= 15")
        if not 1 <= self.max_rearm_attempts <= 1000:
            raise ValueError("max_rearm_attempts must be in 1..1000")
        if not 0 < self.batch_timeout <= self.max_batch_wait:
            raise ValueError("need 0 < batch_timeout <= max_batch_wait")
        if self.arbitration_burst not in (1, 2, 4, 8, 16, 32, 64):
            raise ValueError("arbitration_burst must be a power of two in 1..64 (2^AB, AB < 7)")
        if not 1 <= self.async_event_limit <= 256 or not 1 <= self.error_log_entries <= 256:
            raise ValueError("async_event_limit and error_log_entries must be in 1..256")
        # Every queue's two slots must fit in one page of the smallest page size.
        dwords = (4096 << self.mps_min) // 4
        if ((2 * self.max_io_queues + 1) << self.dstrd) >= dwords and self.shadow_doorbells:
            raise ValueError("max_io_queues too large for one shadow doorbell page at this dstrd")
