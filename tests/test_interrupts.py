"""Interrupts: an MSI-X vector per CQ, polled CQs (IEN = 0), Interrupt Coalescing (FID 08h)."""

from __future__ import annotations

from host import Rig, make_rig
from vnvme.controller.namespace import Namespace, NullBackend
from vnvme.driver.driver import QueuePair
from vnvme.effects import Effect, RaiseInterrupt
from vnvme.spec.commands import FeatureId, NvmOpcode


def _null_rig(**options: object) -> Rig:
    return make_rig(namespaces=[Namespace(1, NullBackend(1 << 30), 4096)], **options)  # type: ignore[arg-type]


def _vectors(effects: list[Effect]) -> list[int]:
    return [e.vector for e in effects if isinstance(e, RaiseInterrupt)]


def _queue_reads(rig: Rig, qp: QueuePair, count: int) -> None:
    """Place ``count`` reads on ``qp`` and store the shadow tail, without telling the controller."""
    buf = rig.host_memory.alloc(4096)
    for _ in range(count):
        qp.submit(rig.driver.io_sqe(qp, NvmOpcode.READ, 1, 0, 1, buf, length=4096))


def _ring(rig: Rig, qp: QueuePair) -> list[Effect]:
    """Ring the SQ doorbell straight into the controller (no transport: we control time)."""
    effects = rig.controller.mmio_write(qp.sq_db, 4, qp.sq_tail)
    qp.last_sq_tail = qp.sq_tail
    if qp.shadow is not None:
        qp.shadow.store(qp.sq_slot, qp.sq_tail)
    return effects


def test_each_io_cq_has_its_own_vector() -> None:
    r = _null_rig(io_queues=3, trace=("pci_nvme_irq_msix",))
    try:
        assert [qp.vector for qp in r.driver.io] == [1, 2, 3]
        before = len(r.trace.events)
        r.driver.read(1, 0, 1, qid=2)
        r.driver.read(1, 0, 1, qid=3)
        fired = [e.args[0] for e in r.trace.events[before:]]
        assert fired == [2, 3]
    finally:
        r.close()


def test_polled_cqs_raise_no_interrupts() -> None:
    r = _null_rig(interrupts=False, trace=("pci_nvme_irq_msix",))
    try:
        before = r.controller.statistics().interrupts_raised
        for lba in range(10):
            assert r.driver.read(1, lba, 1) == bytes(4096)
        assert r.controller.statistics().interrupts_raised == before
        assert all(e.args[0] == 0 for e in r.trace.events)  # only the admin vector ever fired
        cq = r.controller.cqs[1]
        assert cq is not None and not cq.ien
    finally:
        r.close()


def test_coalescing_threshold_and_time() -> None:
    r = _null_rig(trace=())
    try:
        # THR = 3 (4 entries, zero-based), TIME = 10 (1 ms).
        r.driver.set_features(FeatureId.INTERRUPT_COALESCING, (10 << 8) | 3)
        qp = r.driver.queue(1)
        r.controller.process(now=100.0)
        _queue_reads(r, qp, 2)
        effects = _ring(r, qp) + r.controller.process(now=100.0)
        assert _vectors(effects) == []  # 2 entries < 4, no time elapsed
        deadline = r.controller.next_deadline()
        assert deadline is not None and abs(deadline - 100.001) < 1e-9
        assert _vectors(r.controller.process(now=100.0005)) == []
        assert _vectors(r.controller.process(now=100.0011)) == [1]
        assert r.controller.next_deadline() is None
        assert len(qp.reap()) == 2
        # Reaching the threshold raises at once.
        _queue_reads(r, qp, 4)
        effects = _ring(r, qp) + r.controller.process(now=200.0)
        assert _vectors(effects) == [1]
        assert len(qp.reap()) == 4
    finally:
        r.close()


def test_coalescing_disable_per_vector_and_admin_never_coalesced() -> None:
    r = _null_rig(io_queues=2, trace=())
    try:
        r.driver.set_features(FeatureId.INTERRUPT_COALESCING, (200 << 8) | 200)
        # Interrupt Vector Configuration: CD for vector 2.
        r.driver.set_features(FeatureId.INTERRUPT_VECTOR_CONFIGURATION, (1 << 16) | 2)
        assert r.driver.get_features(FeatureId.INTERRUPT_VECTOR_CONFIGURATION, cdw11=2) == (1 << 16) | 2
        q1, q2 = r.driver.queue(1), r.driver.queue(2)
        r.controller.process(now=5.0)
        _queue_reads(r, q1, 1)
        _queue_reads(r, q2, 1)
        effects = _ring(r, q1) + _ring(r, q2) + r.controller.process(now=5.0)
        assert _vectors(effects) == [2]  # vector 1 waits; vector 2 has coalescing disabled
        # Admin completions (vector 0) are never delayed, whatever the coalescing setting.
        admin = r.driver.admin
        assert admin is not None
        admin.submit(r.driver.io_sqe(admin, 0x0A, 0)._replace(cdw10=FeatureId.ARBITRATION))
        effects = r.controller.mmio_write(admin.sq_db, 4, admin.sq_tail) + r.controller.process(now=5.0)
        admin.last_sq_tail = admin.sq_tail
        assert _vectors(effects) == [0]
        assert _vectors(r.controller.process(now=5.0 + 200 * 100e-6 + 1e-6)) == [1]
    finally:
        r.close()
