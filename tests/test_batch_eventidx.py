"""SQ EventIdx policy BATCH: EventIdx published ahead of the head by the host's expected batch."""

from __future__ import annotations

import pytest

from host import make_rig
from vnvme.bench.engine import JobSpec, run_job
from vnvme.controller.config import ControllerConfig, SqEventIdxPolicy
from vnvme.controller.namespace import Namespace, NullBackend
from vnvme.spec.commands import NvmOpcode


def _rig(policy: SqEventIdxPolicy, timeout: float = 100e-6):  # type: ignore[no-untyped-def]
    return make_rig(
        namespaces=[Namespace(1, NullBackend(1 << 30), 4096)],
        config=ControllerConfig(sq_eventidx=policy, batch_timeout=timeout),
        trace=(),
    )


@pytest.mark.parametrize("iodepth", [2, 4, 8])
def test_a_closed_loop_host_rings_once_per_batch_even_placing_one_at_a_time(iodepth: int) -> None:
    counts = {}
    for policy in (SqEventIdxPolicy.EAGER, SqEventIdxPolicy.BATCH):
        r = _rig(policy)
        try:
            spec = JobSpec(rw="randread", iodepth=iodepth, number_ios=400, iodepth_batch_submit=1)
            result = run_job(r.driver, spec)
            assert result.ios == 400 and result.cq_doorbell_mmio == 0
            counts[policy] = result.sq_doorbell_mmio
        finally:
            r.close()
    # EAGER: the first command of every batch crosses EventIdx (in-process the controller is idle
    # again at once, so every command rings). BATCH: only the last of each batch does.
    assert counts[SqEventIdxPolicy.EAGER] == 400
    # (plus a few while the loop fills up at the start: the first batches are smaller)
    assert counts[SqEventIdxPolicy.BATCH] <= 400 / iodepth + iodepth


def test_a_host_placing_fewer_than_predicted_is_served_after_the_timeout() -> None:
    r = _rig(SqEventIdxPolicy.BATCH, timeout=2e-3)
    try:
        driver, ctrl = r.driver, r.controller
        qp = driver.queue(1)
        run_job(driver, JobSpec(rw="randread", iodepth=4, number_ios=64, iodepth_batch_submit=0))
        deadline = ctrl.next_deadline()
        assert deadline is not None  # a prediction is outstanding
        rung, posted = ctrl.statistics().doorbell_sq_io, ctrl.statistics().completions_posted
        cid = qp.submit(driver.io_sqe(qp, NvmOpcode.FLUSH, 1))
        qp.ring_sq()  # EventIdx lies ahead: the host keeps the new tail in memory, no MMIO
        # The controller's clock is an argument: before the deadline nothing happens...
        ctrl.process(now=deadline - 1e-6)
        assert ctrl.statistics().completions_posted == posted
        # ...at the deadline it reads the shadow tail by itself and serves the command.
        ctrl.process(now=deadline)
        assert ctrl.statistics().completions_posted == posted + 1
        assert driver._wait_cid(qp, cid).status == 0
        assert ctrl.statistics().doorbell_sq_io == rung  # no doorbell was ever rung for it
        # The host is placing commands slower than the timeout: the prediction is kept...
        renewed = ctrl.next_deadline()
        assert renewed is not None and renewed > deadline
        sq = ctrl.sqs[1]
        assert sq is not None and sq.policy_state.predicted > 0
        # ...and the first look that finds nothing publishes an exact EventIdx again.
        ctrl.process(now=renewed)
        assert ctrl.next_deadline() is None
        assert sq.policy_state.predicted == 0
        assert ctrl.statistics().completions_posted == posted + 1
    finally:
        r.close()


def test_a_host_slower_than_the_timeout_is_served_without_doorbells() -> None:
    """A guest under emulation places one command per timeout or slower: each look finds one,
    keeps the prediction, and the host never reaches EventIdx (no MMIO at all)."""
    r = _rig(SqEventIdxPolicy.BATCH, timeout=1e-3)
    try:
        driver, ctrl = r.driver, r.controller
        qp = driver.queue(1)
        run_job(driver, JobSpec(rw="randread", iodepth=4, number_ios=64, iodepth_batch_submit=0))
        rung = ctrl.statistics().doorbell_sq_io
        for _ in range(20):
            deadline = ctrl.next_deadline()
            assert deadline is not None
            cid = qp.submit(driver.io_sqe(qp, NvmOpcode.FLUSH, 1))
            qp.ring_sq()  # stores the shadow tail; EventIdx stays ahead, so no MMIO
            ctrl.process(now=deadline)
            assert driver._wait_cid(qp, cid).status == 0
        assert ctrl.statistics().doorbell_sq_io == rung
        last = ctrl.next_deadline()
        assert last is not None
        ctrl.process(now=last)  # the host stopped: exact again, nothing outstanding
        assert ctrl.next_deadline() is None
    finally:
        r.close()


def test_depth_one_is_exactly_eager_and_reset_forgets_predictions() -> None:
    r = _rig(SqEventIdxPolicy.BATCH)
    try:
        result = run_job(r.driver, JobSpec(rw="randread", iodepth=1, number_ios=100))
        assert result.sq_doorbell_mmio == 100  # a burst of one predicts nothing
        assert r.controller.next_deadline() is None
        run_job(r.driver, JobSpec(rw="randread", iodepth=4, number_ios=40, iodepth_batch_submit=0))
        assert r.controller.next_deadline() is not None
        r.driver.reset_controller()
        assert r.controller.next_deadline() is None
        result = run_job(r.driver, JobSpec(rw="randread", iodepth=2, number_ios=100))
        assert result.ios == 100
    finally:
        r.close()
