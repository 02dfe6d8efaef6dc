"""The host-protocol checker (controller/hostcheck.py): a host with one bug trips exactly its
rule; a clean host trips nothing; the counters reach the statistics and the C0h log page."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator

import pytest

from host import Rig, make_rig
from vnvme.controller.config import ControllerConfig, CqEventIdxPolicy, SqEventIdxPolicy
from vnvme.controller.hostcheck import MISSED_RING_BOUND, RULES, HostChecker, _Watch
from vnvme.driver import InProcessTransport
from vnvme.driver.driver import HOST_FAULTS, NvmeError
from vnvme.spec import registers as regs
from vnvme.spec.dbbuf import need_event
from vnvme.spec.log_pages import VNVME_COUNTERS, VNVME_COUNTERS_LID, VNVME_HOST_RULE_COUNTS_OFFSET
from vnvme.trace import TRACE_EVENTS

# Replaces the controller's methods per instance, which the mypyc build does not allow.
pytestmark = pytest.mark.pure_python


class Clock:
    """The controller's ``now``, moved by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class PostedDoorbells(InProcessTransport):
    """Doorbell writes reach the controller at once; it runs only when the host next waits
    (posted writes, as QEMU's vfio-user client may send them)."""

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        if offset < regs.DOORBELL_BASE:
            super().mmio_write(offset, size, value)
        else:
            self._handle(self.controller.mmio_write(offset, size, value))


def checked_rig(*, shadow: bool = True, **options: object) -> Rig:
    config = options.pop("config", None) or ControllerConfig(check_host=True)
    return make_rig(config=config, shadow_doorbells=shadow, **options)  # type: ignore[arg-type]


def checker(rig: Rig) -> HostChecker:
    assert rig.controller.host_check is not None
    return rig.controller.host_check


def some_io(rig: Rig, count: int = 4) -> None:
    for lba in range(count):
        rig.driver.write(1, lba, bytes([lba]) * 512)
        assert rig.driver.read(1, lba, 1) == bytes([lba]) * 512


@pytest.fixture(
    params=[
        (SqEventIdxPolicy.EAGER, CqEventIdxPolicy.NEVER, False),
        (SqEventIdxPolicy.BATCH, CqEventIdxPolicy.EAGER, False),
        (SqEventIdxPolicy.ADAPTIVE, CqEventIdxPolicy.NEVER, True),
    ],
    ids=["eager", "batch-cq-eager", "adaptive-admin-shadow"],
)
def clean(request: pytest.FixtureRequest) -> Iterator[Rig]:
    sq, cq, admin_shadow = request.param
    config = ControllerConfig(check_host=True, sq_eventidx=sq, cq_eventidx=cq)
    r = checked_rig(config=config, admin_shadow=admin_shadow)
    try:
        yield r
    finally:
        r.close()


def test_a_clean_host_trips_nothing(clean: Rig) -> None:
    some_io(clean, 40)
    qp = clean.driver.queue(1)
    buf = clean.host_memory.alloc(4096)
    for _ in range(20):  # bursts of commands, rung once each
        cids = [qp.submit(clean.driver.io_sqe(qp, 0x02, 1, lba, 1, buf, length=512)) for lba in range(7)]
        qp.ring_sq()
        for cid in cids:
            assert clean.driver._wait_cid(qp, cid).status == 0
    clean.driver.reset_controller()
    some_io(clean, 8)
    report = checker(clean).report(clean.controller.now + 10 * MISSED_RING_BOUND)
    assert (report["errors"], report["warnings"]) == (0, 0), checker(clean).counts()
    assert all(rule["count"] == 0 and rule["first"] == [] for rule in report["rules"])


# fault -> shadow doorbells on, posted doorbell writes
FAULTS: dict[str, tuple[bool, bool]] = {
    "doorbell_invalid_queue": (True, False),
    "shadow_slot_invalid_queue": (True, False),
    "sq_tail_out_of_range": (False, False),
    "cq_head_out_of_range": (False, False),
    "cq_head_past_tail": (False, False),
    "sq_overrun": (False, True),
    "cid_reused": (True, False),
    "mmio_ahead_of_shadow": (True, False),
    "ring_not_needed": (True, False),
    "prp_invalid": (True, False),
    "sgl_invalid": (True, False),
}


def test_every_rule_has_a_fault_and_a_trace_event() -> None:
    names = {rule.name for rule in RULES}
    assert names == HOST_FAULTS == set(FAULTS) | {"ring_possibly_missed"}
    for rule in RULES:
        assert TRACE_EVENTS[rule.event].args == rule.args


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_a_host_fault_trips_its_rule_and_nothing_else(fault: str) -> None:
    shadow, posted = FAULTS[fault]
    r = checked_rig(shadow=shadow)
    if posted:
        r.transport.__class__ = PostedDoorbells
    try:
        some_io(r)
        r.driver.inject_host_fault(fault)
        if fault == "cid_reused":
            r.driver.identify_controller()
        elif fault in ("prp_invalid", "sgl_invalid"):
            with pytest.raises(NvmeError):
                r.driver.read(1, 0, 8)
        else:
            some_io(r, 2)
        assert r.driver.host_fault is None, "the fault was never committed"
        some_io(r)  # and the host goes on
        found = checker(r).report(r.controller.now)
        assert checker(r).counts() == {fault: 1}
        (rule,) = [x for x in found["rules"] if x["count"]]
        assert rule["name"] == fault and len(rule["first"]) == 1
        assert found["errors" if rule["severity"] == "error" else "warnings"] == 1
        r.transport._handle(r.controller.take_effects())  # a violation the report's look found
        assert r.trace.named(f"pci_nvme_host_{fault}")
    finally:
        r.close()


def test_a_ring_not_made_is_reported_only_after_the_bound() -> None:
    clock = Clock()
    r = checked_rig(clock=clock)
    try:
        some_io(r)
        qp = r.driver.queue(1)
        buf = r.host_memory.alloc(512)
        r.driver.inject_host_fault("ring_possibly_missed")
        cid = qp.submit(r.driver.io_sqe(qp, 0x02, 1, 0, 1, buf, length=512))
        qp.ring_sq()  # stores the tail, crosses EventIdx, does not ring
        assert r.driver.host_fault is None
        clock.now += 0.001
        r.transport._handle(r.controller.poll(clock()))  # the controller finds it by itself
        assert r.driver._wait_cid(qp, cid).status == 0
        assert checker(r).report(clock.now + MISSED_RING_BOUND / 2)["warnings"] == 0
        # An idle controller's edge is told when to look again.
        assert r.controller.next_deadline() == pytest.approx(clock.now + MISSED_RING_BOUND)
        clock.now += MISSED_RING_BOUND
        r.transport.device_idle()  # the pass at that deadline
        assert checker(r).counts() == {"ring_possibly_missed": 1}
        assert r.controller.next_deadline() is None
        some_io(r, 1)
        (first,) = checker(r).report()["rules"][[x.name for x in RULES].index("ring_possibly_missed")][
            "first"
        ]
        assert first["qid"] == 1 and first["is_cq"] == 0 and first["value"] == first["old"] + 1
    finally:
        r.close()


def test_a_ring_that_comes_within_the_bound_is_no_miss() -> None:
    """The controller finding a store first (here: a poll) is not the host's fault if the ring
    follows."""
    clock = Clock()
    r = checked_rig(clock=clock)
    try:
        some_io(r)
        qp = r.driver.queue(1)
        buf = r.host_memory.alloc(512)
        cid = qp.submit(r.driver.io_sqe(qp, 0x02, 1, 0, 1, buf, length=512))
        tail = qp.sq_tail
        assert qp.shadow is not None
        qp.shadow.store(qp.sq_slot, tail)
        r.transport._handle(r.controller.poll(clock()))
        clock.now += MISSED_RING_BOUND / 2
        r.transport.mmio_write(qp.sq_db, 4, tail)  # the ring, late
        qp.last_sq_tail = tail
        assert r.driver._wait_cid(qp, cid).status == 0
        assert checker(r).report(clock.now + 10 * MISSED_RING_BOUND)["warnings"] == 0
    finally:
        r.close()


def test_host_check_counters_in_statistics_and_the_c0h_page() -> None:
    r = checked_rig()
    try:
        some_io(r)
        r.driver.inject_host_fault("sq_tail_out_of_range")
        some_io(r, 1)
        stats = r.controller.statistics()
        assert (stats.host_check_errors, stats.host_check_warnings) == (1, 0)
        assert stats.host_check == {"sq_tail_out_of_range": 1}
        page = r.driver.get_log_page(VNVME_COUNTERS_LID, 512)
        values = VNVME_COUNTERS.unpack(page)
        assert (values["host_check_enabled"], values["host_check_errors"]) == (1, 1)
        counts = struct.unpack_from(f"<{len(RULES)}I", page, VNVME_HOST_RULE_COUNTS_OFFSET)
        assert counts == tuple(int(rule.name == "sq_tail_out_of_range") for rule in RULES)
        json.dumps(checker(r).report(r.controller.now))  # the report is JSON as it is
    finally:
        r.close()


def test_the_checker_off_leaves_the_controller_as_it_is() -> None:
    r = make_rig()
    try:
        assert r.controller.host_check is None
        assert type(r.controller.doorbells).__name__ == "Doorbells"
        assert "_execute" not in vars(r.controller) and "_doorbell_write" not in vars(r.controller)
        r.driver.inject_host_fault("sq_tail_out_of_range")
        some_io(r, 1)
        stats = r.controller.statistics()
        assert (stats.host_check_errors, stats.host_check, stats.invalid_doorbell_writes) == (0, {}, 1)
    finally:
        r.close()


def test_what_the_host_could_have_read_is_ordered_from_the_newest_slot_value() -> None:
    """Linux 6.12 under fio (seen in the VM scenario): its doorbell for tail 397 (previous one
    394) arrives after the controller had read the slot at 398 and, handling that doorbell, 399.
    The host read EventIdx 396, published after the slot was last seen at 394; counting from the
    older slot value (398) took 399 for an index behind 394 and found nothing it could have read."""
    watch = _Watch(None, 393, 393)  # type: ignore[arg-type]  # the queue is only compared by identity
    for published, value in [
        (False, 394),
        (False, 394),
        (False, 395),
        (True, 396),
        (False, 396),
        (False, 396),
        (True, 396),
        (False, 397),
        (False, 397),
        (True, 397),
        (False, 397),
        (False, 398),
        (False, 399),
    ]:
        watch.log.append((published, value))
    seen = watch.could_have_read(394, 1024)
    assert seen is not None and 396 in seen
    # Ordered from the older value, 399 counts as behind 394: only 397, which asked for nothing.
    assert watch.could_have_read(394, 1024, 398) == [397]
    assert any(need_event(e, 397, 394) for e in seen)
