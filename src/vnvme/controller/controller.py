"""The NVMe controller core: registers, queues, shadow doorbells, command dispatch.

Sans-I/O (the h11 / aioquic shape): the caller feeds register accesses and owns the guest memory
object; every public method returns the :mod:`effects <vnvme.effects>` it produced. No sockets,
threads or clocks in here: time (``now``) and work budgets are arguments.

Threading model: one controller is used from one thread at a time.

Processing model. A BAR doorbell write marks its SQ pending; :meth:`Controller.process` runs
pending SQs round robin, posts completions, then signals interrupts (one per CQ pass, after
coalescing). With shadow doorbells an SQ's tail is read from the shadow page (every slot access
goes through :class:`~vnvme.controller.doorbells.Doorbells`), and an idle SQ publishes EventIdx
as its policy says (:mod:`vnvme.controller.eventidx`, told of the moments named there).
A polling edge calls :meth:`Controller.poll` instead of waiting for doorbells, and
:meth:`Controller.rearm` before it stops polling.
"""

from __future__ import annotations

import dataclasses
import logging
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final

from vnvme.controller import admin, faults
from vnvme.controller.config import ControllerConfig
from vnvme.controller.doorbells import Doorbells
from vnvme.controller.errors import CommandFailed
from vnvme.controller.eventidx import CQ_POLICIES, SQ_POLICIES, CqEventIdx, SqPolicyFactory, overridden
from vnvme.controller.namespace import Namespace
from vnvme.controller.queues import CompletionQueue, QueueStatistics, SubmissionQueue
from vnvme.effects import ControllerFatal, Effect, RaiseInterrupt, TraceEvent
from vnvme.memory import GuestMemory, GuestMemoryError
from vnvme.spec import registers as regs
from vnvme.spec.commands import (
    CQE_SIZE,
    FLAGS_FUSE,
    SQE,
    SQE_SIZE,
    AsyncEventErrorInfo,
    AsyncEventSmartInfo,
    AsyncEventType,
    LogPageId,
    opcode_name,
)
from vnvme.spec.dbbuf import cq_slot, rearm_event_idx, sq_slot
from vnvme.spec.features import InterruptCoalescing
from vnvme.spec.log_pages import CriticalWarning
from vnvme.spec.registers import AQA, CAP, CC, CSTS, Reg, ShutdownStatus
from vnvme.spec.status import DNR, Status
from vnvme.trace import TRACE_EVENTS, matching_events

log = logging.getLogger("vnvme.controller")

_SQE_UNPACK: Final = SQE.unpack_from
# A CQE is stored as dwords 0-2 first, then dword 3 (CID + status with the phase tag) in one
# 32-bit store, so a host polling the phase tag never sees a half-written entry.
_CQE_HEAD_PACK: Final = struct.Struct("<IIHH").pack_into
# CQE dword 3 on big-endian hosts only; little-endian hosts store it through CompletionQueue.dwords.
_CQE_TAIL_PACK: Final = struct.Struct("<I").pack_into
_FUSE_MASK: Final = FLAGS_FUSE.mask
# Effects are immutable: one RaiseInterrupt per vector, made once.
_RAISE_CACHED: Final = 2048
_RAISE: Final = tuple(RaiseInterrupt(vector) for vector in range(_RAISE_CACHED))
_DEFAULT_BUDGET: Final = 4096
_ADMIN_QUEUE_MAX: Final = 4096


@dataclass(frozen=True)
class ControllerStatistics:
    #: Register (non-doorbell) reads and writes through BAR0.
    register_reads: int
    register_writes: int
    #: Trapped doorbell writes through BAR0, by kind.
    doorbell_sq_admin: int
    doorbell_sq_io: int
    doorbell_cq_admin: int
    doorbell_cq_io: int
    invalid_doorbell_writes: int
    #: Shadow doorbell page reads and EventIdx page writes.
    shadow_reads: int
    eventidx_writes: int
    rearms_won: int
    rearms_lost: int
    interrupts_raised: int
    completions_posted: int
    error_completions: int
    dbbuf_configs: int
    #: MMIO doorbell values that were ahead of their shadow slot (a host not keeping the slot).
    shadow_catchups: int
    #: Exceptions caught inside the controller: emulator bugs, zero in a healthy run.
    internal_errors: int
    #: Doorbell values taken from a doorbell page the host writes directly (mappable doorbells).
    mapped_doorbell_updates: int
    #: The SQ EventIdx policy's predictions met / missed and larger batches offered (ADAPTIVE).
    predictions_met: int = 0
    predictions_missed: int = 0
    batch_offers: int = 0
    admin_commands: dict[str, int] = field(default_factory=dict)
    io_commands: dict[str, int] = field(default_factory=dict)

    @property
    def doorbell_writes(self) -> int:
        return self.doorbell_sq_admin + self.doorbell_sq_io + self.doorbell_cq_admin + self.doorbell_cq_io

    @property
    def io_doorbell_writes(self) -> int:
        return self.doorbell_sq_io + self.doorbell_cq_io


@dataclass
class _Coalescing:
    count: int = 0
    since: float = 0.0


class Controller:
    """An NVMe 1.3 controller with Doorbell Buffer Config, over a :class:`GuestMemory`."""

    def __init__(
        self,
        memory: GuestMemory,
        namespaces: Sequence[Namespace] = (),
        config: ControllerConfig | None = None,
        *,
        sq_policy: SqPolicyFactory | None = None,
    ) -> None:
        """``sq_policy``: an SQ EventIdx policy class (or factory) instead of the one
        ``config.sq_eventidx`` names."""
        self.config = config or ControllerConfig()
        self.memory = memory
        self.namespaces: dict[int, Namespace] = {}
        for ns in namespaces:
            if ns.nsid in self.namespaces:
                raise ValueError(f"duplicate NSID {ns.nsid}")
            ns.assign_identifiers(self.config.serial)
            self.namespaces[ns.nsid] = ns
        # Identify NN: the largest NSID; the inactive ones in between read as zeroes.
        self.nn = max(self.namespaces, default=0)
        cfg = self.config
        self.cap = regs.compose(
            (CAP.MQES, cfg.max_queue_entries - 1),
            (CAP.CQR, 1),
            (CAP.TO, cfg.timeout_500ms),
            (CAP.DSTRD, cfg.dstrd),
            (CAP.NSSRS, int(cfg.nssr_supported)),
            (CAP.CSS, 1),  # NVM command set
            (CAP.MPSMIN, cfg.mps_min),
            (CAP.MPSMAX, cfg.mps_max),
        )
        self.dstrd = cfg.dstrd
        self.bar0_size = regs.bar0_size(cfg.max_io_queues + 1, cfg.dstrd)
        self._doorbell_end = regs.DOORBELL_BASE + 2 * (cfg.max_io_queues + 1) * (4 << cfg.dstrd)
        self.cc = 0
        self.csts = 0
        self.aqa = 0
        self.asq = 0
        self.acq = 0
        self.intms = 0
        self.page_size = 4096
        self.sqs: list[SubmissionQueue | None] = [None] * (cfg.max_io_queues + 1)
        self.cqs: list[CompletionQueue | None] = [None] * (cfg.max_io_queues + 1)
        self.doorbells = Doorbells()
        self._pending: dict[int, SubmissionQueue] = {}
        self._touched_cqs: dict[int, CompletionQueue] = {}
        self._coalescing: dict[int, _Coalescing] = {}
        self._masked_pending: set[int] = set()
        self._effects: list[Effect] = []
        self._tracing = False
        self._trace_set: frozenset[str] = frozenset()
        self._memory_generation = memory.generation
        # Set while some queue's or doorbell page's memory is not mapped (see _sync_memory),
        # with the Doorbell Buffer Config to restore once it is back.
        self._memory_missing: str | None = None
        self._dbbuf_wanted: tuple[bool, int, int, int] = (False, 0, 0, 0)
        self._fatal = False
        self._arbitration_burst = cfg.arbitration_burst
        self._set_policies(sq_policy or SQ_POLICIES[cfg.sq_eventidx], CQ_POLICIES[cfg.cq_eventidx])
        # SQs whose policy asked for a deadline (sq.deadline), by sqid.
        self._deadlines: dict[int, SubmissionQueue] = {}
        self._now = 0.0
        # Statistics counters.
        self._register_reads = 0
        self._register_writes = 0
        self._db_sq_admin = 0
        self._db_sq_io = 0
        self._db_cq_admin = 0
        self._db_cq_io = 0
        self._invalid_doorbells = 0
        self._rearms_won = 0
        self._rearms_lost = 0
        self._interrupts = 0
        self._vector_interrupts: dict[int, int] = {}  # by MSI-X vector, for queue_statistics()
        self._completions = 0
        self._error_completions = 0
        self._dbbuf_configs = 0
        self._internal_errors = 0
        self._mapped_doorbells = 0
        self._enable_count = 0
        self._admin_counts = [0] * 256
        self._io_counts = [0] * 256
        self.features = admin.FeatureState(self)
        self.async_events = admin.AsyncEvents(self)
        self.error_log = admin.ErrorLog(cfg.error_log_entries)
        self.smart = admin.SmartCounters()
        self.io_handlers = faults.io_handlers(self.namespaces.values())
        # Completions a fault hook delays (faults.py): deadlines for next_deadline() / process().
        self.delayed = faults.DelayedCompletions()
        self.admin_handlers = admin.admin_handlers(self)
        self.identify_controller = admin.identify_controller_data(self)
        # MDTS is in units of CAP.MPSMIN pages.
        self.max_transfer = (1 << cfg.mdts) * regs.page_size(cfg.mps_min) if cfg.mdts else 1 << 62

    # Section: public interface

    def mmio_read(self, offset: int, size: int) -> int:
        """Read ``size`` (1, 2, 4 or 8) bytes of BAR0 at ``offset``."""
        if size not in (1, 2, 4, 8) or offset < 0 or offset % size:
            self._trace_err_mmio(offset, size, 0, "unsupported read width or alignment")
            return 0
        self._register_reads += 1
        if offset >= regs.REGISTER_FILE_SIZE:
            # §3.1.10: doorbell registers are write-only; reads return zero.
            return 0
        value = 0
        for byte in range(size):
            pos = offset + byte
            dword = self._read_dword(pos & ~3)
            value |= ((dword >> (8 * (pos & 3))) & 0xFF) << (8 * byte)
        if self._tracing:
            self._trace("pci_nvme_mmio_read", offset, size, value)
        return value

    def mmio_write(self, offset: int, size: int, value: int) -> list[Effect]:
        """Write ``size`` (4 or 8) bytes of BAR0 at ``offset``. Never raises for guest input."""
        try:
            if offset >= regs.DOORBELL_BASE and size == 4:
                self._doorbell_write(offset, value & 0xFFFFFFFF)  # the common case
            else:
                self._mmio_write(offset, size, value)
        except Exception as exc:  # an emulator bug must not take the process down
            log.exception("mmio_write(%#x, %d, %#x) failed", offset, size, value)
            self._internal_errors += 1
            self._set_fatal(f"internal error in register write: {exc!r}")
        return self._take_effects()

    def process(self, now: float | None = None, budget: int | None = None) -> list[Effect]:
        """Run pending submission queues (up to ``budget`` commands) and deliver interrupts."""
        if now is not None:
            self._now = now
        if not (
            self._pending
            or self._touched_cqs
            or self._deadlines
            or self._coalescing
            or self.delayed
            or self.memory.generation != self._memory_generation
        ):
            return self._take_effects()  # nothing pending, nothing to deliver or expire
        if self._memory_missing:
            if self.memory.generation != self._memory_generation:
                self._sync_memory()  # the memory may be back
            if self._memory_missing:
                if self._pending or self.delayed:
                    self._memory_gone()
                # Otherwise wait for the memory to come back; interrupts owed stay owed, and so
                # do an EventIdx policy's deadlines (its own, not a use by the host).
                return self._take_effects()
        if self._deadlines:
            self._expire_deadlines()
        try:
            if self.delayed:
                self.delayed.post_due(self, self._now)
            self._run_pending(_DEFAULT_BUDGET if budget is None else budget)
            self._deliver_interrupts()
        except Exception as exc:
            log.exception("process() failed")
            self._internal_errors += 1
            self._set_fatal(f"internal error: {exc!r}")
        return self._take_effects()

    def poll(self, now: float | None = None, budget: int | None = None) -> list[Effect]:
        """Polling mode: look at every shadow SQ tail, as if each had been rung, then process."""
        if self.doorbells.active and self._ready():
            for sq in self.sqs:
                if sq is not None and sq.shadow_mode and not sq.blocked:
                    self._pending[sq.sqid] = sq
        return self.process(now, budget)

    def rearm(self) -> bool:
        """Before a polling edge sleeps: publish EAGER EventIdx values and re-check every shadow
        tail. True if nothing is pending (safe to sleep until a doorbell), False if work arrived."""
        if not self.doorbells.active or not self._ready():
            return not self._pending
        self.sq_policy.stop_polling()
        quiet = True
        for sq in self.sqs:
            if sq is None or not sq.shadow_mode:
                continue
            tail = self._probe_sq(sq, rearm_event_idx(sq.head, 0, sq.size))
            if tail is not None and tail != sq.head:
                sq.rearms_lost += 1
                self._rearms_lost += 1
                self._pending[sq.sqid] = sq
                quiet = False
            else:
                sq.rearms_won += 1
                self._rearms_won += 1
        return quiet and not self._pending

    def start_polling(self) -> None:
        """The edge is about to poll: idle SQs ask for no doorbell until it rearms."""
        self.sq_policy.start_polling()

    @property
    def has_pending_work(self) -> bool:
        return bool(self._pending) and not self._fatal

    def next_deadline(self) -> float | None:
        """When :meth:`process` must run next at the latest (``now`` units), if ever: coalesced
        interrupts, an SQ EventIdx policy's deadline, a completion a fault hook delays."""
        if not self._deadlines and not self.features.interrupt_coalescing and not self.delayed:
            return None  # asked before every wait: the common answer without the work
        if self._memory_missing:
            return self.delayed.earliest()  # nothing else can run before the memory is back
        deadline = self._next_deadline()
        held = self.delayed.earliest()
        return held if deadline is None or (held is not None and held < deadline) else deadline

    def _next_deadline(self) -> float | None:
        deadline: float | None = None
        if self._deadlines:
            deadline = min(
                (sq.deadline for sq in self._deadlines.values() if sq.deadline is not None), default=None
            )
        time_units = InterruptCoalescing.TIME.get(self.features.interrupt_coalescing)
        if not time_units:
            return deadline
        pending = [c.since for c in self._coalescing.values() if c.count]
        if not pending:
            return deadline
        coalescing = min(pending) + time_units * 100e-6
        return coalescing if deadline is None else min(deadline, coalescing)

    def take_effects(self) -> list[Effect]:
        """Effects emitted outside the calls that return them (e.g. traces from reads)."""
        return self._take_effects()

    def reset(self) -> list[Effect]:
        """A reset from outside (bus reset, vfio-user DEVICE_RESET): CC cleared, queues gone."""
        self._controller_reset()
        self.cc = 0
        self.csts = 0
        self.aqa = self.asq = self.acq = 0
        return self._take_effects()

    @property
    def has_volatile_cache(self) -> bool:
        """Identify VWC: some namespace's backend completes writes before they are durable."""
        return any(ns.backend.volatile_cache for ns in self.namespaces.values())

    def close(self) -> None:
        """Flush and close every backend; a failing one does not stop the others."""
        failure: BaseException | None = None
        for ns in self.namespaces.values():
            try:
                ns.backend.flush()
            except BaseException as exc:
                failure = failure or exc
            finally:
                ns.backend.close()
        if failure is not None:
            raise failure

    def enable_trace(self, patterns: Iterable[str]) -> frozenset[str]:
        """Turn on the trace events matching ``patterns`` (globs); returns the selection."""
        self._trace_set = matching_events(patterns)
        self._tracing = bool(self._trace_set)
        return self._trace_set

    def disable_trace(self) -> None:
        self._trace_set = frozenset()
        self._tracing = False

    def statistics(self) -> ControllerStatistics:
        return ControllerStatistics(
            register_reads=self._register_reads,
            register_writes=self._register_writes,
            doorbell_sq_admin=self._db_sq_admin,
            doorbell_sq_io=self._db_sq_io,
            doorbell_cq_admin=self._db_cq_admin,
            doorbell_cq_io=self._db_cq_io,
            invalid_doorbell_writes=self._invalid_doorbells,
            shadow_reads=self.doorbells.reads,
            eventidx_writes=self.doorbells.eventidx_writes,
            rearms_won=self._rearms_won,
            rearms_lost=self._rearms_lost,
            interrupts_raised=self._interrupts,
            completions_posted=self._completions,
            error_completions=self._error_completions,
            dbbuf_configs=self._dbbuf_configs,
            shadow_catchups=self.doorbells.catchups,
            internal_errors=self._internal_errors,
            mapped_doorbell_updates=self._mapped_doorbells,
            predictions_met=self.sq_policy.met,
            predictions_missed=self.sq_policy.missed,
            batch_offers=self.sq_policy.offers,
            admin_commands={opcode_name(op, True): n for op, n in enumerate(self._admin_counts) if n},
            io_commands={opcode_name(op, False): n for op, n in enumerate(self._io_counts) if n},
        )

    def queue_statistics(self) -> list[QueueStatistics]:
        sqs = []
        for sq in self.sqs:
            if sq is not None:
                met, missed, offers = self.sq_policy.counters(sq)
                sqs.append(
                    dataclasses.replace(
                        sq.statistics(), predictions_met=met, predictions_missed=missed, batch_offers=offers
                    )
                )
        cqs = [
            dataclasses.replace(cq.statistics(), interrupts=self._vector_interrupts.get(cq.vector, 0))
            for cq in self.cqs
            if cq is not None
        ]
        return sqs + cqs

    def critical_warning(self) -> int:
        """SMART Critical Warning bits (temperature against the thresholds)."""
        temperature = self.config.temperature_kelvin
        features = self.features
        too_hot = temperature >= features.over_temperature
        too_cold = features.under_temperature and temperature <= features.under_temperature
        return int(CriticalWarning.TEMPERATURE) if too_hot or too_cold else 0

    def check_temperature(self) -> None:
        """Report a temperature threshold crossing if Asynchronous Event Configuration asks."""
        if (
            self.critical_warning() & CriticalWarning.TEMPERATURE
            and self.features.async_event_configuration & CriticalWarning.TEMPERATURE
        ):
            self.async_events.enqueue(
                AsyncEventType.SMART_HEALTH_STATUS,
                AsyncEventSmartInfo.TEMPERATURE_THRESHOLD,
                LogPageId.SMART_HEALTH,
            )

    @property
    def enabled(self) -> bool:
        return bool(CC.EN.get(self.cc))

    @property
    def fatal(self) -> bool:
        return self._fatal

    @property
    def doorbell_end(self) -> int:
        """BAR0 offset just past the last doorbell register."""
        return self._doorbell_end

    def check_shadow_tails(self) -> bool:
        """An edge polling a mapped doorbell page: look at the shadow tail of every SQ whose
        host keeps its shadow slot, and mark the ones with unconsumed commands pending.

        A store into the mapped page cannot be seen as an event: a host that rings with the
        very value the page already holds (a stale value from a lap ago, looked at while the
        controller was idle at the same head) changes nothing there. The shadow slot it wrote
        first is the truth. True if any SQ was marked."""
        doorbells = self.doorbells
        if not doorbells.active or not self.csts & 1 or self._fatal or self._memory_missing:
            return False
        found = False
        for sq in self.sqs:
            if (
                sq is not None
                and sq.shadow_mode
                and sq.doorbell.slot_kept
                and not sq.blocked
                and doorbells.peek(sq.doorbell) != sq.head
            ):
                self._pending[sq.sqid] = sq
                found = True
        return found

    def doorbell_values(self) -> list[tuple[int, int]]:
        """(BAR0 offset, the value the controller holds) for every existing queue's doorbell: SQ
        tails and CQ heads. An edge polling a mapped doorbell page compares against these."""
        stride = 4 << self.dstrd
        out = [(regs.DOORBELL_BASE + 2 * sq.sqid * stride, sq.tail) for sq in self.sqs if sq is not None]
        out += [
            (regs.DOORBELL_BASE + (2 * cq.cqid + 1) * stride, cq.head) for cq in self.cqs if cq is not None
        ]
        return out

    @property
    def completions(self) -> int:
        """Completions posted so far (cheap: an edge checks it after every pass for progress)."""
        return self._completions

    @property
    def enable_count(self) -> int:
        """How many times CC.EN went 0 -> 1 (an edge learns of resets it did not see)."""
        return self._enable_count

    # Section: registers

    def _read_dword(self, offset: int) -> int:
        if offset == Reg.CAP:
            return self.cap & 0xFFFFFFFF
        if offset == Reg.CAP + 4:
            return self.cap >> 32
        if offset == Reg.VS:
            return regs.NVME_VERSION_1_3
        if offset in (Reg.INTMS, Reg.INTMC):
            return self.intms
        if offset == Reg.CC:
            return self.cc
        if offset == Reg.CSTS:
            return self.csts
        if offset == Reg.AQA:
            return self.aqa
        if offset == Reg.ASQ:
            return self.asq & 0xFFFFFFFF
        if offset == Reg.ASQ + 4:
            return self.asq >> 32
        if offset == Reg.ACQ:
            return self.acq & 0xFFFFFFFF
        if offset == Reg.ACQ + 4:
            return self.acq >> 32
        return 0  # NSSR reads as 0; CMBLOC / CMBSZ: no controller memory buffer

    def _mmio_write(self, offset: int, size: int, value: int) -> None:
        if offset >= regs.DOORBELL_BASE:
            if size != 4:
                self._trace_err_mmio(offset, size, value, "doorbell writes are 32-bit")
                return
            self._doorbell_write(offset, value & 0xFFFFFFFF)
            return
        if size not in (4, 8) or offset % size or offset < 0:
            self._trace_err_mmio(offset, size, value, "unsupported write width or alignment")
            return
        if size == 8:
            if offset not in (Reg.ASQ, Reg.ACQ, Reg.CAP):
                self._trace_err_mmio(offset, size, value, "64-bit write to a 32-bit register")
                return
            self._register_write(offset, value & 0xFFFFFFFF)
            self._register_write(offset + 4, (value >> 32) & 0xFFFFFFFF)
            return
        self._register_write(offset, value & 0xFFFFFFFF)

    def _register_write(self, offset: int, value: int) -> None:
        self._register_writes += 1
        if self._tracing:
            self._trace("pci_nvme_mmio_write", offset, 4, value)
        if offset == Reg.CC:
            self._write_cc(value)
        elif offset == Reg.INTMS:
            self.intms |= value
        elif offset == Reg.INTMC:
            self.intms &= ~value
            self._raise_unmasked()
        elif offset == Reg.CSTS:
            # CSTS.NSSRO is RW1C (§3.1.6); every other CSTS bit is read-only.
            if CSTS.NSSRO.get(value):
                self.csts = CSTS.NSSRO.put(self.csts, 0)
        elif offset == Reg.NSSR:
            if value == regs.NSSR_MAGIC and self.config.nssr_supported:
                self._subsystem_reset()
        elif offset in (Reg.AQA, Reg.ASQ, Reg.ASQ + 4, Reg.ACQ, Reg.ACQ + 4):
            if self.enabled:
                # §3.1.8-3.1.10: admin queue attributes are only taken at CC.EN 0 -> 1.
                self._trace_err_mmio(offset, 4, value, "admin queue register written while enabled")
                return
            if offset == Reg.AQA:
                self.aqa = value & (AQA.ASQS.mask | AQA.ACQS.mask)
            elif offset == Reg.ASQ:
                self.asq = (self.asq & ~0xFFFFFFFF) | (value & ~0xFFF)
            elif offset == Reg.ASQ + 4:
                self.asq = (self.asq & 0xFFFFFFFF) | (value << 32)
            elif offset == Reg.ACQ:
                self.acq = (self.acq & ~0xFFFFFFFF) | (value & ~0xFFF)
            else:
                self.acq = (self.acq & 0xFFFFFFFF) | (value << 32)
        else:
            self._trace_err_mmio(offset, 4, value, "write to a read-only or reserved register")

    def _write_cc(self, value: int) -> None:
        old = self.cc
        self.cc = value
        was_enabled, enabled = CC.EN.get(old), CC.EN.get(value)
        if enabled and not was_enabled:
            self._start()
        elif was_enabled and not enabled:
            self._controller_reset()
        old_shn, shn = CC.SHN.get(old), CC.SHN.get(value)
        if shn and not old_shn:
            self._shutdown(shn)
        elif old_shn and not shn:
            self.csts = CSTS.SHST.put(self.csts, ShutdownStatus.NORMAL)
            if self._tracing:
                self._trace("pci_nvme_mmio_shutdown_cleared")

    def _start(self) -> None:
        """CC.EN 0 -> 1 (§7.6.1): validate CC and the admin queue registers, create the admin queues."""
        self._enable_count += 1
        cc, cap = self.cc, self.cap
        reason = None
        mps = CC.MPS.get(cc)
        asqs, acqs = AQA.ASQS.get(self.aqa) + 1, AQA.ACQS.get(self.aqa) + 1
        if not CAP.MPSMIN.get(cap) <= mps <= CAP.MPSMAX.get(cap):
            reason = f"CC.MPS {mps} outside CAP.MPSMIN..MPSMAX"
        elif CC.CSS.get(cc) != 0:
            reason = f"CC.CSS {CC.CSS.get(cc)} is not the NVM command set"
        elif CC.AMS.get(cc) != 0:
            reason = f"CC.AMS {CC.AMS.get(cc)}: only round robin arbitration is supported"
        elif asqs < 2 or acqs < 2:
            reason = "AQA: admin queues need at least 2 entries"
        elif asqs > _ADMIN_QUEUE_MAX or acqs > _ADMIN_QUEUE_MAX:
            # CAP.MQES bounds the I/O queues only (§3.1.1); AQA allows up to 4096 entries (§3.1.8).
            reason = f"AQA: admin queue larger than {_ADMIN_QUEUE_MAX} entries"
        page = regs.page_size(mps)
        if reason is None and (self.asq & (page - 1) or self.acq & (page - 1)):
            reason = "ASQ / ACQ not aligned to the memory page size"
        if reason is None:
            try:
                self._sync_memory()
                cq_view, cq_remote = self.memory.window(self.acq, acqs * CQE_SIZE, write=True)
                sq_view, sq_remote = self.memory.window(self.asq, asqs * SQE_SIZE)
            except GuestMemoryError as exc:
                reason = f"admin queue memory: {exc}"
        if reason is not None:
            # The controller cannot become ready; CFS tells the host at once instead of
            # letting it wait CAP.TO for CSTS.RDY.
            if self._tracing:
                self._trace("pci_nvme_err_startfail", reason)
            self._set_fatal(f"enable failed: {reason}")
            return
        self.page_size = page
        cq = CompletionQueue(0, acqs, self.acq, cq_view, cq_slot(0, self.dstrd), ien=True, vector=0)
        sq = SubmissionQueue(0, cq, asqs, self.asq, sq_view, sq_slot(0, self.dstrd))
        cq.remote, sq.remote = cq_remote, sq_remote
        cq.sqs[0] = sq
        self.cqs[0], self.sqs[0] = cq, sq
        self.csts = CSTS.RDY.put(self.csts, 1)
        if self._tracing:
            self._trace("pci_nvme_mmio_start_success")

    def _controller_reset(self) -> None:
        """CC.EN 1 -> 0 (§7.3.2): drop every queue, forget shadow doorbell buffers, features."""
        self._drop_queues()
        self._deadlines.clear()
        self.delayed.clear()
        self._coalescing.clear()
        self._masked_pending.clear()
        self.features.reset()
        self.async_events.reset()
        self._fatal = False
        self.sq_policy.reset()
        self.csts = CSTS.RDY.put(CSTS.CFS.put(self.csts, 0), 0)
        if self._tracing:
            self._trace("pci_nvme_mmio_stopped")

    def _subsystem_reset(self) -> None:
        if self._tracing:
            self._trace("pci_nvme_nssr")
        self._controller_reset()
        self.cc = 0
        self.csts = CSTS.NSSRO.put(0, 1)

    def _shutdown(self, shn: int) -> None:
        """CC.SHN set: make all written data durable, then report shutdown complete."""
        try:
            for ns in self.namespaces.values():
                ns.backend.flush()
        except OSError as exc:
            self._set_fatal(f"flush on shutdown failed: {exc}")
            return
        self.csts = CSTS.SHST.put(self.csts, ShutdownStatus.COMPLETE)
        if self._tracing:
            self._trace("pci_nvme_mmio_shutdown_set", shn)

    def _ready(self) -> bool:
        return bool(self.csts & 1) and not self._fatal

    # Section: doorbells

    def mapped_doorbell(self, offset: int, value: int) -> list[Effect]:
        """A doorbell value the edge found changed in a doorbell page the host writes directly
        (mappable doorbells): handled as a doorbell write, counted apart from trapped ones."""
        try:
            self._doorbell_write(offset, value & 0xFFFFFFFF, trapped=False)
        except Exception as exc:
            log.exception("mapped_doorbell(%#x, %#x) failed", offset, value)
            self._internal_errors += 1
            self._set_fatal(f"internal error in a mapped doorbell: {exc!r}")
        return self._take_effects()

    def _doorbell_write(self, offset: int, value: int, *, trapped: bool = True) -> None:
        # regs.decode_doorbell, inlined: once per doorbell.
        stride = 4 << self.dstrd
        rel = offset - regs.DOORBELL_BASE
        if rel < 0 or rel % stride or offset >= self._doorbell_end:
            self._trace_err_mmio(offset, 4, value, "not a doorbell register")
            self._invalid_doorbell(-1, False, value, AsyncEventErrorInfo.INVALID_DOORBELL_REGISTER)
            return
        index = rel // stride
        qid, is_cq = index >> 1, index & 1
        if not self.csts & 1 or self._fatal or self._memory_missing:  # not self._ready()
            if self._memory_missing and not self._fatal and self.csts & 1:
                self._memory_gone()  # a doorbell for queues whose memory is not there
                return
            self._trace_err_mmio(offset, 4, value, "doorbell write while not ready")
            return
        if is_cq:
            cq = self.cqs[qid]
            if cq is None:
                self._invalid_doorbell(qid, True, value, AsyncEventErrorInfo.INVALID_DOORBELL_REGISTER)
                return
            if not trapped:
                self._mapped_doorbells += 1
            elif qid:
                self._db_cq_io += 1
            else:
                self._db_cq_admin += 1
            self._cq_doorbell(cq, value)
        else:
            sq = self.sqs[qid]
            if sq is None:
                self._invalid_doorbell(qid, False, value, AsyncEventErrorInfo.INVALID_DOORBELL_REGISTER)
                return
            if not trapped:
                self._mapped_doorbells += 1
            elif qid:
                self._db_sq_io += 1
            else:
                self._db_sq_admin += 1
            self._sq_doorbell(sq, value)

    def _invalid_doorbell(self, qid: int, is_cq: bool, value: int, info: AsyncEventErrorInfo) -> None:
        self._invalid_doorbells += 1
        if self._tracing:
            name = (
                "pci_nvme_err_db_invalid_queue"
                if info is AsyncEventErrorInfo.INVALID_DOORBELL_REGISTER
                else "pci_nvme_err_db_invalid_value"
            )
            self._trace(name, qid, int(is_cq), value)
        if self._ready():
            self.async_events.enqueue(AsyncEventType.ERROR_STATUS, info, LogPageId.ERROR_INFORMATION)

    def _sq_doorbell(self, sq: SubmissionQueue, value: int) -> None:
        sq.mmio_writes += 1
        if self._tracing:
            self._trace("pci_nvme_mmio_doorbell_sq", sq.sqid, value)
        n = sq.size
        if value >= n:
            self._invalid_doorbell(sq.sqid, False, value, AsyncEventErrorInfo.INVALID_DOORBELL_WRITE_VALUE)
            return
        if sq.shadow_mode:
            shadow = self.doorbells.load(sq.doorbell)
            if not sq.doorbell.slot_kept and not (
                shadow < n and (shadow - sq.head) % n >= (value - sq.head) % n
            ):
                self._catch_up_shadow(sq, sq.sqid, False, shadow, value)
            if self._sq_rang is not None:
                self._sq_rang(sq, self._now)
        else:
            sq.tail = value
        if not sq.blocked:
            self._pending[sq.sqid] = sq

    def _cq_doorbell(self, cq: CompletionQueue, value: int) -> None:
        cq.mmio_writes += 1
        if self._tracing:
            self._trace("pci_nvme_mmio_doorbell_cq", cq.cqid, value)
        n = cq.size
        used = (cq.tail - cq.head) % n
        if cq.shadow_mode and value < n:
            shadow = self.doorbells.load(cq.doorbell)
            if cq.doorbell.slot_kept:
                # The host keeps its head in the slot: this MMIO is a wake-up, and a posted one
                # may carry a head older than the slot's; the slot decides.
                self._refresh_cq_head(cq)
                return
        # §4.1: the host may only consume posted entries: the new head lies in [head, tail].
        if value >= n or (value - cq.head) % n > used:
            self._invalid_doorbell(cq.cqid, True, value, AsyncEventErrorInfo.INVALID_DOORBELL_WRITE_VALUE)
            return
        head = value
        if cq.shadow_mode:
            if shadow < n and (value - cq.head) % n <= (shadow - cq.head) % n <= used:
                head = shadow
            else:
                self._catch_up_shadow(cq, cq.cqid, True, shadow, value)
        self._set_cq_head(cq, head)

    def _catch_up_shadow(
        self, queue: SubmissionQueue | CompletionQueue, qid: int, is_cq: bool, shadow: int, value: int
    ) -> None:
        """An MMIO doorbell value ahead of the queue's shadow slot: see Doorbells.catch_up."""
        self.doorbells.catch_up(queue.doorbell, value)
        if self._tracing:
            self._trace("pci_nvme_dbbuf_shadow_catchup", qid, int(is_cq), shadow, value)

    def _sq_tail(self, sq: SubmissionQueue, value: int) -> int | None:
        """A tail read from the SQ's shadow slot, or None if the value is not a valid tail."""
        if value >= sq.size:
            if self._tracing:
                self._trace("pci_nvme_err_shadow_invalid_value", sq.sqid, 0, value)
            self._invalid_doorbell(sq.sqid, False, value, AsyncEventErrorInfo.INVALID_DOORBELL_WRITE_VALUE)
            return None
        if self._tracing:
            self._trace("pci_nvme_update_sq_tail", sq.sqid, value)
        return value

    def _probe_sq(self, sq: SubmissionQueue, event_idx: int) -> int | None:
        """Publish the SQ's EventIdx, fence, re-read its tail (None: not a valid tail). (_run_sq
        does the same inline: once per I/O.)"""
        value = self.doorbells.probe(sq.doorbell, event_idx, sq.size)
        if self._tracing:
            self._trace("pci_nvme_update_sq_eventidx", sq.sqid, event_idx)
        return self._sq_tail(sq, value)

    def _refresh_cq_head(self, cq: CompletionQueue, value: int | None = None) -> None:
        """Learn how far the host has consumed, from the shadow slot (or the ``value`` a probe
        just read there)."""
        if not cq.shadow_mode:
            return
        if value is None:
            value = self.doorbells.load(cq.doorbell)
        n = cq.size
        if value >= n or (value - cq.head) % n > (cq.tail - cq.head) % n:
            if self._tracing:
                self._trace("pci_nvme_err_shadow_invalid_value", cq.cqid, 1, value)
            self._invalid_doorbell(cq.cqid, True, value, AsyncEventErrorInfo.INVALID_DOORBELL_WRITE_VALUE)
            return
        if self._tracing:
            self._trace("pci_nvme_update_cq_head", cq.cqid, value)
        if value != cq.head:
            self._set_cq_head(cq, value)

    def _set_cq_head(self, cq: CompletionQueue, head: int) -> None:
        cq.head = head
        if cq.shadow_mode:
            self._publish_cq_eventidx(cq)
        if cq.waiting_for_room and not cq.is_full():
            cq.waiting_for_room = False
        if cq.backlog:
            self._drain_backlog(cq)
        for sq in cq.sqs.values():
            if sq.blocked:
                sq.blocked = False
                self._pending[sq.sqid] = sq

    def _publish_sq_eventidx(self, sq: SubmissionQueue, value: int) -> None:
        self.doorbells.store_eventidx(sq.doorbell, value)
        if self._tracing:
            self._trace("pci_nvme_update_sq_eventidx", sq.sqid, value)

    def _publish_cq_eventidx(self, cq: CompletionQueue, *, probe: bool = False) -> int:
        """Publish the CQ's EventIdx; with ``probe``, fence and return the shadow head read again
        (else -1). Blocked on a full CQ it asks for any progress of the head, whatever the policy."""
        # rearm_event_idx, inlined: once per I/O.
        value = (cq.head + (0 if cq.waiting_for_room else self._cq_ahead)) % cq.size
        if self._tracing:
            self._trace("pci_nvme_update_cq_eventidx", cq.cqid, value)
        if probe:
            return self.doorbells.probe(cq.doorbell, value)
        self.doorbells.store_eventidx(cq.doorbell, value)
        return -1

    def _make_room(self, cq: CompletionQueue) -> bool:
        """The CQ looks full by the head we know. Refresh it; if still full, ask for a wake-up."""
        self._refresh_cq_head(cq)
        if not cq.is_full():
            return True
        if cq.shadow_mode and not cq.waiting_for_room:
            cq.waiting_for_room = True
            self._refresh_cq_head(cq, self._publish_cq_eventidx(cq, probe=True))
            if not cq.is_full():
                cq.waiting_for_room = False
                self._publish_cq_eventidx(cq)
                return True
        cq.waiting_for_room = True
        if self._tracing:
            self._trace("pci_nvme_err_cq_full", cq.cqid)
        return False

    # Section: shadow doorbell buffers

    def configure_dbbuf(self, shadow_addr: int, eventidx_addr: int) -> None:
        """Doorbell Buffer Config: take the pages and move every existing queue onto them.

        Existing queues get their current tail / head written into their shadow slot (QEMU and
        OpenVMM do the same), so the slot holds a valid value before the controller reads it.
        """
        self.doorbells.configure(self.memory, shadow_addr, eventidx_addr, self.page_size)
        self._dbbuf_configs += 1
        doorbells = self.doorbells
        for sq in self.sqs:
            if sq is None or (sq.sqid == 0 and not self.config.admin_queue_shadow):
                continue
            doorbells.take(sq.doorbell, sq.tail)
            sq.shadow_mode = True
            self._attach_sq_policy(sq)
        for cq in self.cqs:
            if cq is None or (cq.cqid == 0 and not self.config.admin_queue_shadow):
                continue
            doorbells.take(cq.doorbell, cq.head)
            cq.shadow_mode = True
            self._publish_cq_eventidx(cq)
        if self._tracing:
            self._trace("pci_nvme_dbbuf_config", shadow_addr, eventidx_addr)

    def _attach_to_dbbuf(self, sq: SubmissionQueue | None, cq: CompletionQueue | None) -> None:
        """A queue created while shadow doorbells are on starts on its shadow slot."""
        doorbells = self.doorbells
        if not doorbells.active:
            return
        fresh = 0 if self.config.zero_shadow_on_create else None
        if sq is not None:
            doorbells.take(sq.doorbell, fresh)
            sq.shadow_mode = True
            self._attach_sq_policy(sq)
        if cq is not None:
            doorbells.take(cq.doorbell, fresh)
            cq.shadow_mode = True
            self._publish_cq_eventidx(cq)

    def _attach_sq_policy(self, sq: SubmissionQueue) -> None:
        """``sq`` has just switched onto its shadow slot: publish its first EventIdx."""
        ahead = self.sq_policy.attached(sq)
        self._publish_sq_eventidx(sq, rearm_event_idx(sq.head if ahead < 0 else sq.tail, ahead, sq.size))

    # Section: EventIdx policies

    def _set_policies(self, sq_policy: SqPolicyFactory, cq_policy: type[CqEventIdx]) -> None:
        """Take the policies, caching what the hot path calls or reads."""
        policy = self.sq_policy = sq_policy(self.config, self._refresh_cq_head)
        self._sq_ran_dry = policy.ran_dry
        self._sq_rearmed = policy.rearmed
        self._sq_rang = policy.rang if overridden(policy, "rang") else None
        self._sq_posted = policy.posted if overridden(policy, "posted") else None
        self._cq_ahead = cq_policy.ahead
        self._cq_on_completions = cq_policy.on_completions
        self._completions_watched = self._cq_on_completions or self._sq_posted is not None

    def _completions_posted(self, cq: CompletionQueue) -> None:
        """Completions were posted to ``cq`` (shadow mode) in this pass: tell the policies."""
        if self._cq_on_completions:
            self._refresh_cq_head(cq)
            self._publish_cq_eventidx(cq)
        if self._sq_posted is not None:
            self._sq_posted(cq, self._now)

    def _expire_deadlines(self) -> None:
        """Deadlines an SQ policy asked for that have passed: look at those shadow tails (e.g.
        a host that placed fewer commands than predicted, and did not ring)."""
        now = self._now
        for sqid, sq in list(self._deadlines.items()):
            if sq.deadline is None or self.sqs[sqid] is not sq:
                del self._deadlines[sqid]
            elif now >= sq.deadline:
                del self._deadlines[sqid]
                sq.deadline = None
                self.sq_policy.deadline_passed(sq, now)
                self._pending[sqid] = sq

    # Section: command processing

    def _run_pending(self, budget: int) -> None:
        if self._fatal or not self.csts & 1:  # not self._ready()
            self._pending.clear()
            return
        if self.memory.generation != self._memory_generation:
            self._sync_memory()
            if self._memory_missing:
                self._memory_gone()
            if self._fatal:
                return
        pending = self._pending
        burst = self._arbitration_burst
        while pending and budget > 0 and not self._fatal:
            sqid = next(iter(pending))
            sq = pending.pop(sqid)
            if self.sqs[sqid] is not sq or sq.blocked:
                continue
            budget -= self._run_sq(sq, min(burst, budget))

    def _run_sq(self, sq: SubmissionQueue, budget: int) -> int:
        """Fetch and execute commands of one SQ; returns how many were taken."""
        cq = sq.cq
        n = sq.size
        view = sq.view
        execute = self._execute
        processed = 0
        attempts = 0
        while True:
            if sq.shadow_mode:
                tail = self.doorbells.load(sq.doorbell, n)
                if (tail >= n or self._tracing) and self._sq_tail(sq, tail) is None:
                    return processed
                sq.tail = tail
            tail = sq.tail
            head = sq.head
            while head != tail:
                if processed >= budget:
                    self._pending[sq.sqid] = sq
                    return processed
                room = cq.tail + 1  # cq.is_full(), inlined: once per command
                if room == cq.size:
                    room = 0
                if room == cq.head and not self._make_room(cq):
                    sq.blocked = True
                    return processed
                if sq.remote and not self._fetch_remote_sqe(sq, head):
                    return processed
                fields = _SQE_UNPACK(view, head * SQE_SIZE)
                head += 1
                if head == n:
                    head = 0
                sq.head = head
                processed += 1
                sq.entries += 1
                execute(sq, fields)
                if self._fatal or self.sqs[sq.sqid] is not sq:
                    return processed
                # A command may have switched this queue onto the shadow page (Doorbell
                # Buffer Config) or changed the tail; re-evaluate from the top.
                if sq.shadow_mode and tail != sq.tail:
                    break
            else:
                if not sq.shadow_mode:
                    return processed
                # Idle: the policy says when the host is to ring next.
                ahead = self._sq_ran_dry(sq, processed, attempts, self._now)
                event_idx = (head + ahead) % n  # rearm_event_idx, inlined: once per I/O
                if ahead < 0:  # no doorbell wanted (the edge polls): nothing to probe
                    self._publish_sq_eventidx(sq, event_idx)
                    return processed
                again = self.doorbells.probe(sq.doorbell, event_idx, n)  # _probe_sq, inlined
                if self._tracing:
                    self._trace("pci_nvme_update_sq_eventidx", sq.sqid, event_idx)
                if again >= n or self._tracing:
                    self._sq_tail(sq, again)  # an invalid value is reported, and ends the pass
                if again == head or again >= n:
                    sq.rearms_won += 1
                    self._rearms_won += 1
                    deadline = self._sq_rearmed(sq, ahead, self._now)
                    if deadline is not None:
                        sq.deadline = deadline
                        self._deadlines[sq.sqid] = sq
                    elif sq.deadline is not None:
                        sq.deadline = None
                        self._deadlines.pop(sq.sqid, None)
                    if self._tracing:
                        self._trace("pci_nvme_rearm", sq.sqid, 1, attempts + 1)
                    return processed
                # The host moved the tail while we published: it may not ring. Keep going.
                sq.rearms_lost += 1
                self._rearms_lost += 1
                attempts += 1
                if attempts >= self.config.max_rearm_attempts:
                    if self._tracing:
                        self._trace("pci_nvme_err_rearm_exhausted", sq.sqid, attempts)
                    self._pending[sq.sqid] = sq
                    return processed

    def _execute(self, sq: SubmissionQueue, fields: tuple[int, ...]) -> None:
        opcode = fields[0]
        cid = fields[2]
        status = 0  # Status.SUCCESS
        dw0 = 0
        try:
            if sq.sqid == 0:
                self._admin_counts[opcode] += 1
                if self._tracing:
                    self._trace("pci_nvme_admin_cmd", cid, 0, opcode, opcode_name(opcode, True))
                handler = self.admin_handlers.get(opcode)
            else:
                self._io_counts[opcode] += 1
                if self._tracing:
                    self._trace(
                        "pci_nvme_io_cmd", cid, fields[3], sq.sqid, opcode, opcode_name(opcode, False)
                    )
                handler = self.io_handlers.get(opcode)
            if handler is None:
                raise CommandFailed(Status.INVALID_OPCODE | DNR, "invalid opcode")
            if fields[1] & _FUSE_MASK:
                raise CommandFailed(Status.INVALID_FIELD | DNR, "fused operations are not supported")
            result = handler(self, sq, fields)
            if result is None:
                return  # completed later (Asynchronous Event Request)
            status, dw0 = result
        except CommandFailed as failure:
            status = failure.status
            if self._tracing:
                self._trace("pci_nvme_err_cmd", cid, sq.sqid, opcode, status, failure.reason)
        except GuestMemoryError as exc:
            status = Status.DATA_TRANSFER_ERROR | DNR
            if self._tracing:
                self._trace("pci_nvme_err_cmd", cid, sq.sqid, opcode, status, str(exc))
        except Exception as exc:  # an emulator bug: fail the command, keep serving
            log.exception("command opcode %#x on sqid %d failed", opcode, sq.sqid)
            self._internal_errors += 1
            status = Status.INTERNAL_ERROR
            if self._tracing:
                self._trace("pci_nvme_err_cmd", cid, sq.sqid, opcode, status, repr(exc))
        if status:
            self._error_completions += 1
            self.error_log.record(sq.sqid, cid, status, fields[3])
        cq = sq.cq
        room = cq.tail + 1  # post_completion, inlined
        if room == cq.size:
            room = 0
        if room == cq.head or cq.backlog:
            cq.backlog.append((sq, cid, status, dw0))
        else:
            self._write_cqe(cq, sq, cid, status, dw0)

    def post_completion(self, sq: SubmissionQueue, cid: int, status: int, dw0: int) -> None:
        """Post a CQE for a command of ``sq`` (the CQ has room: checked before fetching)."""
        cq = sq.cq
        if cq.is_full() or cq.backlog:
            # Only completions made later (AER, Abort) can find the CQ full; keep them in order.
            cq.backlog.append((sq, cid, status, dw0))
            return
        self._write_cqe(cq, sq, cid, status, dw0)

    def _write_cqe(self, cq: CompletionQueue, sq: SubmissionQueue, cid: int, status: int, dw0: int) -> None:
        tail = cq.tail
        offset = tail * CQE_SIZE
        view = cq.view
        _CQE_HEAD_PACK(view, offset, dw0 & 0xFFFFFFFF, 0, sq.head, sq.sqid)
        dword3 = cid | (((status << 1) | cq.phase) << 16)
        dwords = cq.dwords
        if dwords is not None:
            dwords[(offset >> 2) + 3] = dword3  # one store: see queues._dwords
        else:  # pragma: no cover - big-endian hosts
            _CQE_TAIL_PACK(view, offset + 12, dword3)
        if cq.remote:
            self._push_remote_cqe(cq, offset)
        tail += 1
        if tail == cq.size:
            tail = 0
            cq.phase ^= 1
        cq.tail = tail
        cq.entries += 1
        self._completions += 1
        self._touched_cqs[cq.cqid] = cq
        if self._tracing:
            self._trace("pci_nvme_enqueue_req_completion", cid, cq.cqid, dw0 & 0xFFFFFFFF, status)

    def _fetch_remote_sqe(self, sq: SubmissionQueue, head: int) -> bool:
        offset = head * SQE_SIZE
        try:
            self.memory.read_into(sq.base + offset, sq.view[offset : offset + SQE_SIZE])
        except GuestMemoryError as exc:
            self._set_fatal(f"sqid {sq.sqid}: entry unreachable: {exc}")
            return False
        return True

    def _push_remote_cqe(self, cq: CompletionQueue, offset: int) -> None:
        try:
            self.memory.write(cq.base + offset, cq.view[offset : offset + CQE_SIZE])
        except GuestMemoryError as exc:
            self._set_fatal(f"cqid {cq.cqid}: entry unreachable: {exc}")

    def _drain_backlog(self, cq: CompletionQueue) -> None:
        while cq.backlog and not cq.is_full():
            sq, cid, status, dw0 = cq.backlog.pop(0)
            self._write_cqe(cq, sq, cid, status, dw0)

    # Section: interrupts

    def _deliver_interrupts(self) -> None:
        touched = self._touched_cqs
        coalesce_value = self.features.interrupt_coalescing
        if touched:
            watched = self._completions_watched
            if not coalesce_value and not watched and len(touched) == 1:
                # The common pass: one CQ, no coalescing, no policy to tell.
                cq = next(iter(touched.values()))
                touched.clear()
                if cq.ien:
                    cq.irq_mark = cq.entries
                    self._raise(cq.vector)
                if self._coalescing:
                    self._deliver_coalesced(coalesce_value)
                return
        time_units = InterruptCoalescing.TIME.get(coalesce_value)
        # vector -> (entries posted, carries the admin CQ)
        vectors: dict[int, tuple[int, bool]] = {}
        if touched:
            for cq in touched.values():
                if cq.shadow_mode and watched:
                    self._completions_posted(cq)
                if not cq.ien:
                    continue
                count, admin_cq = vectors.get(cq.vector, (0, False))
                vectors[cq.vector] = (count + cq.entries - cq.irq_mark, admin_cq or cq.cqid == 0)
                cq.irq_mark = cq.entries
            touched.clear()
        for vector, (count, admin_cq) in vectors.items():
            # §5.21.1.8: coalescing never delays the admin CQ, nor a vector with CD set; an
            # aggregation time of 0 means no delay.
            if time_units == 0 or admin_cq or self.features.coalescing_disabled(vector):
                self._raise(vector)
                continue
            state = self._coalescing.setdefault(vector, _Coalescing())
            if state.count == 0:
                state.since = self._now
            state.count += count
        if self._coalescing:
            self._deliver_coalesced(coalesce_value)

    def _deliver_coalesced(self, coalesce_value: int) -> None:
        """Raise every coalesced vector whose threshold or aggregation time is reached."""
        threshold = InterruptCoalescing.THR.get(coalesce_value) + 1
        deadline = InterruptCoalescing.TIME.get(coalesce_value) * 100e-6
        for vector, state in self._coalescing.items():
            if state.count and (state.count >= threshold or self._now - state.since >= deadline):
                state.count = 0
                self._raise(vector)

    def _raise(self, vector: int) -> None:
        if vector < 32 and self.intms >> vector & 1:
            self._masked_pending.add(vector)
            if self._tracing:
                self._trace("pci_nvme_irq_masked", vector)
            return
        self._interrupts += 1
        self._vector_interrupts[vector] = self._vector_interrupts.get(vector, 0) + 1
        effect = _RAISE[vector] if vector < _RAISE_CACHED else RaiseInterrupt(vector)
        self._effects.append(effect)
        if self._tracing:
            self._trace("pci_nvme_irq_msix", vector)

    def _raise_unmasked(self) -> None:
        for vector in sorted(self._masked_pending):
            if not self.intms >> vector & 1:
                self._masked_pending.discard(vector)
                self._raise(vector)

    # Section: helpers

    def memory_changed(self) -> list[Effect]:
        """The guest memory map changed (DMA map / unmap): drop every view into the old map now,
        so the caller can unmap the memory behind it. A queue whose memory is gone is fatal only
        once the controller needs it: a client that remaps memory in several steps (QEMU does,
        whenever the guest's memory layout changes, e.g. while the firmware runs) may take it
        away and give it back between two accesses."""
        self._sync_memory()
        return self._take_effects()

    def _memory_gone(self) -> None:
        """The host took memory away from under live queues and then used them: drop the
        queues (no view may survive the unmap) and report CFS; the host must reset (§9.5)."""
        reason = self._memory_missing or "queue or doorbell memory unmapped"
        self._drop_queues()
        self._set_fatal(f"queue or doorbell memory unmapped: {reason}")

    def _sync_memory(self) -> None:
        """Look every cached view up again; release them all first so none outlives its region."""
        self._memory_generation = self.memory.generation
        queues = [q for q in (*self.cqs, *self.sqs) if q is not None]
        for queue in queues:
            queue.drop_view()
        if self._memory_missing is None:
            self._dbbuf_wanted = (
                self.doorbells.active,
                self.doorbells.shadow_addr,
                self.doorbells.eventidx_addr,
                self.doorbells.page_size,
            )
        was_active, shadow_addr, eventidx_addr, page_size = self._dbbuf_wanted
        self.doorbells.reset()
        try:
            for cq in self.cqs:
                if cq is not None:
                    view, cq.remote = self.memory.window(cq.base, cq.size * CQE_SIZE, write=True)
                    cq.set_view(view)
            for sq in self.sqs:
                if sq is not None:
                    sq.view, sq.remote = self.memory.window(sq.base, sq.size * SQE_SIZE)
            if was_active:
                self.doorbells.configure(self.memory, shadow_addr, eventidx_addr, page_size)
            self._memory_missing = None
        except GuestMemoryError as exc:
            # Not fatal yet (see memory_changed): no view is kept, and every path that would
            # touch a queue or a doorbell page checks _memory_missing first.
            for queue in queues:
                queue.drop_view()
            self.doorbells.reset()
            self._memory_missing = str(exc)
            if self._tracing:
                self._trace("pci_nvme_memory_missing", str(exc))

    def _drop_queues(self) -> None:
        self._memory_missing = None
        for queues in (self.sqs, self.cqs):
            for qid, queue in enumerate(queues):
                if queue is not None:
                    queue.release()
                    queues[qid] = None
        self.doorbells.reset()
        self._pending.clear()
        self._touched_cqs.clear()

    def _set_fatal(self, reason: str) -> None:
        self._fatal = True
        self._pending.clear()
        self.csts = CSTS.CFS.put(self.csts, 1)
        if self._tracing:
            self._trace("pci_nvme_err_fatal", reason)
        self._effects.append(ControllerFatal(reason))

    def _trace(self, name: str, *args: int | str) -> None:
        if name in self._trace_set:
            self._effects.append(TraceEvent(name, args))

    def _trace_err_mmio(self, offset: int, size: int, value: int, reason: str) -> None:
        if self._tracing:
            self._trace("pci_nvme_err_mmio", offset, size, value, reason)

    def _take_effects(self) -> list[Effect]:
        effects = self._effects
        self._effects = []
        return effects

    def trace_event_known(self, name: str) -> bool:
        return name in TRACE_EVENTS
