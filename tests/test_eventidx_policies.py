"""The SQ EventIdx policy interface: the controller calls a policy at its named moments and does
what the answers say (see controller/eventidx.py)."""

from __future__ import annotations

import pytest

from host import make_rig
from vnvme.bench.engine import JobSpec, run_job
from vnvme.controller.config import ControllerConfig, CqEventIdxPolicy, SqEventIdxPolicy
from vnvme.controller.eventidx import CQ_POLICIES, SQ_POLICIES, EagerSqEventIdx
from vnvme.controller.namespace import Namespace, NullBackend
from vnvme.controller.queues import CompletionQueue, SubmissionQueue
from vnvme.spec.commands import NvmOpcode
from vnvme.spec.dbbuf import rearm_event_idx


class Recording(EagerSqEventIdx):
    """EAGER, noting every moment it is told of for I/O queue 1."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.moments: list[tuple[str, int]] = []

    def attached(self, sq: SubmissionQueue) -> int:
        self.moments.append(("attached", sq.sqid))
        return super().attached(sq)

    def rang(self, sq: SubmissionQueue, now: float) -> None:
        if sq.sqid == 1:
            self.moments.append(("rang", sq.sqid))

    def ran_dry(self, sq: SubmissionQueue, processed: int, attempts: int, now: float) -> int:
        if sq.sqid == 1:
            self.moments.append(("ran_dry", processed))
        return super().ran_dry(sq, processed, attempts, now)

    def rearmed(self, sq: SubmissionQueue, ahead: int, now: float) -> float | None:
        if sq.sqid == 1:
            self.moments.append(("rearmed", ahead))
        return None

    def posted(self, cq: CompletionQueue, now: float) -> float | None:
        if cq.cqid == 1:
            self.moments.append(("posted", cq.tail))
        return None


def _rig(policy: type[EagerSqEventIdx]):  # type: ignore[no-untyped-def]
    return make_rig(namespaces=[Namespace(1, NullBackend(1 << 20), 4096)], sq_policy=policy, trace=())


def test_the_controller_tells_the_policy_each_moment() -> None:
    r = _rig(Recording)
    try:
        policy = r.controller.sq_policy
        assert isinstance(policy, Recording)
        assert ("attached", 0) in policy.moments and ("attached", 1) in policy.moments
        qp = r.driver.queue(1)
        buf = r.host_memory.alloc(4096)
        policy.moments.clear()
        for _ in range(2):
            qp.submit(r.driver.io_sqe(qp, NvmOpcode.READ, 1, 0, 1, buf, length=4096))
        qp.ring_sq()  # one doorbell for both; the controller runs at once (in-process)
        assert policy.moments == [("rang", 1), ("ran_dry", 2), ("rearmed", 0), ("posted", 2)]
        assert len(qp.reap()) == 2
    finally:
        r.close()


class Deadline(EagerSqEventIdx):
    """Asks for no doorbell until the 3rd command from the head, and to be woken 1 s later (the
    in-process transport's ``now`` is the monotonic clock)."""

    #: (sqid, commands waiting in the shadow slot) at each deadline passed
    passed: list[tuple[int, int]] = []
    #: how many deadlines to put off by another second before looking
    put_off = 0

    def ran_dry(self, sq: SubmissionQueue, processed: int, attempts: int, now: float) -> int:
        return 2 if sq.sqid == 1 else 0

    def rearmed(self, sq: SubmissionQueue, ahead: int, now: float) -> float | None:
        return now + 1.0 if ahead else None

    def deadline_passed(self, sq: SubmissionQueue, waiting: int, now: float) -> float | None:
        self.passed.append((sq.sqid, waiting))
        if Deadline.put_off:
            Deadline.put_off -= 1
            return now + 1.0
        return None


@pytest.mark.parametrize("put_off", [0, 1])
def test_a_deadline_the_policy_asks_for_wakes_the_controller_to_look(put_off: int) -> None:
    """At its deadline the policy is told what the host placed without ringing, and looks now
    or sets a later deadline (then the controller leaves the command where it is until then)."""
    Deadline.put_off = put_off
    r = _rig(Deadline)
    try:
        ctrl, qp = r.controller, r.driver.queue(1)
        buf = r.host_memory.alloc(4096)
        qp.submit(r.driver.io_sqe(qp, NvmOpcode.READ, 1, 0, 1, buf, length=4096))
        qp.ring_sq()  # EAGER EventIdx from creation: this one rings, then the policy looks ahead
        assert len(qp.reap()) == 1
        sq = ctrl.sqs[1]
        assert sq is not None and qp.eventidx is not None
        assert qp.eventidx.load(qp.sq_slot) == rearm_event_idx(sq.head, 2, sq.size)
        deadline = ctrl.next_deadline()
        assert deadline is not None
        rung = ctrl.statistics().doorbell_sq_io
        qp.submit(r.driver.io_sqe(qp, NvmOpcode.READ, 1, 0, 1, buf, length=4096))
        qp.ring_sq()  # below EventIdx: no doorbell
        assert ctrl.statistics().doorbell_sq_io == rung
        r.transport._handle(ctrl.process(now=deadline - 0.5))
        assert qp.reap() == [] and Deadline.passed == []
        r.transport._handle(ctrl.process(now=deadline))
        assert Deadline.passed == [(1, 1)]  # one command placed without a doorbell
        if put_off:
            assert qp.reap() == [] and ctrl.next_deadline() == deadline + 1.0
            r.transport._handle(ctrl.process(now=deadline + 1.0))
            assert Deadline.passed == [(1, 1), (1, 1)]
        assert len(qp.reap()) == 1  # found by looking, not by a doorbell
    finally:
        Deadline.passed.clear()
        Deadline.put_off = 0
        r.close()


def test_published_event_idx_values_are_rearm_event_idx() -> None:
    """The per-I/O sites compute EventIdx inline: they must agree with spec/dbbuf.py."""
    r = make_rig(
        namespaces=[Namespace(1, NullBackend(1 << 20), 4096)],
        config=ControllerConfig(sq_eventidx=SqEventIdxPolicy.BATCH, cq_eventidx=CqEventIdxPolicy.NEVER),
        trace=(),
    )
    try:
        qp = r.driver.queue(1)
        run_job(r.driver, JobSpec(rw="randread", iodepth=1, number_ios=5))
        sq, cq = r.controller.sqs[1], r.controller.cqs[1]
        assert sq is not None and cq is not None and qp.eventidx is not None
        assert sq.head == 5 and cq.head == 4  # the head it learnt before the last completion
        assert qp.eventidx.load(qp.sq_slot) == rearm_event_idx(5, 0, sq.size)  # a burst of 1
        assert qp.eventidx.load(qp.cq_slot) == rearm_event_idx(4, -1, cq.size)  # never crossed
    finally:
        r.close()


class Polling(EagerSqEventIdx):
    def ran_dry(self, sq: SubmissionQueue, processed: int, attempts: int, now: float) -> int:
        return -1


def test_asking_for_no_doorbell_publishes_head_minus_one_and_does_not_probe() -> None:
    r = _rig(Polling)
    try:
        ctrl, qp = r.controller, r.driver.queue(1)
        buf = r.host_memory.alloc(4096)
        qp.submit(r.driver.io_sqe(qp, NvmOpcode.READ, 1, 0, 1, buf, length=4096))
        qp.ring_sq()
        assert len(qp.reap()) == 1
        sq = ctrl.sqs[1]
        assert sq is not None and (sq.rearms_won, sq.rearms_lost) == (0, 0)  # no probe
        assert qp.eventidx is not None and qp.eventidx.load(qp.sq_slot) == (sq.head - 1) % sq.size
        qp.submit(r.driver.io_sqe(qp, NvmOpcode.READ, 1, 0, 1, buf, length=4096))
        rung = ctrl.statistics().doorbell_sq_io
        qp.ring_sq()
        assert ctrl.statistics().doorbell_sq_io == rung  # never crossed: the host keeps it
        r.transport._handle(ctrl.poll())
        assert len(qp.reap()) == 1
    finally:
        r.close()


def test_every_configurable_policy_has_its_class() -> None:
    assert {SQ_POLICIES[p].name for p in SqEventIdxPolicy} == set(SqEventIdxPolicy)
    assert {CQ_POLICIES[p].name for p in CqEventIdxPolicy} == set(CqEventIdxPolicy)


def test_the_configured_policies_run_io() -> None:
    for sq_policy in SqEventIdxPolicy:
        for cq_policy in CqEventIdxPolicy:
            config = ControllerConfig(sq_eventidx=sq_policy, cq_eventidx=cq_policy)
            r = make_rig(
                namespaces=[Namespace(1, NullBackend(1 << 20), 4096)],
                config=config,
                trace=(),
                controller_polls=sq_policy is SqEventIdxPolicy.POLL,
            )
            try:
                assert isinstance(r.controller.sq_policy, SQ_POLICIES[sq_policy])
                result = run_job(r.driver, JobSpec(rw="randread", iodepth=4, number_ios=64))
                assert result.ios == 64
            finally:
                r.close()


def test_a_deadline_that_passes_while_the_memory_is_unmapped_waits_for_it() -> None:
    """A client remapping memory in several messages (QEMU does) may take it away while a
    policy's deadline is outstanding: the controller's own look is no use by the host, so it
    waits for the memory instead of declaring it gone (CFS), and looks once it is back."""
    r = _rig(Deadline)
    try:
        ctrl, qp, memory = r.controller, r.driver.queue(1), r.host_memory
        buf = memory.alloc(4096)
        qp.submit(r.driver.io_sqe(qp, NvmOpcode.READ, 1, 0, 1, buf, length=4096))
        qp.ring_sq()
        assert len(qp.reap()) == 1
        deadline = ctrl.next_deadline()
        assert deadline is not None
        qp.submit(r.driver.io_sqe(qp, NvmOpcode.READ, 1, 0, 1, buf, length=4096))
        qp.ring_sq()  # below EventIdx: only the deadline will find it
        ctrl.memory.unmap(memory.base, memory.size)
        r.transport._handle(ctrl.memory_changed())
        assert ctrl.next_deadline() is None  # nothing can run: no busy wake-ups meanwhile
        r.transport._handle(ctrl.process(now=deadline + 1))
        assert not r.transport.fatal_reasons and Deadline.passed == []
        ctrl.memory.map(memory.base, memory.map, owner=memory)
        r.transport._handle(ctrl.memory_changed())
        assert ctrl.next_deadline() == deadline
        r.transport._handle(ctrl.process(now=deadline + 1))
        assert Deadline.passed == [(1, 1)] and not r.transport.fatal_reasons
        assert len(qp.reap()) == 1
    finally:
        Deadline.passed.clear()
        r.close()


def test_a_poll_controller_served_asleep_asks_for_doorbells_as_adaptive_does() -> None:
    """An edge whose poll window is shut serves each doorbell without polling: the POLL policy
    then publishes what the event-driven default (ADAPTIVE) would, not one doorbell a command."""

    def doorbells(policy: SqEventIdxPolicy) -> int:
        ticks = iter(range(10**9))
        r = make_rig(
            namespaces=[Namespace(1, NullBackend(1 << 20), 4096)],
            config=ControllerConfig(sq_eventidx=policy),
            trace=(),
            clock=lambda: next(ticks) * 1e-6,  # a microsecond a look: no wall clock
        )
        try:
            if policy is SqEventIdxPolicy.POLL:
                assert r.controller.rearm()  # the edge goes to sleep, as a shut window does
            return run_job(r.driver, JobSpec(rw="randread", iodepth=8, number_ios=2000)).sq_doorbells
        finally:
            r.close()

    asleep = doorbells(SqEventIdxPolicy.POLL)
    assert asleep == doorbells(SqEventIdxPolicy.ADAPTIVE)
    assert asleep < doorbells(SqEventIdxPolicy.EAGER) // 2


def test_a_poll_controller_asleep_again_does_not_judge_its_prediction_by_what_it_polled() -> None:
    """Commands taken by polling were placed without a doorbell: a prediction made asleep
    before must not be judged by them once asleep again (it would then expect that many, and a
    depth-1 host would wait for a deadline with every command)."""
    ticks = iter(range(10**9))
    r = make_rig(
        namespaces=[Namespace(1, NullBackend(1 << 20), 4096)],
        config=ControllerConfig(sq_eventidx=SqEventIdxPolicy.POLL),
        trace=(),
        clock=lambda: next(ticks) * 1e-6,
    )
    try:
        ctrl, qp = r.controller, r.driver.queue(1)
        buf = r.host_memory.alloc(4096)

        def one(polled: bool) -> None:
            qp.submit(r.driver.io_sqe(qp, NvmOpcode.READ, 1, 0, 1, buf, length=4096))
            qp.ring_sq()
            if polled:
                r.transport._handle(ctrl.poll())
            assert len(qp.reap()) == 1

        assert ctrl.rearm()  # asleep, as a shut poll window serves
        one(polled=False)  # rung; the SQ's prediction is published
        ctrl.start_polling()
        one(polled=True)  # may ring: its EventIdx was published asleep
        rung = ctrl.statistics().doorbell_sq_io
        for _ in range(19):
            one(polled=True)
        assert ctrl.statistics().doorbell_sq_io == rung  # polled: none rung
        assert ctrl.rearm()
        one(polled=False)  # asleep again: the rearm asked for the very next command
        sq = ctrl.sqs[1]
        assert sq is not None and qp.eventidx is not None
        # A depth-1 host: the next command is asked for, not a batch of the 20 polled.
        assert qp.eventidx.load(qp.sq_slot) == rearm_event_idx(sq.head, 0, sq.size)
    finally:
        r.close()
