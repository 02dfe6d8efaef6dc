"""SQ EventIdx policy ADAPTIVE against a host that behaves as a guest under emulation does.

The host here is the driver on a virtual clock: it places the commands it has to place one at a
time, ``gap`` seconds apart, each with Linux's store / fence / need_event (a doorbell only when
the tail crosses EventIdx), and the controller runs the moment a doorbell is written (so it
finishes a command before the next one is placed, as against a guest with one vCPU). When it has
nothing left to place the host waits: for an interrupt, or, if none can come until a deadline
of the controller's, until that deadline. Every completion it reaps it replaces (fio's closed
loop). Doorbell counts are the controller's; time is the virtual clock's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import pytest

from host import Rig, make_rig
from vnvme.controller.config import ControllerConfig, SqEventIdxPolicy
from vnvme.controller.eventidx import AdaptiveSqEventIdx
from vnvme.controller.namespace import Namespace, NullBackend
from vnvme.controller.queues import SubmissionQueue
from vnvme.driver.driver import QueuePair
from vnvme.spec.commands import NvmOpcode, Sqe
from vnvme.spec.log_pages import (
    VNVME_COUNTERS,
    VNVME_COUNTERS_LID,
    VNVME_QUEUE_ROW,
    VNVME_QUEUE_ROWS_OFFSET,
)

GAP = 150e-6  # a TCG guest places a command every 100-300 us


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Run:
    ios: int
    sq_doorbells: int  # over the measured part (after the warm-up)
    elapsed: float
    met: int
    missed: int
    offers: int

    @property
    def doorbells_per_io(self) -> float:
        return self.sq_doorbells / self.ios


def virtual_rig(clock: Clock, policy: SqEventIdxPolicy, io_queues: int = 1) -> Rig:
    """A controller with SQ policy ``policy`` on ``clock``, a null namespace, our driver."""
    return make_rig(
        namespaces=[Namespace(1, NullBackend(1 << 20), 4096)],
        config=ControllerConfig(sq_eventidx=policy),
        trace=(),
        clock=clock,
        io_queues=io_queues,
    )


def queue_and_read(rig: Rig) -> tuple[QueuePair, Sqe]:
    """I/O queue 1 and a 4 KiB read of LBA 0 for it: the command every host here places."""
    qp = rig.driver.queue(1)
    buf = rig.host_memory.alloc(4096)
    return qp, rig.driver.io_sqe(qp, NvmOpcode.READ, 1, 0, 1, buf, length=4096)


def host_round(rig: Rig, qp: QueuePair, sqe: Sqe, clock: Clock, gaps: list[float]) -> int:
    """The host places one command after each of ``gaps`` (seconds), with Linux's need_event,
    then waits until it has reaped at least one completion; returns how many it reaped. The
    controller runs the moment a doorbell is written, and on its deadline once that passes."""
    ctrl = rig.controller
    reaped = 0
    for gap in gaps:
        clock.now += gap
        deadline = ctrl.next_deadline()
        if deadline is not None and deadline <= clock.now:
            rig.transport.device_idle()  # it looked while the host was away
        qp.submit(sqe)
        qp.ring_sq()  # the shadow tail, and a doorbell only if EventIdx is crossed
        # One vCPU takes the interrupt at once: its handler reaps (the CQ head moves),
        # and fio replaces those commands once this submission loop is done.
        cqes = qp.reap()
        if cqes:
            qp.ring_cq()
            reaped += len(cqes)
    while not reaped:
        cqes = qp.reap()
        if cqes:
            qp.ring_cq()
            return len(cqes)
        deadline = ctrl.next_deadline()
        assert deadline is not None, "the host waits for a controller that waits for nothing"
        clock.now = max(clock.now, deadline)
        rig.transport.device_idle()
    return reaped


def closed_loop(policy: SqEventIdxPolicy, depth: int, ios: int, *, warmup: int = 400) -> Run:
    clock = Clock()
    rig = virtual_rig(clock, policy)
    try:
        ctrl = rig.controller
        qp, sqe = queue_and_read(rig)
        to_place, done = depth, 0
        start_doorbells = start_time = 0.0
        while done < warmup + ios:
            if done >= warmup and not start_time:
                start_doorbells = ctrl.statistics().io_doorbell_writes
                start_time = clock.now
            reaped = host_round(rig, qp, sqe, clock, [GAP] * to_place)
            done += reaped
            to_place = reaped
        stats = ctrl.statistics()
        policy_obj = ctrl.sq_policy
        sq = ctrl.sqs[1]
        assert sq is not None
        met, missed, offers = policy_obj.counters(sq)
        return Run(
            ios=done - warmup,
            sq_doorbells=int(stats.io_doorbell_writes - start_doorbells),
            elapsed=clock.now - start_time,
            met=met,
            missed=missed,
            offers=offers,
        )
    finally:
        rig.close()


@pytest.mark.parametrize("depth", [2, 4, 8])
def test_a_host_that_places_one_command_at_a_time_is_batched_by_adaptive(depth: int) -> None:
    adaptive = closed_loop(SqEventIdxPolicy.ADAPTIVE, depth, 2000)
    batch = closed_loop(SqEventIdxPolicy.BATCH, depth, 2000)
    # BATCH never predicts more than the bursts it sees, all 1 here: a doorbell per command.
    assert batch.doorbells_per_io > 0.9
    # ADAPTIVE offers larger batches until the host's whole depth goes in one: 1/depth, and
    # fewer doorbells cost no time (the controller waits for commands the host is placing).
    assert adaptive.doorbells_per_io <= 1 / depth + 0.01
    assert adaptive.elapsed <= batch.elapsed * 1.02
    # Past the host's depth an offer cannot be filled: each costs one wait, and doubles the
    # patience before the next (4, 8, ..., 1024 predictions met).
    assert adaptive.missed <= adaptive.offers <= 12


def test_adaptive_offers_a_depth_1_host_larger_batches_ever_more_rarely() -> None:
    run = closed_loop(SqEventIdxPolicy.ADAPTIVE, 1, 4000)
    eager = closed_loop(SqEventIdxPolicy.EAGER, 1, 4000)
    assert run.doorbells_per_io > 0.99  # nothing to batch
    # Each offer the host could not fill cost one wait, and doubled the patience before the next.
    assert run.missed == run.offers
    assert run.offers <= 12  # 4 + 8 + 16 + ... + 1024 predictions met between offers
    assert run.elapsed <= eager.elapsed * 1.05


def test_predictions_and_interrupts_are_counted_per_queue_and_in_the_c0h_page() -> None:
    clock = Clock()
    rig = virtual_rig(clock, SqEventIdxPolicy.ADAPTIVE, io_queues=2)
    try:
        driver, ctrl = rig.driver, rig.controller
        buf = rig.host_memory.alloc(4096)
        for qid, batches in ((1, 40), (2, 3)):
            qp = driver.queue(qid)
            for _ in range(batches):  # 4 commands, one doorbell for them all
                for _ in range(4):
                    clock.now += GAP
                    qp.submit(driver.io_sqe(qp, NvmOpcode.READ, 1, 0, 1, buf, length=4096))
                qp.ring_sq()
                while len(qp.reap()) < 4 and (deadline := ctrl.next_deadline()) is not None:
                    clock.now = max(clock.now, deadline)
                    rig.transport.device_idle()
                qp.ring_cq()
        stats = ctrl.statistics()
        rows = {q.qid: q for q in ctrl.queue_statistics() if not q.is_cq}
        cqs = {q.qid: q for q in ctrl.queue_statistics() if q.is_cq}
        assert rows[1].predictions_met > 30 and rows[2].predictions_met + rows[2].predictions_missed >= 2
        assert stats.predictions_met == sum(q.predictions_met for q in rows.values())
        assert stats.predictions_missed == sum(q.predictions_missed for q in rows.values())
        assert stats.batch_offers == sum(q.batch_offers for q in rows.values()) > 0
        assert cqs[1].interrupts > 0 and cqs[2].interrupts > 0
        page_bytes = driver.get_log_page(VNVME_COUNTERS_LID, 512)
        page = VNVME_COUNTERS.unpack(page_bytes)
        assert page["queue_rows"] == 2
        assert (page["predictions_met"], page["predictions_missed"], page["batch_offers"]) == (
            stats.predictions_met,
            stats.predictions_missed,
            stats.batch_offers,
        )
        for i, qid in enumerate((1, 2)):
            offset = VNVME_QUEUE_ROWS_OFFSET + i * VNVME_QUEUE_ROW.size
            row = VNVME_QUEUE_ROW.unpack(page_bytes[offset : offset + VNVME_QUEUE_ROW.size])
            q = rows[qid]
            assert row["sqid"] == qid
            assert (row["commands"], row["sq_doorbells"]) == (q.entries, q.mmio_doorbell_writes)
            assert (row["predictions_met"], row["predictions_missed"], row["batch_offers"]) == (
                q.predictions_met,
                q.predictions_missed,
                q.batch_offers,
            )
            assert row["interrupts"] == cqs[qid].interrupts
    finally:
        rig.close()


def test_a_host_late_now_and_then_still_gets_larger_batches_after_a_stretch_at_depth_1() -> None:
    """A Linux guest with one vCPU measured this: fio at depth 1 first (every offer unfillable,
    the patience climbs to its cap), then at depth 8 with the guest late now and then (a miss
    every few hundred predictions). Counting met predictions in a row, no later offer came and
    the window stayed near what the host first showed (0.18-0.25 doorbells per I/O at depth 8
    there; 0.500 here, where the host is late every 97 commands)."""
    clock = Clock()
    rig = virtual_rig(clock, SqEventIdxPolicy.ADAPTIVE)
    try:
        ctrl = rig.controller
        qp, sqe = queue_and_read(rig)
        placed = 0

        def run(depth: int, ios: int, late_every: int) -> float:
            nonlocal placed
            to_place, done = depth, 0
            start = ctrl.statistics().io_doorbell_writes
            while done < ios:
                # Now and then the host is late by more than the controller waits for it.
                gaps = [GAP if (placed + i + 1) % late_every else 0.6e-3 for i in range(to_place)]
                placed += to_place
                to_place = host_round(rig, qp, sqe, clock, gaps)
                done += to_place
            return (ctrl.statistics().io_doorbell_writes - start) / done

        run(1, 3000, 1 << 30)  # every offer unfillable: the patience climbs
        sq = ctrl.sqs[1]
        assert sq is not None
        assert ctrl.sq_policy.counters(sq)[2] >= 8  # offers made, each doubling the patience
        for depth in (2, 4, 8):
            run(depth, 6000, 97)  # a miss now and then (about one in 50-100 predictions)
        # Counted in a row, the window stayed at 2 (0.500 doorbells per I/O at depth 8).
        assert run(8, 3000, 97) <= 1 / 8 + 0.03
    finally:
        rig.close()


@pytest.mark.parametrize("depth", [2, 4])
def test_a_host_late_inside_its_batch_keeps_its_batch(depth: int) -> None:
    """A guest's vCPU is now and then held up between two commands of a batch for longer than
    the controller waits (measured with a 1-vCPU Linux 6.1 guest: a batch of 2 placed in 330 us
    as a rule, now and then in more than 800). Taking the part placed then would interrupt the
    host inside its batch and split its later batches in two (there, 0.536 doorbells per I/O at
    depth 2 and 0.313 at depth 4); the controller waits for the rest instead, up to
    max_batch_wait."""
    clock = Clock()
    rig = virtual_rig(clock, SqEventIdxPolicy.ADAPTIVE)
    try:
        ctrl = rig.controller
        qp, sqe = queue_and_read(rig)
        late = 0.9e-3 if depth == 2 else 1.4e-3  # past the wait for the batch, within 2 ms
        to_place, done, rounds = depth, 0, 0
        while done < 800:  # warm-up: the window grows to the depth
            to_place = host_round(rig, qp, sqe, clock, [GAP] * to_place)
            done += to_place
        sq = ctrl.sqs[1]
        assert sq is not None
        _, missed, offers = ctrl.sq_policy.counters(sq)
        start = ctrl.statistics().io_doorbell_writes
        done = 0
        while done < 3000:
            rounds += 1
            gaps = [GAP] * to_place
            if rounds % 10 == 0 and to_place > 1:
                gaps[-1] = late  # the last command of every 10th batch comes late
            to_place = host_round(rig, qp, sqe, clock, gaps)
            done += to_place
        assert (ctrl.statistics().io_doorbell_writes - start) / done <= 1 / depth + 0.01
        # The only predictions missed are larger batches offered (past the host's depth).
        _, missed_now, offers_now = ctrl.sq_policy.counters(sq)
        assert missed_now - missed == offers_now - offers
    finally:
        rig.close()


def polled_closed_loop(depth: int, ios: int, *, warmup: int = 200) -> tuple[float, float, float]:
    """:func:`polled_rounds` on a fresh controller that polls."""
    clock = Clock()
    rig = virtual_rig(clock, SqEventIdxPolicy.POLL)
    try:
        return polled_rounds(rig, clock, depth, ios, warmup)
    finally:
        rig.close()


def polled_rounds(rig: Rig, clock: Clock, depth: int, ios: int, warmup: int) -> tuple[float, float, float]:
    """A 1-vCPU host against a controller that polls: the host places its commands GAP apart,
    the controller polls after each (so it takes each one at once), and the host reaps only
    when interrupted (its handler runs at once, inside its submission loop), replacing what it
    reaped once that loop is done. Returns interrupts, doorbells and seconds per I/O after the
    warm-up."""
    ctrl = rig.controller
    qp, sqe = queue_and_read(rig)
    seen = ctrl.interrupts.raised

    def interrupted() -> int:
        nonlocal seen
        if ctrl.interrupts.raised == seen:
            return 0
        seen = ctrl.interrupts.raised
        cqes = qp.reap()
        qp.ring_cq()
        return len(cqes)

    to_place, done = depth, 0
    start: tuple[int, int, float] | None = None
    while start is None or done < ios:
        if start is None and done >= warmup:
            start = (ctrl.interrupts.raised, ctrl.statistics().io_doorbell_writes, clock.now)
            done = 0
        reaped = 0
        for _ in range(to_place):
            clock.now += GAP
            qp.submit(sqe)
            qp.ring_sq()
            rig.transport._handle(ctrl.poll(clock.now))
            reaped += interrupted()
        while not reaped:
            deadline = ctrl.next_deadline()
            assert deadline is not None, "the host waits for an interrupt that never comes"
            clock.now = max(clock.now, deadline)
            rig.transport._handle(ctrl.poll(clock.now))
            reaped += interrupted()
        done += reaped
        to_place = reaped
    assert start is not None
    return (
        (ctrl.interrupts.raised - start[0]) / done,
        (ctrl.statistics().io_doorbell_writes - start[1]) / done,
        (clock.now - start[2]) / done,
    )


@pytest.mark.parametrize("depth", [1, 2, 8])
def test_a_polled_host_gets_one_interrupt_per_batch(depth: int) -> None:
    """Polled, each command is taken as soon as it is placed; its interrupt is held until the
    host has all its commands out again (a 1-vCPU Linux guest measured 0.94 interrupts per I/O
    at depth 8 without this), and never held for a host that keeps one out (depth 1)."""
    interrupts, doorbells, seconds = polled_closed_loop(depth, 2000)
    assert doorbells == 0
    assert interrupts <= 1 / depth + 0.01
    # The host never waits for a held interrupt beyond now and then (a larger batch offered).
    assert seconds <= GAP * 1.05


def test_a_polled_admin_queue_interrupt_is_never_held() -> None:
    """Larger holds are offered after a few completions went as predicted; the admin CQ's
    interrupt goes at once all the same (an admin command waits for nothing of the host's)."""
    clock = Clock()
    rig = virtual_rig(clock, SqEventIdxPolicy.POLL)
    try:
        driver, ctrl = rig.driver, rig.controller
        for _ in range(40):
            clock.now += GAP
            before = ctrl.interrupts.by_vector.get(0, 0)
            driver.identify_controller()
            assert ctrl.interrupts.by_vector.get(0, 0) == before + 1
            assert ctrl.next_deadline() is None
    finally:
        rig.close()


def test_the_one_command_asked_for_after_a_lost_race_leaves_the_window() -> None:
    """A lost race (the host moved the tail while EventIdx was published) asks for the host's
    very next command; that it then rings for one command says nothing of its batch. Measured
    with a 1-vCPU Linux 6.1 guest at depth 8: taking it as a batch of 1 split the host's later
    batches (0.189 doorbells per I/O; 0.127 once the window stays)."""
    rig = virtual_rig(Clock(), SqEventIdxPolicy.ADAPTIVE)
    try:
        sq = rig.controller.sqs[1]
        assert sq is not None
        _lost_race(sq)
    finally:
        rig.close()


def _lost_race(sq: SubmissionQueue) -> None:
    """The policy's moments, told by hand about an SQ of a controller that is left alone."""
    policy = AdaptiveSqEventIdx(ControllerConfig(), lambda cq: None)
    sq.doorbell.slot_kept = True
    sq.entries = 0
    policy.attached(sq)
    now = 0.0

    def host_places(n: int, processed: int, attempts: int = 0) -> int:
        nonlocal now
        now += 1e-3
        sq.entries += n
        return policy.ran_dry(sq, processed, attempts, now)

    policy.rearmed(sq, policy.ran_dry(sq, 0, 0, now), now)
    for _ in range(3):  # the host places 8 a batch (a window of 8: offered, met)
        ahead = host_places(8, 8)
        policy.rearmed(sq, ahead, now)
    assert cast(Any, sq.policy_state).window >= 8
    host_places(7, 7)  # 7 taken, EventIdx published ...
    window = cast(Any, sq.policy_state).window
    assert host_places(1, 8, attempts=1) == 0  # ... and lost: the 8th came meanwhile
    policy.rearmed(sq, 0, now)
    ahead = host_places(1, 1)  # the host's next command rings (EventIdx = head)
    assert ahead + 1 >= window  # the next prediction is the host's batch again, not 1
