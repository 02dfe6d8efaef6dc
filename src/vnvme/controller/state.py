"""The controller's CC / CSTS state machine (NVMe 1.3 §7.3, §7.6), as a table of transitions in
the style of h11's state tables: an :class:`Event` names what happened, :data:`TRANSITIONS` says
what the controller does about it. Every event is taken in every state; what it does depends on
the event alone, and what CSTS holds afterwards is the state.

A transition runs its ``via`` transition first (a subsystem reset is a controller reset and
more), then its step (the controller's part: create the admin queues, forget every queue,
flush); a step that fails turns the transition into :attr:`Event.FATAL` (CSTS.CFS). Then CSTS
takes the transition's fields and the trace event is emitted.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Final

from vnvme.spec.registers import AQA, CAP, CC, CSTS, Field, ShutdownStatus, page_size

# CAP.MQES bounds the I/O queues only (§3.1.1); AQA allows up to 4096 entries (§3.1.8).
ADMIN_QUEUE_MAX: Final = 4096


class Event(Enum):
    ENABLE = "CC.EN 0 -> 1"  # §7.6.1
    DISABLE = "CC.EN 1 -> 0"  # §7.3.2: a controller reset
    SHUTDOWN = "CC.SHN set"  # §7.6.2
    SHUTDOWN_CLEARED = "CC.SHN cleared"
    SUBSYSTEM_RESET = "NSSR written with 'NVMe'"  # §7.3.1
    RESET = "reset from outside"  # bus reset, vfio-user DEVICE_RESET
    FATAL = "controller fatal status"  # §9.5


class Step(Enum):
    """The controller's part of a transition; START and FLUSH can fail (a reason)."""

    START = "validate CC and AQA / ASQ / ACQ, create the admin queues"
    FORGET = "drop every queue, shadow doorbell page, feature and deadline"
    FLUSH = "make all written data durable"
    HALT = "stop processing"


@dataclass(frozen=True)
class Transition:
    step: Step | None = None
    #: CSTS fields set once the step succeeded (after clearing CSTS when ``clear``).
    csts: tuple[tuple[Field, int], ...] = ()
    #: CSTS and CC start from zero; with ``registers`` too, every register (AQA, ASQ, ACQ).
    clear: bool = False
    registers: bool = False
    via: Event | None = None
    #: Traced before anything else / once done / when the step fails (with the reason).
    announce: str | None = None
    trace: str | None = None
    failure_trace: str | None = None
    #: The fatal reason given when the step fails: this prefix and the step's reason.
    failure: str = ""
    #: Tell the edge: a ControllerFatal effect with the reason, after the trace event.
    report: bool = False


TRANSITIONS: Final[dict[Event, Transition]] = {
    Event.ENABLE: Transition(
        Step.START,
        ((CSTS.RDY, 1),),
        trace="pci_nvme_mmio_start_success",
        # The controller cannot become ready; CFS tells the host at once instead of letting it
        # wait CAP.TO for CSTS.RDY.
        failure_trace="pci_nvme_err_startfail",
        failure="enable failed: ",
    ),
    Event.DISABLE: Transition(Step.FORGET, ((CSTS.CFS, 0), (CSTS.RDY, 0)), trace="pci_nvme_mmio_stopped"),
    Event.SHUTDOWN: Transition(
        Step.FLUSH,
        ((CSTS.SHST, ShutdownStatus.COMPLETE),),
        trace="pci_nvme_mmio_shutdown_set",
        failure="flush on shutdown failed: ",
    ),
    Event.SHUTDOWN_CLEARED: Transition(
        None, ((CSTS.SHST, ShutdownStatus.NORMAL),), trace="pci_nvme_mmio_shutdown_cleared"
    ),
    Event.SUBSYSTEM_RESET: Transition(
        None, ((CSTS.NSSRO, 1),), clear=True, via=Event.DISABLE, announce="pci_nvme_nssr"
    ),
    Event.RESET: Transition(None, (), clear=True, registers=True, via=Event.DISABLE),
    Event.FATAL: Transition(Step.HALT, ((CSTS.CFS, 1),), trace="pci_nvme_err_fatal", report=True),
}


def cc_events(old: int, new: int) -> list[tuple[Event, tuple[int, ...]]]:
    """The events a CC write from ``old`` to ``new`` makes, in order (CC.EN, then CC.SHN), with
    the arguments their trace events take."""
    events: list[tuple[Event, tuple[int, ...]]] = []
    was_enabled, enabled = CC.EN.get(old), CC.EN.get(new)
    if enabled and not was_enabled:
        events.append((Event.ENABLE, ()))
    elif was_enabled and not enabled:
        events.append((Event.DISABLE, ()))
    old_shn, shn = CC.SHN.get(old), CC.SHN.get(new)
    if shn and not old_shn:
        events.append((Event.SHUTDOWN, (shn,)))
    elif old_shn and not shn:
        events.append((Event.SHUTDOWN_CLEARED, ()))
    return events


def enable_refusal(cc: int, cap: int, aqa: int, asq: int, acq: int) -> str | None:
    """Why CC.EN 0 -> 1 cannot succeed with these register values (§7.6.1), or None."""
    mps = CC.MPS.get(cc)
    asqs, acqs = AQA.ASQS.get(aqa) + 1, AQA.ACQS.get(aqa) + 1
    if not CAP.MPSMIN.get(cap) <= mps <= CAP.MPSMAX.get(cap):
        return f"CC.MPS {mps} outside CAP.MPSMIN..MPSMAX"
    if CC.CSS.get(cc) != 0:
        return f"CC.CSS {CC.CSS.get(cc)} is not the NVM command set"
    if CC.AMS.get(cc) != 0:
        return f"CC.AMS {CC.AMS.get(cc)}: only round robin arbitration is supported"
    if asqs < 2 or acqs < 2:
        return "AQA: admin queues need at least 2 entries"
    if asqs > ADMIN_QUEUE_MAX or acqs > ADMIN_QUEUE_MAX:
        return f"AQA: admin queue larger than {ADMIN_QUEUE_MAX} entries"
    page = page_size(mps)
    if asq & (page - 1) or acq & (page - 1):
        return "ASQ / ACQ not aligned to the memory page size"
    return None
