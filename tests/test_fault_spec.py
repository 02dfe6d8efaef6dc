"""Fault hooks against the spec's rules for queues, Abort, broadcast Flush and asynchronous
events (NVMe 1.3 §5.1, §5.2, §5.6, §5.14.1.2, §5.21.1.11, §6.8)."""

from __future__ import annotations

from host import Rig, make_rig
from vnvme.controller.faults import Delay, IoCommand, set_fault_hook
from vnvme.controller.namespace import Namespace, RamBackend
from vnvme.driver.driver import QueuePair
from vnvme.spec.commands import AdminOpcode, NvmOpcode
from vnvme.spec.status import Status

_LATER = 1000.0  # seconds: far past any test's end, so only an abort can complete the command


def _rig(namespaces: int = 1) -> Rig:
    return make_rig(
        namespaces=[Namespace(nsid, RamBackend(1 << 20), 512) for nsid in range(1, namespaces + 1)],
        trace=("pci_nvme_enqueue_req_completion",),
        io_queues=2,
        io_queue_depth=16,
    )


def _delay_reads(command: IoCommand) -> Delay | None:
    return Delay(_LATER) if command.is_read else None


def _submit_read(r: Rig, qid: int = 1) -> tuple[QueuePair, int]:
    qp = r.driver.queue(qid)
    buf = r.host_memory.alloc(4096)
    cid = qp.submit(r.driver.io_sqe(qp, NvmOpcode.READ, 1, 0, 8, buf, length=4096))
    qp.ring_sq()
    return qp, cid


def _posted(r: Rig) -> list[tuple[int | str, ...]]:
    """(cqid, cid, status) of every completion posted so far, in order."""
    return [(e.args[1], e.args[0], e.args[3]) for e in r.trace.named("pci_nvme_enqueue_req_completion")]


# Section: Delete I/O Submission Queue (§5.6)


def test_deleting_an_sq_aborts_its_held_completions_before_its_own_completion() -> None:
    r = _rig()
    ctrl = r.controller
    try:
        set_fault_hook(ctrl, 1, _delay_reads)
        qp, first = _submit_read(r)
        _, second = _submit_read(r)
        assert len(ctrl.delayed) == 2 and qp.reap() == []
        interrupts = r.transport.fired.get(qp.vector, 0)
        r.trace.events.clear()
        delete = r.driver.admin_command(AdminOpcode.DELETE_IO_SQ, cdw10=qp.qid)
        assert delete.status == 0
        # Both aborted on the I/O CQ, in the order they were due, before Delete SQ completes.
        assert _posted(r) == [
            (1, first, Status.SQ_DELETION),
            (1, second, Status.SQ_DELETION),
            (0, delete.cid, 0),
        ]
        assert r.transport.fired.get(qp.vector, 0) == interrupts + 1  # as for any completion
        assert [(c.cid, c.status, c.sqid) for c in qp.reap()] == [
            (first, Status.SQ_DELETION, 1),
            (second, Status.SQ_DELETION, 1),
        ]
        assert not ctrl.delayed and ctrl.delayed.dropped == 0 and ctrl.next_deadline() is None
        assert r.driver.admin_command(AdminOpcode.DELETE_IO_CQ, cdw10=qp.qid).status == 0
        r.driver.io.remove(qp)
        qp.close()
    finally:
        r.close()


def test_deleting_an_sq_aborts_only_its_own_held_completions() -> None:
    r = _rig()
    ctrl = r.controller
    try:
        other = r.driver.queue(2)
        set_fault_hook(ctrl, 1, _delay_reads)
        qp, _ = _submit_read(r)
        _, kept = _submit_read(r, qid=2)
        r.driver.delete_io_queue_pair(qp)
        assert len(ctrl.delayed) == 1
        deadline = ctrl.next_deadline()
        assert deadline is not None
        r.transport._handle(ctrl.process(now=deadline))
        assert [(c.cid, c.status) for c in other.reap()] == [(kept, 0)]
    finally:
        r.close()


def test_driver_reaps_the_aborted_completions_when_it_deletes_a_queue_pair() -> None:
    """Linux reaps a queue's CQ after deleting its SQ; the aborted commands' CIDs are free."""
    r = _rig()
    try:
        set_fault_hook(r.controller, 1, _delay_reads)
        qp, cid = _submit_read(r)
        r.driver.delete_io_queue_pair(qp)
        assert qp.results[cid].status == Status.SQ_DELETION and qp.outstanding == 0
    finally:
        r.close()


# Section: Abort (§5.1)


def _abort(r: Rig, sqid: int, cid: int) -> int:
    """Abort's completion DW0 bit 0: 0 = aborted, 1 = not aborted."""
    cqe = r.driver.admin_command(AdminOpcode.ABORT, cdw10=sqid | (cid << 16))
    assert cqe.status == 0
    return cqe.dw0 & 1


def test_abort_completes_a_held_command_with_abort_requested_at_once() -> None:
    r = _rig()
    ctrl = r.controller
    try:
        set_fault_hook(ctrl, 1, _delay_reads)
        qp, first = _submit_read(r)
        _, second = _submit_read(r)
        interrupts = r.transport.fired.get(qp.vector, 0)
        assert _abort(r, qp.qid, second) == 0
        assert [(c.cid, c.status) for c in qp.reap()] == [(second, Status.ABORT_REQUESTED)]
        assert r.transport.fired.get(qp.vector, 0) == interrupts + 1
        assert len(ctrl.delayed) == 1  # the other one is still held
        # Gone now: a second Abort of it, or of a CID on another queue, finds nothing.
        assert _abort(r, qp.qid, second) == 1
        assert _abort(r, 2, first) == 1
        assert _abort(r, 0xFFFF, first) == 1  # no such queue
        assert len(ctrl.delayed) == 1 and qp.reap() == []
    finally:
        r.close()
