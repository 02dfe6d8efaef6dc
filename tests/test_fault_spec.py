"""Fault hooks against the spec's rules for queues, Abort, broadcast Flush and asynchronous
events (NVMe 1.3 §5.1, §5.2, §5.6, §5.14.1.2, §5.21.1.11, §6.8)."""

from __future__ import annotations

import errno
import os
import struct

import pytest

from host import Rig, make_rig
from vnvme.controller.faults import Delay, Fail, IoCommand, MediaError, set_fault_hook
from vnvme.controller.namespace import Namespace, RamBackend
from vnvme.driver import NvmeError
from vnvme.driver.driver import QueuePair
from vnvme.spec.commands import (
    NSID_BROADCAST,
    AdminOpcode,
    AsyncEventSmartInfo,
    AsyncEventType,
    FeatureId,
    LogPageId,
    NvmOpcode,
    Sqe,
    async_event_dw0,
)
from vnvme.spec.dbbuf import sq_slot
from vnvme.spec.log_pages import ERROR_INFORMATION_ENTRY, SMART_HEALTH, CriticalWarning
from vnvme.spec.registers import CC, Reg, ShutdownNotification
from vnvme.spec.status import DNR, Status

_LATER = 1000.0  # seconds: far past any test's end, so only an abort can complete the command


class _Flushes(RamBackend):
    """Counts flushes; with ``fail`` (an errno), each one fails as a backing file's fsync can."""

    def __init__(self, fail: int = 0) -> None:
        super().__init__(1 << 20)
        self.fail = fail
        self.flushes = 0

    def flush(self) -> None:
        self.flushes += 1
        if self.fail:
            raise OSError(self.fail, os.strerror(self.fail))


def _rig(namespaces: int = 1, *, failing: tuple[int, ...] = (), errno_: int = errno.EIO) -> Rig:
    return make_rig(
        namespaces=[
            Namespace(nsid, _Flushes(errno_ if nsid in failing else 0), 512)
            for nsid in range(1, namespaces + 1)
        ],
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
        assert qp.shadow is not None  # the queue is on shadow doorbells: CQ EventIdx as usual
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


def test_controller_fatal_status_drops_held_completions() -> None:
    """After CFS nothing is posted until a reset (§9.5), so no held deadline may stay due: an
    edge would be told to run the controller again at once, forever."""
    r = _rig(failing=(1,))
    ctrl = r.controller
    try:
        set_fault_hook(ctrl, 1, _delay_reads)
        _submit_read(r)
        assert ctrl.next_deadline() is not None
        # A shutdown whose flush fails: controller fatal status.
        cc = r.driver.read_reg(Reg.CC)
        r.driver.write_reg(Reg.CC, CC.SHN.put(cc, ShutdownNotification.NORMAL))
        assert ctrl.fatal
        assert ctrl.next_deadline() is None and not ctrl.delayed and ctrl.delayed.dropped == 1
    finally:
        r.controller.namespaces[1].backend.fail = 0  # type: ignore[attr-defined]
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


# Section: Flush of every namespace (NSID FFFFFFFFh, §6.8)


def _flushes(r: Rig) -> list[int]:
    return [ns.backend.flushes for ns in r.controller.namespaces.values()]  # type: ignore[attr-defined]


def _newest_error(r: Rig) -> dict[str, int]:
    raw = r.driver.get_log_page(LogPageId.ERROR_INFORMATION, ERROR_INFORMATION_ENTRY.size)
    entry: dict[str, int] = ERROR_INFORMATION_ENTRY.unpack(raw)
    return entry


def test_broadcast_flush_meets_each_namespaces_hook() -> None:
    """A media error on namespace 2's part: the command fails as a Flush of namespace 2 would,
    the Error Information entry names namespace 2, and namespaces 1 and 3 are flushed."""
    r = _rig(3)
    try:
        seen: list[IoCommand] = []

        def media_error(command: IoCommand) -> MediaError:
            seen.append(command)
            return MediaError()

        set_fault_hook(r.controller, 2, media_error)
        errors = r.controller.error_log.error_count
        with pytest.raises(NvmeError) as failure:
            r.driver.flush(NSID_BROADCAST)
        assert failure.value.status == Status.WRITE_FAULT
        assert [(c.opcode, c.nsid, c.slba, c.nlb) for c in seen] == [(NvmOpcode.FLUSH, 2, 0, 0)]
        assert _flushes(r) == [1, 0, 1]
        assert r.controller.error_log.error_count == errors + 1  # one command, one entry
        entry = _newest_error(r)
        assert (entry["nsid"], entry["status_field"] >> 1) == (2, Status.WRITE_FAULT)
        assert r.controller.smart.media_errors == 1
    finally:
        r.close()


def test_broadcast_flush_reports_the_first_failing_namespace() -> None:
    r = _rig(3)
    try:
        set_fault_hook(r.controller, 3, lambda c: Fail(Status.INTERNAL_ERROR))
        set_fault_hook(r.controller, 2, lambda c: Fail(Status.NAMESPACE_NOT_READY | DNR))
        with pytest.raises(NvmeError) as failure:
            r.driver.flush(NSID_BROADCAST)
        assert failure.value.status == Status.NAMESPACE_NOT_READY | DNR
        assert _newest_error(r)["nsid"] == 2
        assert _flushes(r) == [1, 0, 0]
    finally:
        r.close()


def test_a_delayed_part_holds_the_broadcast_flush_completion() -> None:
    """The one completion waits for the longest Delay of a part, and carries the failure of
    another part (its Error Information entry too, recorded when it is posted)."""
    r = _rig(2)
    ctrl = r.controller
    try:
        set_fault_hook(ctrl, 1, lambda c: Delay(_LATER))
        set_fault_hook(ctrl, 2, lambda c: Delay(_LATER / 2, Fail(Status.DATA_TRANSFER_ERROR)))
        qp = r.driver.queue(1)
        cid = qp.submit(r.driver.io_sqe(qp, NvmOpcode.FLUSH, NSID_BROADCAST))
        qp.ring_sq()
        assert qp.reap() == [] and len(ctrl.delayed) == 1
        assert _flushes(r) == [1, 0]  # namespace 1's part ran when fetched; 2's never runs
        deadline = ctrl.next_deadline()
        assert deadline is not None
        r.transport._handle(ctrl.process(now=deadline - _LATER / 2))
        assert qp.reap() == []  # namespace 2's delay has passed, namespace 1's has not
        r.transport._handle(ctrl.process(now=deadline))
        assert [(c.cid, c.status) for c in qp.reap()] == [(cid, Status.DATA_TRANSFER_ERROR)]
        assert _newest_error(r)["nsid"] == 2
    finally:
        r.close()


def test_broadcast_flush_without_hooks_flushes_every_namespace_after_a_failure() -> None:
    """The same rule without any hook: a backend's failed flush does not stop the others."""
    r = _rig(3, failing=(1,))
    try:
        with pytest.raises(NvmeError) as failure:
            r.driver.flush(NSID_BROADCAST)
        assert failure.value.status == Status.WRITE_FAULT
        assert _flushes(r) == [1, 1, 1]
        assert _newest_error(r)["nsid"] == 1
    finally:
        r.controller.namespaces[1].backend.fail = 0  # type: ignore[attr-defined]
        r.close()


# Section: media errors and Asynchronous Events (§5.2, §5.14.1.2, §5.21.1.11)

_RELIABILITY_EVENT = async_event_dw0(
    AsyncEventType.SMART_HEALTH_STATUS, AsyncEventSmartInfo.RELIABILITY, LogPageId.SMART_HEALTH
)
_TEMPERATURE_EVENT = async_event_dw0(
    AsyncEventType.SMART_HEALTH_STATUS, AsyncEventSmartInfo.TEMPERATURE_THRESHOLD, LogPageId.SMART_HEALTH
)


def _critical_warning(r: Rig, *, rae: bool = False) -> int:
    smart: dict[str, int] = SMART_HEALTH.unpack(r.driver.get_log_page(LogPageId.SMART_HEALTH, 512, rae=rae))
    return smart["critical_warning"]


def _enable_events(r: Rig, warnings: int) -> None:
    r.driver.set_features(FeatureId.ASYNC_EVENT_CONFIGURATION, warnings)


def _events(r: Rig) -> list[int]:
    r.driver.identify_controller()  # an admin pass: the driver takes any AER completion
    return r.driver.async_event_log


def _read_media_error(r: Rig) -> None:
    set_fault_hook(r.controller, 1, lambda c: MediaError() if c.is_read else None)
    with pytest.raises(NvmeError) as failure:
        r.driver.read(1, 0, 1)
    assert failure.value.status == Status.UNRECOVERED_READ_ERROR


def test_a_media_error_degrades_reliability_and_raises_an_enabled_smart_event() -> None:
    r = _rig()
    try:
        _enable_events(r, CriticalWarning.RELIABILITY_DEGRADED)
        assert _events(r) == []
        _read_media_error(r)
        # SMART / Health, NVM subsystem reliability, log page 02h; no Error status event.
        assert _events(r) == [_RELIABILITY_EVENT]
        assert _critical_warning(r) == CriticalWarning.RELIABILITY_DEGRADED
        _read_media_error(r)
        assert r.controller.smart.media_errors == 2 and _events(r) == [_RELIABILITY_EVENT]
    finally:
        r.close()


def test_the_reliability_event_waits_for_the_host_to_enable_it() -> None:
    """Not enabled in Asynchronous Event Configuration: the warning, but no event; enabling it
    reports the warning that holds then (as for temperature)."""
    r = _rig()
    try:
        _read_media_error(r)
        assert _events(r) == []
        assert _critical_warning(r) == CriticalWarning.RELIABILITY_DEGRADED
        _enable_events(r, CriticalWarning.TEMPERATURE)
        assert _events(r) == []
        _enable_events(r, CriticalWarning.RELIABILITY_DEGRADED)
        assert _events(r) == [_RELIABILITY_EVENT]
    finally:
        r.close()


def test_smart_events_are_masked_until_the_smart_log_is_read() -> None:
    """§5.2: after the reliability event, a temperature event (same type) is not reported until
    the host reads log page 02h with RAE cleared."""
    r = _rig()
    admin = r.driver.admin
    assert admin is not None
    try:
        _enable_events(r, CriticalWarning.RELIABILITY_DEGRADED | CriticalWarning.TEMPERATURE)
        _read_media_error(r)
        assert _events(r) == [_RELIABILITY_EVENT]
        aer = admin.submit(Sqe(AdminOpcode.ASYNC_EVENT_REQUEST, 0, 0, 0, 0, 0, 0, 0, 0))
        admin.ring_sq()
        too_hot = CriticalWarning.RELIABILITY_DEGRADED | CriticalWarning.TEMPERATURE
        for rae in (True, False):
            r.driver.set_features(FeatureId.TEMPERATURE_THRESHOLD, 200)  # below the temperature
            r.driver.identify_controller()
            assert aer not in admin.results  # masked (and Retain Asynchronous Event kept it so)
            assert _critical_warning(r, rae=rae) == too_hot
        r.driver.set_features(FeatureId.TEMPERATURE_THRESHOLD, 200)
        r.driver.identify_controller()
        assert admin.results.pop(aer).dw0 == _TEMPERATURE_EVENT
    finally:
        r.close()


def test_backend_media_errors_raise_it_and_a_full_backing_store_does_not() -> None:
    for code, status, warning in (
        (errno.ENOSPC, Status.CAPACITY_EXCEEDED | DNR, 0),
        (errno.EIO, Status.WRITE_FAULT, CriticalWarning.RELIABILITY_DEGRADED),
    ):
        r = _rig(failing=(1,), errno_=code)
        try:
            _enable_events(r, CriticalWarning.RELIABILITY_DEGRADED)
            with pytest.raises(NvmeError) as failure:
                r.driver.flush(1)
            assert failure.value.status == status
            assert _critical_warning(r) == warning
            assert _events(r) == ([_RELIABILITY_EVENT] if warning else [])
        finally:
            r.controller.namespaces[1].backend.fail = 0  # type: ignore[attr-defined]
            r.close()


# Section: a held completion that finds the CQ full (§4.1, shadow doorbells)


def test_held_completions_that_find_a_shadow_cq_full_ask_for_the_next_head_move() -> None:
    """Held completions come due while their CQ is full: the ones without room wait in the
    CQ's backlog. On shadow doorbells the controller must then publish CQ EventIdx = head, or a
    host that obeys need_event (CQ policy NEVER asks for no head doorbell) never rings and the
    rest are never posted. Two SQs on one 4-entry CQ make the overflow possible."""
    clock = [0.0]
    r = make_rig(
        namespaces=[Namespace(1, RamBackend(1 << 20), 512)],
        clock=lambda: clock[0],
        io_queues=2,
        io_queue_depth=16,
    )
    ctrl = r.controller
    try:
        for qp in list(r.driver.io):
            r.driver.delete_io_queue_pair(qp)
        qp = r.driver.create_io_queue_pair(1, 4)  # CQ 1: room for 3
        assert qp.shadow is not None and r.driver.dbbuf_pages is not None
        sq_mem, buf = r.host_memory.alloc(16 * 64), r.host_memory.alloc(4096)
        for index in range(6):
            sqe = Sqe(NvmOpcode.READ, 0, 900 + index, 1, 0, 0, 0, buf.addr, 0, 0, 0, 0)
            sq_mem.view[index * 64 : (index + 1) * 64] = sqe.pack()
        assert (
            r.driver.admin_command(
                AdminOpcode.CREATE_IO_SQ, prp1=sq_mem.addr, cdw10=(15 << 16) | 2, cdw11=(1 << 16) | 1
            ).status
            == 0
        )
        set_fault_hook(ctrl, 1, lambda command: Delay(1.0) if command.is_read else None)
        shadow = r.driver.dbbuf_pages[0].view
        shadow[4 * sq_slot(2, 0) : 4 * sq_slot(2, 0) + 4] = struct.pack("<I", 6)
        ctrl.poll(now=clock[0])
        assert len(ctrl.delayed) == 6  # all fetched: held completions take no CQ room yet
        clock[0] = 2.0
        ctrl.process(now=clock[0])
        first = qp.reap()  # three fit; the host moves its shadow head and rings if asked
        ctrl.process(now=clock[0])
        second = qp.reap()
        assert [c.cid for c in first + second] == list(range(900, 906))
        assert all(c.status == 0 and c.sqid == 2 for c in first + second)
    finally:
        r.close()
