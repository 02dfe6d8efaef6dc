"""Property tests of the EventIdx arithmetic, and a stateful test of the whole protocol.

Named after what they check, in the spirit of Firecracker's proofs named after spec clauses.
"""

from __future__ import annotations

import hypothesis.strategies as st
from hypothesis import given
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from host import Rig, make_rig
from vnvme.controller.config import ControllerConfig, CqEventIdxPolicy, SqEventIdxPolicy
from vnvme.controller.doorbells import Doorbells, QueueDoorbell
from vnvme.controller.namespace import Namespace, NullBackend
from vnvme.driver.driver import QueuePair
from vnvme.fence import full_fence
from vnvme.spec.commands import NvmOpcode
from vnvme.spec.dbbuf import (
    cq_slot,
    max_qid_in_page,
    need_event,
    never_crossed,
    rearm_event_idx,
    slot_queue,
    sq_slot,
)
from vnvme.spec.registers import DOORBELL_BASE, decode_doorbell

u16 = st.integers(0, 0xFFFF)


def crossed_model(event_idx: int, new: int, old: int) -> bool:
    """Walk the doorbell from ``old`` to ``new`` one step at a time (mod 2^16): did a step leave
    ``event_idx``? That is what "the update crossed EventIdx" means."""
    position = old
    while position != new:
        if position == event_idx:
            return True
        position = (position + 1) & 0xFFFF
    return False


@given(u16, u16, st.integers(0, 300))
def test_need_event_matches_the_walk_model(event_idx: int, old: int, step: int) -> None:
    new = (old + step) & 0xFFFF
    assert need_event(event_idx, new, old) == crossed_model(event_idx, new, old)


@given(u16, u16, u16)
def test_need_event_is_the_half_open_interval(event_idx: int, new: int, old: int) -> None:
    inside = (event_idx - old) & 0xFFFF < (new - old) & 0xFFFF
    assert need_event(event_idx, new, old) == inside


@given(st.data(), st.integers(2, 65536))
def test_never_crossed_value_is_never_crossed_in_a_queue(data: st.DataObject, size: int) -> None:
    """CQ policy NEVER: with EventIdx = head - 1 the host, which stops at the controller's tail
    (at most head - 1), crosses nothing, over any number of laps and wraps of the queue."""
    head = data.draw(st.integers(0, size - 1), label="head the controller last read")
    posted = data.draw(st.integers(0, size - 1), label="entries posted")
    tail = (head + posted) % size
    event_idx = never_crossed(head - 1, size)
    old = head
    for _ in range(data.draw(st.integers(1, 8), label="host updates")):
        remaining = (tail - old) % size
        step = data.draw(st.integers(0, remaining))
        new = (old + step) % size
        assert not need_event(event_idx, new, old)
        old = new


@given(st.integers(2, 65536), st.data())
def test_eager_event_idx_rings_on_the_first_move(size: int, data: st.DataObject) -> None:
    """EAGER: EventIdx = the value the controller last saw, so the host's next move rings."""
    seen = data.draw(st.integers(0, size - 1))
    step = data.draw(st.integers(1, size - 1))
    assert need_event(seen, (seen + step) % size, seen)


@given(st.integers(2, 65536), st.data())
def test_rearm_event_idx_rings_exactly_past_head_plus_ahead(size: int, data: st.DataObject) -> None:
    """The two halves together: the controller publishes rearm_event_idx(head, ahead) and the
    host, moving its index m slots on from head (wrapping at the ring's size, not at 2^16),
    rings by need_event exactly when it passes head + ahead, and never for ahead = -1."""
    head = data.draw(st.integers(0, size - 1), label="head")
    ahead = data.draw(st.integers(-1, size - 2), label="ahead")
    moved = data.draw(st.integers(1, size - 1), label="slots moved")
    event_idx = rearm_event_idx(head, ahead, size)
    assert 0 <= event_idx < size
    assert need_event(event_idx, (head + moved) % size, head) == (0 <= ahead < moved)


@given(st.integers(0, 15), st.integers(0, 3000))
def test_slots_match_the_doorbell_register_layout(dstrd: int, qid: int) -> None:
    # SQ y at dword (2y) << DSTRD, CQ y at (2y + 1) << DSTRD: the BAR doorbell offsets / 4.
    stride_dwords = 1 << dstrd
    assert sq_slot(qid, dstrd) == 2 * qid * stride_dwords
    assert cq_slot(qid, dstrd) == (2 * qid + 1) * stride_dwords
    fits = cq_slot(qid, dstrd) < 1024
    assert fits == (qid <= max_qid_in_page(4096, dstrd))


@given(st.integers(0, 15), st.integers(0, 3000))
def test_a_slot_names_its_queue_as_the_doorbell_register_does(dstrd: int, qid: int) -> None:
    for slot, is_cq in ((sq_slot(qid, dstrd), False), (cq_slot(qid, dstrd), True)):
        assert slot_queue(slot, dstrd) == (qid, is_cq)
        # The shadow page mirrors the doorbell registers: dword slot <-> BAR0 1000h + 4 * slot.
        assert slot_queue(slot, dstrd) == decode_doorbell(DOORBELL_BASE + 4 * slot, dstrd)


def test_no_queue_fits_a_stride_as_large_as_the_page() -> None:
    assert max_qid_in_page(4096, 10) == -1  # queue 0's CQ slot is dword 1024
    assert max_qid_in_page(4096, 9) == 0
    assert max_qid_in_page(4096, 0) == 511


class ShadowProtocol(RuleBasedStateMachine):
    """Interleave host submissions, controller passes, reaping and rearm races, and check that no
    submitted command is ever left unprocessed while the controller is idle (no lost wake-up).

    The race that matters (sequentially consistent, no reordering needed): the host stores a new
    tail and loads EventIdx *before* the controller publishes its new EventIdx, sees the old
    value and does not ring; only the controller's re-read after its fence can find the command.
    ``host_races_the_next_publish`` arms exactly that interleaving. (A full CQ cannot happen
    here, as one SQ of the CQ's size never has more commands out than the CQ holds; that case
    has its own test in test_shadow_doorbells.py.)
    """

    POLICY = SqEventIdxPolicy.EAGER

    def __init__(self) -> None:
        super().__init__()
        self.rig: Rig = make_rig(
            namespaces=[Namespace(1, NullBackend(1 << 20), 4096)],
            config=ControllerConfig(cq_eventidx=CqEventIdxPolicy.NEVER, sq_eventidx=self.POLICY),
            io_queue_depth=8,
            trace=(),
        )
        self.qp: QueuePair = self.rig.driver.queue(1)
        self.buf = self.rig.host_memory.alloc(4096)
        self.checked = True
        self.completed = 0
        self.submitted = 0
        self.race = 0  # commands the host stores and checks just before the next publication
        self.posted: list[int] = []  # doorbell writes decided during a race, delivered later
        # Every SQ EventIdx store goes through one of these two: the host races in before it.
        self.real_store, self.real_probe = Doorbells.store_eventidx, Doorbells.probe
        machine = self

        def race(queue: QueueDoorbell) -> None:
            if queue.slot == machine.qp.sq_slot:  # I/O SQ 1
                while machine.race and machine.qp.can_submit():
                    machine.race -= 1
                    machine._store_one()
                    machine._check(deliver=False)
                machine.race = 0

        def racing_store(doorbells: Doorbells, queue: QueueDoorbell, value: int) -> None:
            race(queue)
            machine.real_store(doorbells, queue, value)

        def racing_probe(doorbells: Doorbells, queue: QueueDoorbell, value: int, size: int = 1 << 32) -> int:
            race(queue)
            return machine.real_probe(doorbells, queue, value, size)

        Doorbells.store_eventidx = racing_store  # type: ignore[method-assign,assignment]
        Doorbells.probe = racing_probe  # type: ignore[method-assign,assignment]

    def _store_one(self) -> None:
        qp = self.qp
        qp.submit(self.rig.driver.io_sqe(qp, NvmOpcode.READ, 1, 0, 1, self.buf, length=4096))
        assert qp.shadow is not None
        qp.shadow.store(qp.sq_slot, qp.sq_tail)
        self.submitted += 1
        self.checked = False

    def _check(self, *, deliver: bool) -> None:
        """The second half of Linux nvme_dbbuf_update_and_check_event, after its fence."""
        qp = self.qp
        assert qp.eventidx is not None
        full_fence()
        ring = need_event(qp.eventidx.load(qp.sq_slot), qp.sq_tail, qp.last_sq_tail)
        qp.last_sq_tail = qp.sq_tail
        self.checked = True
        if ring:
            self.posted.append(qp.sq_tail)
        if deliver:
            self._deliver_posted()

    def _deliver_posted(self) -> None:
        while self.posted:
            self.rig.transport.mmio_write(self.qp.sq_db, 4, self.posted.pop(0))

    @rule(count=st.integers(1, 3))
    def host_stores_tail(self, count: int) -> None:
        for _ in range(count):
            if self.qp.can_submit():
                self._store_one()

    @rule()
    def host_checks_event_idx(self) -> None:
        self._check(deliver=True)

    @rule(count=st.integers(1, 2))
    def host_races_the_next_publish(self, count: int) -> None:
        self.race = count

    @rule()
    def host_reaps(self) -> None:
        self.completed += len(self.qp.reap())

    @rule()
    def controller_runs(self) -> None:
        self._deliver_posted()
        self.rig.transport.device_idle()

    @rule()
    def time_passes(self) -> None:
        """The controller's clock reaches its next deadline (a BATCH prediction timing out)."""
        self._deliver_posted()
        deadline = self.rig.controller.next_deadline()
        if deadline is not None:
            self.rig.transport._handle(self.rig.controller.process(now=deadline))

    @precondition(lambda self: self.checked and not self.posted)
    @invariant()
    def no_lost_wakeup(self) -> None:
        """Every tail the host has stored and checked is fetched, unless the controller still
        has it marked pending (a lost rearm race it will pick up on its next pass) or has a
        deadline by which it will look (policy BATCH: EventIdx published ahead of the head)."""
        sq = self.rig.controller.sqs[1]
        assert sq is not None
        if self.rig.controller.has_pending_work:
            return
        if self.POLICY is SqEventIdxPolicy.BATCH and sq.deadline is not None:
            return
        assert sq.head == self.qp.sq_tail, f"controller idle at {sq.head}, host tail {self.qp.sq_tail}"

    def teardown(self) -> None:
        Doorbells.store_eventidx, Doorbells.probe = self.real_store, self.real_probe  # type: ignore[method-assign]
        # Drain: check, run and reap until every command has completed.
        self.race = 0
        for _ in range(50):
            if not self.checked:
                self._check(deliver=True)
            self.controller_runs()
            self.time_passes()
            self.host_reaps()
            if self.completed == self.submitted:
                break
        assert self.completed == self.submitted, f"{self.submitted - self.completed} never completed"
        assert not self.rig.controller.fatal
        self.rig.close()


TestShadowProtocol = ShadowProtocol.TestCase


class BatchShadowProtocol(ShadowProtocol):
    """The same interleavings with EventIdx published ahead of the head (policy BATCH)."""

    POLICY = SqEventIdxPolicy.BATCH


TestBatchShadowProtocol = BatchShadowProtocol.TestCase
