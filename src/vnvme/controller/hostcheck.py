"""The host-protocol checker: the host's side of the NVMe queue and shadow doorbell protocol,
watched by the controller (``ControllerConfig.check_host``, ``vnvme serve --check-host``).

Every violation is a named :class:`Rule` (spec section, severity: an error only where the spec
makes it one, otherwise a warning) with a counter, its first occurrences (queue, values, the
controller's ``now``: the core has no clock) and a ``pci_nvme_host_<rule>`` trace event.

The controller is watched at a few named moments, none of which costs anything when the checker
is off: :meth:`HostChecker.install` replaces a handful of the controller's methods on that one
instance (a doorbell written, a command fetched, a completion posted, a queue created or
deleted, a pass ended) and gives it a :class:`CheckedDoorbells` (every shadow slot read and
EventIdx publication goes through ``Doorbells``). Values the controller itself refuses (a
doorbell of a missing queue, a value outside the queue, a CQ head past the posted entries, a
data pointer) are taken from the one place that refuses them, never checked a second time.

Shadow doorbell rules apply only to a queue whose host keeps its shadow slot (``slot_kept``):
Linux rings its admin queue by MMIO only, which the spec allows.

A possibly missed ring: the controller read a shadow slot whose new value crossed every
EventIdx the host could have read since the controller's previous read of that slot (the one in
force then, and the one the read itself just published, for a probe), no doorbell had come
meanwhile, and none followed within ``missed_ring_bound`` seconds. The host's rule obliges it
to ring for such a store; the controller often finds the value first (its own re-read after the
fence, a BATCH / ADAPTIVE deadline, a pass started by another queue), which is why the ring is
given the bound to arrive rather than flagged at once.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Final

from vnvme.controller.doorbells import Doorbells, QueueDoorbell
from vnvme.controller.queues import CompletionQueue, SubmissionQueue
from vnvme.spec import registers as regs
from vnvme.spec.commands import AsyncEventErrorInfo
from vnvme.spec.dbbuf import cq_slot, need_event, slot_queue, sq_slot
from vnvme.spec.status import Status

if TYPE_CHECKING:
    from vnvme.controller.controller import Controller
    from vnvme.effects import Effect


class Severity(StrEnum):
    ERROR = "error"
    WARNING = "warning"


@dataclass(frozen=True)
class Rule:
    """One thing a host must (error) or should (warning) not do. ``args`` name the values an
    occurrence records, in the order of its trace event's arguments."""

    name: str
    section: str
    severity: Severity
    args: tuple[str, ...]
    summary: str

    @property
    def event(self) -> str:
        return f"pci_nvme_host_{self.name}"


_E, _W = Severity.ERROR, Severity.WARNING

#: Every rule, in a fixed order: the C0h log page's per-rule counters follow it (append only).
RULES: Final[tuple[Rule, ...]] = (
    Rule(
        "doorbell_invalid_queue",
        "NVMe 1.3 §3.1 (SQyTDBL, CQyHDBL), §5.2 Figure 46 (Write to Invalid Doorbell Register)",
        _E,
        ("qid", "is_cq", "value"),
        "a doorbell written for a queue that does not exist (qid -1: not a doorbell offset)",
    ),
    Rule(
        "shadow_slot_invalid_queue",
        "NVMe 1.3 Doorbell Buffer Config (a slot per created queue)",
        _W,
        ("qid", "is_cq", "value"),
        "a shadow doorbell slot of a queue that does not exist changed to a non-zero value",
    ),
    Rule(
        "sq_tail_out_of_range",
        "NVMe 1.3 §4.1, §5.2 Figure 46 (Invalid Doorbell Write Value)",
        _E,
        ("sqid", "value", "size", "shadow"),
        "an SQ tail outside the queue (MMIO, or shadow 1: read from the shadow slot)",
    ),
    Rule(
        "cq_head_out_of_range",
        "NVMe 1.3 §4.1, §5.2 Figure 46 (Invalid Doorbell Write Value)",
        _E,
        ("cqid", "value", "size", "shadow"),
        "a CQ head outside the queue",
    ),
    Rule(
        "cq_head_past_tail",
        "NVMe 1.3 §4.1, §5.2 Figure 46 (remove an entry from an empty Completion Queue)",
        _E,
        ("cqid", "value", "head", "tail", "shadow"),
        "a CQ head moved past completions the controller has not posted",
    ),
    Rule(
        "sq_overrun",
        "NVMe 1.3 §4.1, §5.2 Figure 46 (add a command to a full Submission Queue)",
        _E,
        ("sqid", "value", "head", "tail", "shadow"),
        "a new SQ tail leaves fewer entries than the controller had not fetched yet "
        "(the host overwrote commands the controller has not read)",
    ),
    Rule(
        "cid_reused",
        "NVMe 1.3 §4.2 Figure 10 (CID unique within its SQ while outstanding)",
        _E,
        ("sqid", "cid", "opcode"),
        "a command identifier reused while the command that has it is still outstanding",
    ),
    Rule(
        "mmio_ahead_of_shadow",
        "NVMe 1.3 Updating Controller Doorbell Properties using a Shadow Doorbell Buffer (store the slot, then ring if EventIdx asks)",
        _W,
        ("qid", "is_cq", "value", "shadow"),
        "a trapped doorbell value ahead of the queue's shadow slot: rung without storing the slot",
    ),
    Rule(
        "ring_not_needed",
        "NVMe 1.3 Updating Controller Doorbell Properties using a Shadow Doorbell Buffer (ring only when the update crosses EventIdx)",
        _W,
        ("qid", "is_cq", "value", "old", "eventidx"),
        "a trapped doorbell no EventIdx the host could have read asked for (a wasted trap)",
    ),
    Rule(
        "ring_possibly_missed",
        "NVMe 1.3 Updating Controller Doorbell Properties using a Shadow Doorbell Buffer (ring when the update crosses EventIdx)",
        _W,
        ("qid", "is_cq", "value", "old", "eventidx"),
        "a shadow slot update that crossed EventIdx and no doorbell within the bound after",
    ),
    Rule(
        "prp_invalid",
        "NVMe 1.3 §4.3 (PRP entry offsets), §5.3-5.4 (queue base page aligned)",
        _E,
        ("sqid", "cid", "status"),
        "a PRP entry or queue base with an offset the spec forbids (status PRP Offset Invalid)",
    ),
    Rule(
        "sgl_invalid",
        "NVMe 1.3 §4.4 (SGL descriptor types, segments and length)",
        _E,
        ("sqid", "cid", "status"),
        "an SGL the spec forbids: descriptor type or subtype not supported, a misplaced or "
        "malformed segment descriptor, or a length that is not the command's",
    ),
)
RULE_INDEX: Final[dict[str, int]] = {rule.name: i for i, rule in enumerate(RULES)}

#: How long (``now`` units: seconds) a host may take to ring after a store that crossed EventIdx.
MISSED_RING_BOUND: Final = 1.0
#: First occurrences kept per rule.
FIRST_OCCURRENCES: Final = 8
#: Slots of queues that do not exist are looked at no more often than this (``now`` units).
SWEEP_INTERVAL: Final = 0.05

# Completion statuses the data-pointer walker (controller/dataptr.py) returns, by rule.
_STATUS_MASK: Final = 0x7FF  # SCT and SC, without More / DNR
_DATA_POINTER_RULES: Final[dict[int, str]] = {
    Status.PRP_OFFSET_INVALID & _STATUS_MASK: "prp_invalid",
    Status.SGL_DESCRIPTOR_TYPE_INVALID & _STATUS_MASK: "sgl_invalid",
    Status.INVALID_SGL_SEGMENT_DESCRIPTOR & _STATUS_MASK: "sgl_invalid",
    Status.DATA_SGL_LENGTH_INVALID & _STATUS_MASK: "sgl_invalid",
}


@dataclass
class Occurrence:
    qid: int
    time: float
    values: dict[str, int]


@dataclass
class RuleRecord:
    rule: Rule
    count: int = 0
    first: list[Occurrence] = field(default_factory=list)


class _Watch:
    """What the checker keeps of one queue's shadow slot (new when the queue switches onto it)."""

    __slots__ = ("queue", "last_rung", "log", "rang_since_read", "expect")

    def __init__(self, queue: SubmissionQueue | CompletionQueue, value: int, eventidx: int) -> None:
        self.queue = queue
        self.last_rung = value  # the value of the host's previous doorbell
        # Recent history, oldest first: (True, EventIdx published) and (False, slot value seen).
        self.log: deque[tuple[bool, int]] = deque([(True, eventidx), (False, value)], maxlen=_LOG)
        self.rang_since_read = False
        # (found at, value, old, eventidx) of a crossing store whose doorbell has not come yet.
        self.expect: tuple[float, int, int, int] | None = None

    def could_have_read(self, old: int, size: int, latest: int | None = None) -> list[int] | None:
        """The EventIdx values a host could have read after storing an index past ``old``: the
        one in force when the slot was last seen at or before ``old`` (the host stored past it
        later), and every one published since. Indexes are ordered back from ``latest`` (the
        slot as just read), else from the newest slot value in the log. None if the log no
        longer reaches back that far."""
        found: list[int] = []
        log = self.log
        if latest is None:
            latest = next((v for published, v in reversed(log) if not published), old)
        span = (latest - old) % size
        i = len(log) - 1
        while i >= 0:
            published, value = log[i]
            if published:
                found.append(value)
            elif (latest - value) % size >= span:
                break
            i -= 1
        else:
            return None
        while i >= 0:  # the EventIdx in force then
            published, value = log[i]
            if published:
                found.append(value)
                return found
            i -= 1
        return None


#: History kept per queue (entries of _Watch.log).
_LOG: Final = 256


Queue = SubmissionQueue | CompletionQueue


class HostChecker:
    """Counts and records the host's protocol violations for one controller."""

    def __init__(self, missed_ring_bound: float = MISSED_RING_BOUND, keep: int = FIRST_OCCURRENCES) -> None:
        self.records = [RuleRecord(rule) for rule in RULES]
        self.missed_ring_bound = missed_ring_bound
        self.keep = keep
        self.ctrl: Controller | None = None
        self.doorbells: CheckedDoorbells | None = None
        self._watches: dict[int, _Watch] = {}  # by shadow slot
        self._cids: dict[int, tuple[SubmissionQueue, set[int]]] = {}  # by sqid
        self._idle_slots: dict[int, int] = {}  # shadow slot of a missing queue -> value last seen
        self._in_doorbell = False
        self._last_sweep = float("-inf")

    # Section: results

    def count(self, name: str) -> int:
        return self.records[RULE_INDEX[name]].count

    def counts(self) -> dict[str, int]:
        """Rule name -> violations, for the rules that saw any."""
        return {r.rule.name: r.count for r in self.records if r.count}

    def totals(self) -> tuple[int, int]:
        """(errors, warnings)."""
        errors = sum(r.count for r in self.records if r.rule.severity is Severity.ERROR)
        warnings = sum(r.count for r in self.records if r.rule.severity is Severity.WARNING)
        return errors, warnings

    def report(self, now: float | None = None) -> dict[str, Any]:
        """Every rule with its count and first occurrences. With ``now``, overdue doorbells and
        missing queues' slots are looked at first (not from a signal handler: that may run in
        the middle of a controller call)."""
        if now is not None:
            self.sweep(now, force=True)
        errors, warnings = self.totals()
        return {
            "errors": errors,
            "warnings": warnings,
            "missed_ring_bound": self.missed_ring_bound,
            "rules": [
                {
                    "name": r.rule.name,
                    "severity": str(r.rule.severity),
                    "section": r.rule.section,
                    "summary": r.rule.summary,
                    "count": r.count,
                    "first": [{"qid": o.qid, "time": round(o.time, 6), **o.values} for o in r.first],
                }
                for r in self.records
            ],
        }

    # Section: recording

    def _violation(self, name: str, *values: int) -> None:
        """Rule ``name`` broken: ``values`` as its args, the first the queue's identifier."""
        record = self.records[RULE_INDEX[name]]
        record.count += 1
        ctrl = self.ctrl
        assert ctrl is not None
        if len(record.first) < self.keep:
            record.first.append(
                Occurrence(values[0], ctrl.now, dict(zip(record.rule.args, values, strict=True)))
            )
        if ctrl.tracing:
            ctrl.trace(record.rule.event, *values)

    # Section: installing the moments

    def install(self, ctrl: Controller) -> None:
        """Watch ``ctrl``: its doorbell memory and the moments, on this instance only."""
        if not hasattr(ctrl, "__dict__"):  # mypyc-compiled: no method is replaced per instance
            raise ValueError(
                "the host-protocol checker needs vnvme's pure-Python build (scripts/build_mypyc.sh --clean)"
            )
        self.ctrl = ctrl
        ctrl.doorbells = self.doorbells = CheckedDoorbells(self)
        doorbell_write = ctrl._doorbell_write
        execute = ctrl._execute
        write_cqe = ctrl._write_cqe
        invalid_doorbell = ctrl._invalid_doorbell
        process, next_deadline = ctrl.process, ctrl.next_deadline
        configure_dbbuf = ctrl.configure_dbbuf
        add_sq, add_cq, remove_sq, remove_cq = ctrl.add_sq, ctrl.add_cq, ctrl.remove_sq, ctrl.remove_cq

        def checked_doorbell_write(offset: int, value: int, *, trapped: bool = True) -> None:
            self.doorbell_written(offset, value, trapped, doorbell_write)

        def checked_execute(sq: SubmissionQueue, fields: tuple[int, ...]) -> None:
            self.command_fetched(sq, fields[2], fields[0])
            execute(sq, fields)

        def checked_write_cqe(
            cq: CompletionQueue, sq: SubmissionQueue, cid: int, status: int, dw0: int
        ) -> None:
            write_cqe(cq, sq, cid, status, dw0)
            self.completion_posted(sq, cid, status)

        def checked_invalid_doorbell(
            qid: int, is_cq: bool, value: int, info: AsyncEventErrorInfo, *, shadow: bool = False
        ) -> None:
            self.invalid_doorbell(qid, is_cq, value, info, shadow)
            invalid_doorbell(qid, is_cq, value, info, shadow=shadow)

        def checked_process(now: float | None = None, budget: int | None = None) -> list[Effect]:
            effects = process(now, budget)
            self.sweep(ctrl.now)
            return effects + ctrl.take_effects() if ctrl.tracing else effects

        def checked_next_deadline() -> float | None:
            deadline = next_deadline()
            due = self.next_due()
            return due if deadline is None or (due is not None and due < deadline) else deadline

        def checked_configure_dbbuf(shadow_addr: int, eventidx_addr: int) -> None:
            configure_dbbuf(shadow_addr, eventidx_addr)
            self._idle_slots = {slot: 0 for slot in self._missing_slots()}
            self._sweep_slots()

        def checked_add(add: Any, queue: Queue) -> None:
            add(queue)
            self._idle_slots.pop(queue.doorbell.slot, None)

        def checked_remove(remove: Any, queue: Queue) -> None:
            remove(queue)
            doorbells = ctrl.doorbells
            if doorbells.active:
                self._idle_slots[queue.doorbell.slot] = doorbells.peek(queue.doorbell)

        replaced: dict[str, Any] = {
            "_doorbell_write": checked_doorbell_write,
            "_execute": checked_execute,
            "_write_cqe": checked_write_cqe,
            "_invalid_doorbell": checked_invalid_doorbell,
            "process": checked_process,
            "next_deadline": checked_next_deadline,
            "configure_dbbuf": checked_configure_dbbuf,
            "add_sq": lambda sq: checked_add(add_sq, sq),
            "add_cq": lambda cq: checked_add(add_cq, cq),
            "remove_sq": lambda sq: checked_remove(remove_sq, sq),
            "remove_cq": lambda cq: checked_remove(remove_cq, cq),
        }
        for name, method in replaced.items():
            setattr(ctrl, name, method)

    # Section: moments

    def doorbell_written(self, offset: int, value: int, trapped: bool, handle: Any) -> None:
        """A doorbell write (trapped, or found in a mapped doorbell page): what it did to the
        queue is judged against the queue as it was before, with the slot as it is."""
        ctrl = self.ctrl
        assert ctrl is not None
        decoded = regs.decode_doorbell(offset, ctrl.dstrd)
        queue: Queue | None = None
        if decoded is not None and ctrl._ready() and not ctrl._memory_missing:
            qid, is_cq = decoded
            queues: list[Any] = ctrl.cqs if is_cq else ctrl.sqs
            queue = queues[qid] if qid < len(queues) else None
        if queue is None:
            handle(offset, value, trapped=trapped)  # a missing queue: its refusal reports it
            return
        head, tail, n = queue.head, queue.tail, queue.size
        doorbells = self.doorbells
        assert doorbells is not None
        shadow = doorbells.peek(queue.doorbell) if queue.shadow_mode and doorbells.active else -1
        watch = self._watches.get(queue.doorbell.slot)
        if 0 <= shadow < n and watch is not None and watch.queue is queue:
            watch.log.append((False, shadow))  # before what the doorbell's handling reads
        self._in_doorbell = True
        try:
            handle(offset, value, trapped=trapped)
        finally:
            self._in_doorbell = False
        if value >= n:
            return  # refused: the out-of-range rule has it
        kept = queue.shadow_mode and queue.doorbell.slot_kept
        is_sq = isinstance(queue, SubmissionQueue)
        if is_sq and not kept and (value - head) % n < (tail - head) % n:
            # MMIO is this queue's doorbell (a queue whose host keeps its slot may send stale,
            # posted values: its slot is judged when read).
            self._violation("sq_overrun", _qid(queue), value, head, tail, 0)
        if not queue.shadow_mode:
            return
        watch = self._watch(queue)
        rung = value
        if kept and trapped and shadow < n:
            # Host order runs from its previous doorbell's value: this one's is at or past it,
            # and so is the slot, later than this doorbell's value unless the host rang first
            # (a posted doorbell may arrive after the host moved on: that is no violation).
            old = watch.last_rung
            if (value - old) % n > (shadow - old) % n:
                self._violation("mmio_ahead_of_shadow", _qid(queue), int(not is_sq), value, shadow)
                rung = shadow  # where the host's index really is: its next store moves from there
            elif value == shadow:
                # Judged only while the slot still holds the rung value: a doorbell the host has
                # moved on from (posted, arriving late) was once taken for wasted under load
                # (a CI run: 12 of them from our clean driver), so what its host read is not
                # reconstructed. Ordered from the newest slot value seen: handling the doorbell
                # may have read one past ``shadow`` already.
                seen = watch.could_have_read(old, n)
                if seen is not None and not any(need_event(e, value, old) for e in seen):
                    self._violation("ring_not_needed", _qid(queue), int(not is_sq), value, old, seen[0])
        watch.last_rung = rung
        watch.rang_since_read = True
        self._overdue(watch, ctrl.now)  # a ring past the bound (register writes carry no time)
        watch.expect = None

    def slot_read(self, queue_doorbell: QueueDoorbell, value: int, published: int | None) -> None:
        """The controller read a shadow slot (``published``: the EventIdx a probe stored just
        before)."""
        queue = self._queue(queue_doorbell)
        if queue is None or not queue.shadow_mode:
            return
        watch = self._watch(queue)
        log = watch.log
        if published is not None:
            log.append((True, published))
        n = queue.size
        if value >= n:
            return
        try:
            if not queue.doorbell.slot_kept:
                return
            is_sq = isinstance(queue, SubmissionQueue)
            old = queue.tail if is_sq else queue.head
            if is_sq and (value - queue.head) % n < (old - queue.head) % n:
                self._violation("sq_overrun", _qid(queue), value, queue.head, old, 1)
            if self._in_doorbell:
                return  # the ring is here
            rang, watch.rang_since_read = watch.rang_since_read, False
            if rang or value == old or watch.expect is not None:
                return
            seen = watch.could_have_read(old, n, value)
            if seen and all(need_event(e, value, old) for e in seen):
                ctrl = self.ctrl
                assert ctrl is not None
                watch.expect = (ctrl.now, value, old, seen[0])
        finally:
            log.append((False, value))

    def eventidx_published(self, queue_doorbell: QueueDoorbell, value: int) -> None:
        queue = self._queue(queue_doorbell)
        if queue is not None:
            self._watch(queue).log.append((True, value))

    def slot_taken(self, queue_doorbell: QueueDoorbell, value: int) -> None:
        """A queue switched onto its shadow slot, which holds ``value``."""
        queue = self._queue(queue_doorbell)
        if queue is not None:
            eventidx = self.doorbells.published(queue_doorbell) if self.doorbells is not None else 0
            self._watches[queue_doorbell.slot] = _Watch(queue, value, eventidx)

    def command_fetched(self, sq: SubmissionQueue, cid: int, opcode: int) -> None:
        entry = self._cids.get(sq.sqid)
        if entry is None or entry[0] is not sq:
            entry = self._cids[sq.sqid] = (sq, set())
        outstanding = entry[1]
        if cid in outstanding:
            self._violation("cid_reused", sq.sqid, cid, opcode)
        else:
            outstanding.add(cid)

    def completion_posted(self, sq: SubmissionQueue, cid: int, status: int) -> None:
        entry = self._cids.get(sq.sqid)
        if entry is not None and entry[0] is sq:
            entry[1].discard(cid)
        if status:
            rule = _DATA_POINTER_RULES.get(status & _STATUS_MASK)
            if rule is not None:
                self._violation(rule, sq.sqid, cid, status)

    def invalid_doorbell(
        self, qid: int, is_cq: bool, value: int, info: AsyncEventErrorInfo, shadow: bool
    ) -> None:
        """The controller refused a doorbell value or register (its rules, named here)."""
        ctrl = self.ctrl
        assert ctrl is not None
        if info is AsyncEventErrorInfo.INVALID_DOORBELL_REGISTER:
            self._violation("doorbell_invalid_queue", qid, int(is_cq), value)
            return
        queue = (ctrl.cqs if is_cq else ctrl.sqs)[qid]
        if queue is None:
            return
        if value >= queue.size:
            name = "cq_head_out_of_range" if is_cq else "sq_tail_out_of_range"
            self._violation(name, qid, value, queue.size, int(shadow))
        elif is_cq:
            self._violation("cq_head_past_tail", qid, value, queue.head, queue.tail, int(shadow))

    def next_due(self) -> float | None:
        """When the earliest awaited doorbell passes its bound: the edge runs a pass then, so an
        idle controller still reports it."""
        due = [w.expect[0] + self.missed_ring_bound for w in self._watches.values() if w.expect is not None]
        return min(due, default=None)

    def sweep(self, now: float, *, force: bool = False) -> None:
        """Doorbells overdue past the bound, and slots of missing queues (every
        :data:`SWEEP_INTERVAL` at most, unless ``force``)."""
        ctrl = self.ctrl
        assert ctrl is not None
        for slot, watch in list(self._watches.items()):
            queue = watch.queue
            if self._queue_at(slot) is not queue:
                del self._watches[slot]
                continue
            self._overdue(watch, now)
        if force or now - self._last_sweep >= SWEEP_INTERVAL:
            self._last_sweep = now
            self._sweep_slots()

    # Section: helpers

    def _overdue(self, watch: _Watch, now: float) -> None:
        """Report the crossing store ``watch`` waits on if its ring is past the bound."""
        expect = watch.expect
        if expect is not None and now - expect[0] >= self.missed_ring_bound:
            watch.expect = None
            _, value, old, eventidx = expect
            is_cq = isinstance(watch.queue, CompletionQueue)
            self._violation("ring_possibly_missed", _qid(watch.queue), int(is_cq), value, old, eventidx)

    def _sweep_slots(self) -> None:
        ctrl = self.ctrl
        assert ctrl is not None
        doorbells = ctrl.doorbells
        if not doorbells.active or not ctrl._ready() or ctrl._memory_missing:
            return
        for slot, last in self._idle_slots.items():
            value = doorbells.peek(QueueDoorbell(slot))
            if value != last:
                self._idle_slots[slot] = value
                if value:
                    qid, is_cq = slot_queue(slot, ctrl.dstrd)
                    self._violation("shadow_slot_invalid_queue", qid, int(is_cq), value)

    def _missing_slots(self) -> list[int]:
        ctrl = self.ctrl
        assert ctrl is not None
        out = []
        for qid in range(len(ctrl.sqs)):
            if ctrl.sqs[qid] is None:
                out.append(sq_slot(qid, ctrl.dstrd))
            if ctrl.cqs[qid] is None:
                out.append(cq_slot(qid, ctrl.dstrd))
        return out

    def _queue_at(self, slot: int) -> Queue | None:
        ctrl = self.ctrl
        assert ctrl is not None
        qid, is_cq = slot_queue(slot, ctrl.dstrd)
        queues: list[Any] = ctrl.cqs if is_cq else ctrl.sqs
        return queues[qid] if qid < len(queues) else None

    def _queue(self, queue_doorbell: QueueDoorbell) -> Queue | None:
        queue = self._queue_at(queue_doorbell.slot)
        return queue if queue is not None and queue.doorbell is queue_doorbell else None

    def _watch(self, queue: Queue) -> _Watch:
        slot = queue.doorbell.slot
        watch = self._watches.get(slot)
        if watch is None or watch.queue is not queue:
            assert self.doorbells is not None
            eventidx = self.doorbells.published(queue.doorbell)
            watch = self._watches[slot] = _Watch(queue, queue.doorbell.shadow_last, eventidx)
        return watch


def format_report(report: dict[str, Any]) -> str:
    """:meth:`HostChecker.report` as text: the totals, then each rule that saw a violation with
    its first occurrences."""
    watched = len(report["rules"])
    lines = [
        f"host check: {report['errors']} errors, {report['warnings']} warnings ({watched} rules watched)"
    ]
    for rule in report["rules"]:
        if not rule["count"]:
            continue
        lines.append(f"  {rule['severity']} {rule['name']}: {rule['count']} ({rule['section']})")
        lines.append(f"    {rule['summary']}")
        for first in rule["first"]:
            hidden = {"time", "qid"} if {"sqid", "cqid"} & first.keys() else {"time"}
            values = " ".join(
                f"{k} {v:#x}" if k == "status" else f"{k} {v}" for k, v in first.items() if k not in hidden
            )
            lines.append(f"    at {first['time']:.6f}: {values}")
    return "\n".join(lines)


def _qid(queue: Queue) -> int:
    return queue.sqid if isinstance(queue, SubmissionQueue) else queue.cqid


class CheckedDoorbells(Doorbells):
    """The controller's doorbell memory, telling the checker of every shadow slot read,
    EventIdx publication and slot taken."""

    __slots__ = ("checker", "_published")

    def __init__(self, checker: HostChecker) -> None:
        super().__init__()
        self.checker = checker
        self._published: dict[int, int] = {}

    def published(self, queue: QueueDoorbell) -> int:
        """The EventIdx last published for ``queue``."""
        return self._published.get(queue.slot, 0)

    def take(self, queue: QueueDoorbell, value: int | None) -> None:
        super().take(queue, value)
        self.checker.slot_taken(queue, queue.shadow_last)

    def load(self, queue: QueueDoorbell, size: int = 1 << 32) -> int:
        checker = self.checker
        value = super().load(queue, size)
        checker.slot_read(queue, value, None)
        return value

    def store_eventidx(self, queue: QueueDoorbell, value: int) -> None:
        super().store_eventidx(queue, value)
        self._published[queue.slot] = value
        self.checker.eventidx_published(queue, value)

    def probe(self, queue: QueueDoorbell, value: int, size: int = 1 << 32) -> int:
        tail = super().probe(queue, value, size)
        self._published[queue.slot] = value
        self.checker.slot_read(queue, tail, value)
        return tail
