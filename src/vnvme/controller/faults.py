"""Fault injection for users: per-namespace hooks that delay, fail or media-error I/O commands.

A *fault hook* is any callable that takes the :class:`IoCommand` about to run on its namespace
and returns ``None`` (run it normally) or a fault:

- :class:`Delay`: the command runs now and its completion is posted ``seconds`` later. The core
  never sleeps: the held completion is a deadline that :meth:`Controller.next_deadline` reports
  and that :meth:`Controller.process` honours once its ``now`` reaches it. With ``then``, the
  command does not run and completes late with that fault instead.
- :class:`Fail`: the command does not run; it completes with the chosen status (an Error
  Information log entry is recorded, as for every failed command).
- :class:`MediaError`: the command does not run, so no data moves and the medium is not
  touched; it completes with Unrecovered Read Error (02h/81h, Read and Compare) or Write Fault
  (02h/80h, every command that writes), with an Error Information log entry naming the LBA
  (NVMe 1.3 §5.14.1.1) and the SMART Media and Data Integrity Errors count raised. Media errors
  degrade NVM subsystem reliability (SMART Critical Warning bit 2, §5.14.1.2): the first one
  raises a SMART / Health Status Asynchronous Event, info NVM subsystem reliability (00h), log
  page 02h (§5.2), if the host enabled bit 2 in Asynchronous Event Configuration (§5.21.1.11);
  see :meth:`Controller.count_media_error`, which backend media errors go through too. Not an
  Error status event: its Persistent / Transient Internal Error infos are the controller's own
  failures, not a command's media error, which its completion and Error Information entry report.

A Flush of every namespace (NSID FFFFFFFFh, §6.8) meets each namespace's hook for its part,
shown an :class:`IoCommand` of that namespace; every part runs, the first failing one (in NSID
order) gives the command's status and Error Information entry (naming its namespace), and a
part's Delay holds the one completion (the longest delay wins).

From Python::

    from vnvme.controller.faults import Fail, MediaError, IoCommand, set_fault_hook

    def hook(command: IoCommand) -> MediaError | None:
        return MediaError() if command.is_read and command.covers(100) else None

    Namespace(1, RamBackend(1 << 30), fault_hook=hook)   # or, on a live controller:
    set_fault_hook(controller, 1, hook)

From ``vnvme serve``: ``--fault SPEC`` (repeatable) or ``fault = [SPEC, ...]`` in the TOML file;
see :func:`parse_fault_rule` for SPEC. A held (delayed) command is still owed a completion:
deleting its SQ aborts it with Command Aborted due to SQ Deletion, posted to its CQ before the
Delete I/O Submission Queue command completes (§5.6); a controller reset or fatal status drops
it, as nothing is posted after either (§7.3.2, §9.5). A hook that raises fails its command with
Internal Error (the exception is logged), like any emulator bug.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from vnvme.controller import nvm
from vnvme.controller.errors import CommandFailed
from vnvme.controller.transfer import CDW10, CDW11, CDW12, CID, NSID, OPC
from vnvme.memory import GuestMemoryError
from vnvme.spec.commands import NSID_BROADCAST, NvmOpcode
from vnvme.spec.status import DNR, Status

if TYPE_CHECKING:
    from vnvme.controller.context import IoContext
    from vnvme.controller.controller import Controller
    from vnvme.controller.namespace import Namespace
    from vnvme.controller.queues import SubmissionQueue

# Commands whose CDW10-12 are SLBA and NLB.
_RANGED: Final = frozenset({NvmOpcode.READ, NvmOpcode.WRITE, NvmOpcode.COMPARE, NvmOpcode.WRITE_ZEROES})
_READS: Final = frozenset({NvmOpcode.READ, NvmOpcode.COMPARE})
_OPCODE_NAMES: Final[dict[str, int]] = {
    "read": NvmOpcode.READ,
    "write": NvmOpcode.WRITE,
    "flush": NvmOpcode.FLUSH,
    "compare": NvmOpcode.COMPARE,
    "write-zeroes": NvmOpcode.WRITE_ZEROES,
    "dsm": NvmOpcode.DATASET_MANAGEMENT,
}


@dataclass(frozen=True, slots=True)
class IoCommand:
    """What a fault hook is shown of an I/O command (its namespace's view, zero-based SLBA)."""

    opcode: int
    nsid: int
    #: First LBA and number of LBAs for Read, Write, Compare, Write Zeroes; 0 and 0 otherwise.
    slba: int
    nlb: int
    sqid: int
    cid: int

    @property
    def is_read(self) -> bool:
        return self.opcode in _READS

    def covers(self, lba: int) -> bool:
        return self.slba <= lba < self.slba + self.nlb

    def overlaps(self, first: int, last: int) -> bool:
        return self.nlb > 0 and self.slba <= last and first < self.slba + self.nlb


@dataclass(frozen=True, slots=True)
class Fail:
    """Complete with ``status``: ``(SCT << 8) | SC``, plus ``DNR`` (bit 14) / More (bit 13)."""

    status: int

    def __post_init__(self) -> None:
        if not 0 < self.status < 1 << 15:
            raise ValueError(f"status {self.status:#x}: not a non-zero 15-bit status field")


@dataclass(frozen=True, slots=True)
class MediaError:
    """Report a media error without touching data. ``lba``: the LBA named in the Error
    Information log entry (default: the command's first LBA). ``dnr``: set Do Not Retry."""

    lba: int | None = None
    dnr: bool = False


@dataclass(frozen=True, slots=True)
class Delay:
    """Post the completion ``seconds`` after the command was fetched (see the module doc)."""

    seconds: float
    then: Fail | MediaError | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.seconds) and self.seconds >= 0):
            raise ValueError(f"delay {self.seconds!r}: not a finite number of seconds >= 0")


Fault = Delay | Fail | MediaError
FaultHook = Callable[[IoCommand], Fault | None]
Handler = nvm.Handler


# Section: held completions


@dataclass(order=True, slots=True)
class _Held:
    deadline: float
    seq: int
    sq: SubmissionQueue = field(compare=False)
    cid: int = field(compare=False)
    status: int = field(compare=False)
    dw0: int = field(compare=False)
    nsid: int = field(compare=False)
    lba: int = field(compare=False)


class DelayedCompletions:
    """Completions a :class:`Delay` holds back, earliest deadline first."""

    def __init__(self) -> None:
        #: Earliest deadline first (a heap). The controller tests this list, not the object,
        #: for anything held: a list's truth costs no Python-level call (three times per I/O).
        self.held: list[_Held] = []
        self._seq = 0
        #: Held completions dropped by a controller reset or fatal status (nothing is posted
        #: after either).
        self.dropped = 0

    def __bool__(self) -> bool:
        return bool(self.held)

    def __len__(self) -> int:
        return len(self.held)

    def hold(
        self, deadline: float, sq: SubmissionQueue, cid: int, status: int, dw0: int, nsid: int, lba: int
    ) -> None:
        self._seq += 1
        heapq.heappush(self.held, _Held(deadline, self._seq, sq, cid, status, dw0, nsid, lba))

    def earliest(self) -> float | None:
        return self.held[0].deadline if self.held else None

    def post_due(self, ctrl: IoContext, now: float) -> None:
        """Post every held completion whose deadline ``now`` has reached (their queues are
        live: a deleted queue's are aborted, a reset drops them all)."""
        heap = self.held
        while heap and heap[0].deadline <= now and not ctrl.fatal:
            held = heapq.heappop(heap)
            _complete(ctrl, held.sq, held.cid, held.status, held.dw0, held.nsid, held.lba)

    def abort(self, ctrl: IoContext, sq: SubmissionQueue, cid: int | None, status: int) -> int:
        """Complete the held completions of ``sq`` (only ``cid``'s if given) now, with
        ``status`` instead of their own, in the order they were due; returns how many. An
        aborted command is not in error, so no Error Information entry (as for an aborted AER)."""
        taken: list[_Held] = []
        kept: list[_Held] = []
        for held in self.held:
            (taken if held.sq is sq and cid in (None, held.cid) else kept).append(held)
        if not taken:
            return 0
        heapq.heapify(kept)
        self.held[:] = kept  # in place: one list for the object's life
        for held in sorted(taken):
            ctrl.post_completion(sq, held.cid, status, 0)
        return len(taken)

    def clear(self) -> None:
        self.dropped += len(self.held)
        self.held.clear()


def _complete(
    ctrl: IoContext, sq: SubmissionQueue, cid: int, status: int, dw0: int, nsid: int, lba: int
) -> None:
    if status:
        ctrl.record_error(sq.sqid, cid, status, nsid, lba=lba)
    ctrl.post_completion(sq, cid, status, dw0)


# Section: running a command under a hook


def _outcome(ctrl: IoContext, command: IoCommand, fault: Fail | MediaError) -> tuple[int, int]:
    """Status and Error Information LBA of a command that does not run."""
    if isinstance(fault, Fail):
        return fault.status, 0
    ctrl.count_media_error()
    status = Status.UNRECOVERED_READ_ERROR if command.is_read else Status.WRITE_FAULT
    return status | (DNR if fault.dnr else 0), command.slba if fault.lba is None else fault.lba


def _run_now(handler: Handler, ctrl: IoContext, sq: SubmissionQueue, fields: tuple[int, ...]) -> int:
    """Run the command for a delayed completion; its status (as the controller would set it)."""
    try:
        result = handler(ctrl, sq, fields)
    except CommandFailed as failure:
        return failure.status
    except GuestMemoryError:
        return Status.DATA_TRANSFER_ERROR | DNR
    return 0 if result is None else result[0]


def _io_command(sq: SubmissionQueue, fields: tuple[int, ...]) -> IoCommand:
    opcode = fields[OPC]
    ranged = opcode in _RANGED
    return IoCommand(
        opcode,
        fields[NSID],
        fields[CDW10] | (fields[CDW11] << 32) if ranged else 0,
        (fields[CDW12] & 0xFFFF) + 1 if ranged else 0,
        sq.sqid,
        fields[CID],
    )


def _apply(
    handler: Handler,
    ctrl: IoContext,
    sq: SubmissionQueue,
    fields: tuple[int, ...],
    command: IoCommand,
    fault: Fault,
) -> tuple[int, int, float | None]:
    """Status, Error Information LBA and delay (None: none) of a command given ``fault``."""
    if ctrl.tracing:
        ctrl.trace("pci_nvme_fault_injected", command.cid, sq.sqid, command.nsid, repr(fault))
    if isinstance(fault, Delay):
        if fault.then is None:
            return _run_now(handler, ctrl, sq, fields), 0, fault.seconds
        status, lba = _outcome(ctrl, command, fault.then)
        return status, lba, fault.seconds
    status, lba = _outcome(ctrl, command, fault)
    return status, lba, None


def _with_faults(handler: Handler) -> Handler:
    def run(ctrl: IoContext, sq: SubmissionQueue, fields: tuple[int, ...]) -> nvm.Result:
        ns = ctrl.namespaces.get(fields[NSID])
        hook = None if ns is None else ns.fault_hook
        if hook is None:
            return handler(ctrl, sq, fields)
        command = _io_command(sq, fields)
        fault = hook(command)
        if fault is None:
            return handler(ctrl, sq, fields)
        status, lba, delay = _apply(handler, ctrl, sq, fields, command, fault)
        if delay is None:
            _complete(ctrl, sq, command.cid, status, 0, command.nsid, lba)
        else:  # the deadline counts from the `now` of the pass that fetched the command
            ctrl.delayed.hold(ctrl.now + delay, sq, command.cid, status, 0, command.nsid, lba)
        return None

    return run


def _broadcast_flush(
    handler: Handler, ctrl: IoContext, sq: SubmissionQueue, fields: tuple[int, ...]
) -> nvm.Result:
    """Flush of every namespace (NSID FFFFFFFFh, §6.8): each namespace's part meets its own
    hook, as a Flush of that namespace alone would. The parts fold into the one completion as
    :func:`nvm.flush_each` says (every part runs; the first failing one, in NSID order, gives
    the status and the Error Information entry, naming its namespace); a part's Delay holds
    the completion, which is posted once the longest of them has passed."""
    delays: list[float] = []

    def part(ns: Namespace) -> None:
        part_fields = (*fields[:NSID], ns.nsid, *fields[NSID + 1 :])
        command = _io_command(sq, part_fields)
        fault = None if ns.fault_hook is None else ns.fault_hook(command)
        if fault is None:
            handler(ctrl, sq, part_fields)
            return
        status, lba, delay = _apply(handler, ctrl, sq, part_fields, command, fault)
        if delay is not None:
            delays.append(delay)
        if status:
            raise CommandFailed(status, f"namespace {ns.nsid}: {fault!r}", nsid=ns.nsid, lba=lba)

    status = nsid = lba = 0
    try:
        nvm.flush_each(ctrl, part)
    except CommandFailed as failure:
        if not delays:
            raise
        status, nsid, lba = failure.status, failure.nsid or 0, failure.lba
    if not delays:
        return 0, 0
    ctrl.delayed.hold(ctrl.now + max(delays), sq, fields[CID], status, 0, nsid, lba)
    return None


def _flush_with_faults(handler: Handler) -> Handler:
    single = _with_faults(handler)

    def run(ctrl: IoContext, sq: SubmissionQueue, fields: tuple[int, ...]) -> nvm.Result:
        if fields[NSID] == NSID_BROADCAST:
            return _broadcast_flush(handler, ctrl, sq, fields)
        return single(ctrl, sq, fields)

    return run


def io_handlers(namespaces: Iterable[Namespace]) -> Mapping[int, Handler]:
    """The I/O command table: the plain one, or hooked handlers if any namespace has a hook (a
    controller whose namespaces have none pays nothing for this module)."""
    if not any(ns.fault_hook is not None for ns in namespaces):
        return nvm.IO_HANDLERS
    return {
        opcode: (_flush_with_faults if opcode == NvmOpcode.FLUSH else _with_faults)(handler)
        for opcode, handler in nvm.IO_HANDLERS.items()
    }


def set_fault_hook(ctrl: Controller, nsid: int, hook: FaultHook | None) -> None:
    """Attach (or with None, remove) the fault hook of namespace ``nsid`` of a live controller."""
    ns = ctrl.namespaces.get(nsid)
    if ns is None:
        raise KeyError(f"no namespace {nsid}")
    ns.fault_hook = hook
    ctrl.io_handlers = io_handlers(ctrl.namespaces.values())


# Section: rules (vnvme serve)


@dataclass
class FaultRule:
    """A declarative hook: commands that match get ``fault``.

    Matching: ``nsid`` (None: every namespace), ``opcodes`` (None: every I/O command), ``lbas``
    (first, last inclusive; the command's range must overlap it, so it never matches Flush or
    Dataset Management); then the first ``after`` matches pass untouched and the next ``count``
    (None: all) get the fault.
    """

    fault: Fault
    nsid: int | None = None
    opcodes: frozenset[int] | None = None
    lbas: tuple[int, int] | None = None
    after: int = 0
    count: int | None = None
    matched: int = field(default=0, compare=False)

    def applies(self, command: IoCommand) -> bool:
        if self.nsid is not None and command.nsid != self.nsid:
            return False
        if self.opcodes is not None and command.opcode not in self.opcodes:
            return False
        if self.lbas is not None and not command.overlaps(*self.lbas):
            return False
        self.matched += 1
        index = self.matched - 1 - self.after
        return index >= 0 and (self.count is None or index < self.count)


class RuleHook:
    """A :data:`FaultHook` from rules; the first rule that applies gives the fault."""

    def __init__(self, rules: Sequence[FaultRule]) -> None:
        self.rules = list(rules)

    def __call__(self, command: IoCommand) -> Fault | None:
        for rule in self.rules:
            if rule.applies(command):
                return rule.fault
        return None


def _number(key: str, text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise ValueError(f"fault option {key}={text!r} is not a number") from None
    if value < 0:
        raise ValueError(f"fault option {key}={text!r} is negative")
    return value


def _fault_options(text: str) -> dict[str, str | None]:
    """``key=value`` parts (``media-error`` may stand alone), each known key at most once."""
    options: dict[str, str | None] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        key, sep, value = part.partition("=")
        key = key.strip().lower().replace("_", "-")
        if key in options:
            raise ValueError(f"fault option {key!r} given twice")
        options[key] = value.strip() if sep else None
    known = {"nsid", "op", "lba", "after", "count", "delay", "status", "media-error"}
    unknown = set(options) - known
    if unknown:
        raise ValueError(f"unknown fault option(s): {', '.join(sorted(unknown))}")
    for key in known - {"media-error"}:
        if key in options and not options[key]:
            raise ValueError(f"fault option {key!r} needs a value")
    return options


def _fault(options: dict[str, str | None]) -> Fault:
    """The fault the options name: a delay (then maybe a failure), a status or a media error."""
    then: Fail | MediaError | None = None
    if "status" in options and "media-error" in options:
        raise ValueError("a fault is a status or a media error, not both")
    if "status" in options:
        then = Fail(_number("status", options["status"] or ""))
    elif "media-error" in options:
        flag = options["media-error"]
        if flag not in (None, "dnr"):
            raise ValueError(f"media-error={flag!r}: only 'dnr' may follow")
        then = MediaError(dnr=flag == "dnr")
    if "delay" in options:
        try:
            seconds = float(options["delay"] or "")
        except ValueError:
            raise ValueError(f"delay={options['delay']!r} is not a number of seconds") from None
        return Delay(seconds, then)
    if then is None:
        raise ValueError("a fault needs delay=, status= or media-error")
    return then


def parse_fault_rule(text: str) -> FaultRule:
    """``nsid=1,op=read,lba=100-199,after=2,count=1,media-error`` to a :class:`FaultRule`.

    Keys: ``nsid``; ``op`` (read, write, flush, compare, write-zeroes, dsm or an opcode number;
    several joined by ``+``); ``lba`` (N or FIRST-LAST); ``after``; ``count``; and the fault:
    ``delay=SECONDS`` and / or one of ``status=N`` ((SCT << 8) | SC, 0x4000 for DNR; e.g. 0x281
    is Unrecovered Read Error) or ``media-error`` (``media-error=dnr`` sets DNR).
    """
    options = _fault_options(text)
    fault = _fault(options)
    opcodes: frozenset[int] | None = None
    if options.get("op"):
        codes = set()
        for name in (options["op"] or "").lower().split("+"):
            codes.add(_OPCODE_NAMES[name] if name in _OPCODE_NAMES else _number("op", name))
        opcodes = frozenset(codes)
    lbas: tuple[int, int] | None = None
    if options.get("lba"):
        first, _, last = (options["lba"] or "").partition("-")
        lbas = (_number("lba", first), _number("lba", last or first))
        if lbas[1] < lbas[0]:
            raise ValueError(f"lba={options['lba']}: the range ends before it starts")
    return FaultRule(
        fault,
        nsid=_number("nsid", options["nsid"] or "") if options.get("nsid") else None,
        opcodes=opcodes,
        lbas=lbas,
        after=_number("after", options["after"] or "") if options.get("after") else 0,
        count=_number("count", options["count"] or "") if options.get("count") else None,
    )


def apply_rules(namespaces: Iterable[Namespace], rules: Sequence[FaultRule]) -> None:
    """Give each namespace a :class:`RuleHook` of the rules naming it (or no namespace)."""
    for ns in namespaces:
        mine = [rule for rule in rules if rule.nsid in (None, ns.nsid)]
        if mine:
            ns.fault_hook = RuleHook(mine)
