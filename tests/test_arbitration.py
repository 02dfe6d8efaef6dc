"""Round robin command arbitration (NVMe 1.3 §4.11): the Arbitration Burst of the Arbitration
feature (Set Features 01h) bounds how many commands are taken from one SQ in a row, and with
every SQ kept full each gets the same share of the commands fetched."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from host import make_rig
from vnvme.controller.config import ControllerConfig
from vnvme.controller.controller import Controller
from vnvme.controller.namespace import Namespace, NullBackend, RamBackend
from vnvme.driver import HostMemory, InProcessTransport, NvmeDriver
from vnvme.driver.driver import QueuePair
from vnvme.memory import GuestMemory
from vnvme.spec.commands import FeatureId, NvmOpcode
from vnvme.spec.features import ARBITRATION_BURST_NO_LIMIT

_FLUSH = int(NvmOpcode.FLUSH)


class _HeldTransport(InProcessTransport):
    """BAR writes reach the controller, which runs only when the host waits or the test says."""

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        self._handle(self.controller.mmio_write(offset, size, value))


def _held_driver(config: ControllerConfig, queues: int, depth: int, *, shadow: bool) -> Iterator[NvmeDriver]:
    controller = Controller(GuestMemory(), [Namespace(1, NullBackend(1 << 30), 4096)], config)
    host_memory = HostMemory(32 << 20)
    transport = _HeldTransport.attach(controller, host_memory)
    driver = NvmeDriver(transport, io_queues=queues, io_queue_depth=depth, shadow_doorbells=shadow)
    try:
        driver.probe()
        yield driver
    finally:
        driver.close()
        transport.close()
        host_memory.close()
        controller.close()


def _fill(driver: NvmeDriver, qp: QueuePair, count: int | None = None) -> None:
    """Place Flush commands until the SQ is full (or ``count`` of them), then ring once."""
    placed = 0
    while qp.can_submit() and (count is None or placed < count):
        qp.submit(driver.io_sqe(qp, _FLUSH, 1))
        placed += 1
    qp.ring_sq()


def _fetch_order(config: ControllerConfig, per_queue: int, arbitration: int | None = None) -> list[int]:
    """The sqids in the order the controller fetched 4 SQs' commands, all rung before it ran."""
    r = make_rig(
        namespaces=[Namespace(1, RamBackend(1 << 20), 512)],
        config=config,
        io_queues=4,
        io_queue_depth=16,
        shadow_doorbells=False,
        trace=("pci_nvme_io_cmd",),
    )
    try:
        if arbitration is not None:
            r.driver.set_features(FeatureId.ARBITRATION, arbitration)
        for qp in r.driver.io:
            for _ in range(per_queue):
                qp.submit(r.driver.io_sqe(qp, _FLUSH, 1))
        before = len(r.trace.events)
        for qp in r.driver.io:  # every doorbell before the controller runs
            r.controller.mmio_write(qp.sq_db, 4, qp.sq_tail)
            qp.last_sq_tail = qp.sq_tail
        r.transport.device_idle()
        for qp in r.driver.io:
            assert [c.status for c in qp.reap()] == [0] * per_queue
        return [int(e.args[2]) for e in r.trace.events[before:] if e.name == "pci_nvme_io_cmd"]
    finally:
        r.close()


def test_set_features_arbitration_burst_bounds_the_commands_taken_in_a_row() -> None:
    config = ControllerConfig()  # a configured burst of 64: every SQ would drain in one turn
    assert _fetch_order(config, 3) == [1] * 3 + [2] * 3 + [3] * 3 + [4] * 3
    assert _fetch_order(config, 3, arbitration=0) == [1, 2, 3, 4] * 3  # AB 0: one command
    assert _fetch_order(config, 3, arbitration=1) == [1, 1, 2, 2, 3, 3, 4, 4, 1, 2, 3, 4]
    # The priority weights mean nothing to round robin: only AB counts.
    assert _fetch_order(config, 3, arbitration=0xFFFF_FF00) == [1, 2, 3, 4] * 3


def test_arbitration_burst_no_limit_drains_each_sq_in_one_turn() -> None:
    order = _fetch_order(ControllerConfig(arbitration_burst=1), 5, arbitration=ARBITRATION_BURST_NO_LIMIT)
    assert order == [1] * 5 + [2] * 5 + [3] * 5 + [4] * 5


def test_configured_burst_is_the_default_ab_and_identify_rab() -> None:
    config = ControllerConfig(arbitration_burst=4)
    r = make_rig(config=config, trace=())
    try:
        assert r.driver.get_features(FeatureId.ARBITRATION) == 2  # 2^2 = 4
        assert r.driver.get_features(FeatureId.ARBITRATION, sel=1) == 2  # the default
        assert r.driver.controller_info["rab"] == 2
        r.driver.set_features(FeatureId.ARBITRATION, 0)
        assert r.controller.features.arbitration_burst == 1
        r.driver.reset_controller()  # features are not saveable: a reset brings AB back
        assert r.driver.get_features(FeatureId.ARBITRATION) == 2
        assert r.controller.features.arbitration_burst == 4
    finally:
        r.close()
    assert _fetch_order(config, 6) == [1] * 4 + [2] * 4 + [3] * 4 + [4] * 4 + [1, 1, 2, 2, 3, 3, 4, 4]


@pytest.mark.parametrize("bad", [0, 3, 48, 128])
def test_configured_burst_must_be_an_ab_value(bad: int) -> None:
    with pytest.raises(ValueError, match="power of two"):
        ControllerConfig(arbitration_burst=bad)


@pytest.mark.parametrize("shadow", [False, True], ids=["mmio", "shadow"])
@pytest.mark.parametrize(("arbitration", "budget"), [(None, 100), (2, 257), (0, 63)])
def test_64_full_queues_share_the_commands_fetched_evenly(
    shadow: bool, arbitration: int | None, budget: int
) -> None:
    """64 SQs of 32 entries kept full; the controller runs ``budget`` commands per pass (a budget
    that ends passes mid-burst). Over the window every SQ gets within 10% of the others' share
    (max / min <= 1.1): no queue starves, whatever its sqid or where a pass was cut."""
    for driver in _held_driver(ControllerConfig(), 64, 32, shadow=shadow):
        if arbitration is not None:
            driver.set_features(FeatureId.ARBITRATION, arbitration)
        controller = driver.transport.controller  # type: ignore[attr-defined]
        controller.process()  # the Asynchronous Event Request the driver placed: not in the window
        queues = driver.io
        assert [qp.qid for qp in queues] == list(range(1, 65))
        for qp in queues:
            _fill(driver, qp)
        sqs = [controller.sqs[qp.qid] for qp in queues]
        before = [sq.entries for sq in sqs]
        for _ in range(64_000 // budget):
            controller.process(budget=budget)
            for qp in queues:  # reap what completed and put the queue back to full
                qp.reap()
                _fill(driver, qp)
        fetched = [sq.entries - b for sq, b in zip(sqs, before, strict=True)]
        assert sum(fetched) == (64_000 // budget) * budget
        assert min(fetched) > 0
        assert max(fetched) / min(fetched) <= 1.1, fetched


def test_each_polling_scan_begins_one_sqid_later() -> None:
    """A polling pass marks every SQ pending: the SQ served first moves on by one each pass, as a
    round robin pointer would, so no SQ always waits for all the others within a pass."""
    for driver in _held_driver(ControllerConfig(), 8, 4, shadow=True):
        controller = driver.transport.controller  # type: ignore[attr-defined]
        controller.enable_trace(("pci_nvme_io_cmd",))
        firsts = []
        for _ in range(8):
            for qp in driver.io:  # one command each, in the shadow slot only: no doorbell
                qp.submit(driver.io_sqe(qp, _FLUSH, 1))
                assert qp.shadow is not None
                qp.shadow.store(qp.sq_slot, qp.sq_tail)
                qp.last_sq_tail = qp.sq_tail
            order = [int(e.args[2]) for e in controller.poll() if getattr(e, "name", "") == "pci_nvme_io_cmd"]
            assert sorted(order) == list(range(1, 9))
            firsts.append(order[0])
            for qp in driver.io:
                assert len(qp.reap()) == 1
        assert sorted(firsts) == list(range(1, 9))
