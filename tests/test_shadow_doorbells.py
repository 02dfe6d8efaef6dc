"""Doorbell Buffer Config and the EventIdx protocol, driven through the host driver (the cases
named after bugs elsewhere are in test_known_bugs.py).

NVMe 1.3, Doorbell Buffer Config command: PRP1 is the Shadow Doorbell buffer, PRP2 the EventIdx
buffer, each one memory page and page aligned; SQ y's tail lives at dword (2y) << CAP.DSTRD and
CQ y's head at dword (2y + 1) << CAP.DSTRD of both buffers.
"""

from __future__ import annotations

import pytest

from host import Rig, make_rig
from vnvme.bench.engine import JobSpec, run_job
from vnvme.controller.config import ControllerConfig, CqEventIdxPolicy, SqEventIdxPolicy
from vnvme.controller.namespace import Namespace, NullBackend
from vnvme.driver.transport import PAGE_SIZE
from vnvme.effects import TraceEvent
from vnvme.spec.commands import AdminOpcode, NvmOpcode
from vnvme.spec.dbbuf import cq_slot, sq_slot
from vnvme.spec.registers import CC, Reg
from vnvme.spec.status import DNR, Status


def _dbbuf(rig: Rig, prp1: int, prp2: int) -> int:
    return rig.driver.admin_command(
        AdminOpcode.DOORBELL_BUFFER_CONFIG, prp1=prp1, prp2=prp2, check=False
    ).status


def _io_queue_modes(rig: Rig) -> dict[tuple[int, bool], bool]:
    return {(q.qid, q.is_cq): q.shadow_mode for q in rig.controller.queue_statistics()}


def test_misaligned_buffers_are_invalid_field_and_change_nothing() -> None:
    r = make_rig(shadow_doorbells=False)
    try:
        page = r.host_memory.alloc(2 * PAGE_SIZE)
        for prp1, prp2 in ((page.addr + 8, page.addr + PAGE_SIZE), (page.addr, page.addr + PAGE_SIZE + 4)):
            assert _dbbuf(r, prp1, prp2) == Status.INVALID_FIELD | DNR
        assert _dbbuf(r, page.addr, page.addr) == Status.INVALID_FIELD | DNR
        assert r.controller.statistics().dbbuf_configs == 0
        assert not any(_io_queue_modes(r).values())
        assert bytes(page.view) == bytes(2 * PAGE_SIZE)  # nothing written to either page
    finally:
        r.close()


def test_unmapped_buffers_are_a_data_transfer_error() -> None:
    r = make_rig(shadow_doorbells=False)
    try:
        assert _dbbuf(r, 0x10_0000_0000, 0x10_0000_1000) == Status.DATA_TRANSFER_ERROR | DNR
        assert not r.controller.doorbells.active
    finally:
        r.close()


def test_queues_created_after_config_use_their_shadow_slots(rig: Rig) -> None:
    modes = _io_queue_modes(rig)
    assert modes[(1, False)] and modes[(1, True)]
    rig.driver.write(1, 0, b"\x11" * 512)
    qp = rig.driver.queue(1)
    assert qp.shadow is not None
    assert qp.shadow.load(sq_slot(1, 0)) == qp.sq_tail
    assert qp.shadow.load(cq_slot(1, 0)) == qp.cq_head
    stats = rig.controller.queue_statistics()
    sq1 = next(q for q in stats if q.qid == 1 and not q.is_cq)
    assert sq1.shadow_reads > 0 and sq1.eventidx_writes > 0


def test_config_after_queues_exist_moves_them_onto_the_shadow_page() -> None:
    r = make_rig(shadow_doorbells=False)
    try:
        qp = r.driver.queue(1)
        r.driver.write(1, 3, b"\x22" * 512)  # the queue has moved off slot 0
        pages = r.host_memory.alloc(2 * PAGE_SIZE)
        assert _dbbuf(r, pages.addr, pages.addr + PAGE_SIZE) == 0
        shadow_words = pages.view[:PAGE_SIZE].cast("I")
        # The controller wrote each existing queue's current tail / head into its slot.
        assert shadow_words[sq_slot(1, 0)] == qp.sq_tail == 1
        assert shadow_words[cq_slot(1, 0)] == qp.cq_head == 1
        assert _io_queue_modes(r)[(1, False)]
        shadow_words.release()
        # The host now follows the shadow protocol on that queue; I/O keeps working.
        from vnvme.memory import DwordPage

        shadow, eventidx = DwordPage(pages.view[:PAGE_SIZE]), DwordPage(pages.view[PAGE_SIZE:])
        qp.shadow, qp.eventidx = shadow, eventidx
        for lba in range(20):
            r.driver.write(1, lba, bytes([lba]) * 512)
        assert r.driver.read(1, 7, 1) == bytes([7]) * 512
        assert r.controller.queue_statistics()[1].shadow_mode
        qp.stop_shadow()
        shadow.release()
        eventidx.release()
    finally:
        r.close()


def _rig_for(sq: SqEventIdxPolicy, cq: CqEventIdxPolicy, shadow: bool) -> Rig:
    ns = [Namespace(1, NullBackend(1 << 30), 4096)]
    return make_rig(
        namespaces=ns,
        config=ControllerConfig(sq_eventidx=sq, cq_eventidx=cq),
        shadow_doorbells=shadow,
        controller_polls=sq is SqEventIdxPolicy.POLL,
        trace=(),
    )


@pytest.mark.parametrize("depth", [1, 2, 4, 8])
@pytest.mark.parametrize(
    ("sq_policy", "cq_policy", "shadow", "sq_per_batch", "cq_per_batch"),
    [
        (SqEventIdxPolicy.EAGER, CqEventIdxPolicy.NEVER, False, 1, 1),  # plain MMIO doorbells
        (SqEventIdxPolicy.EAGER, CqEventIdxPolicy.NEVER, True, 1, 0),
        (SqEventIdxPolicy.EAGER, CqEventIdxPolicy.EAGER, True, 1, 1),
        (SqEventIdxPolicy.POLL, CqEventIdxPolicy.NEVER, True, 0, 0),
    ],
)
def test_mmio_per_io_matches_the_policy_exactly(
    depth: int,
    sq_policy: SqEventIdxPolicy,
    cq_policy: CqEventIdxPolicy,
    shadow: bool,
    sq_per_batch: int,
    cq_per_batch: int,
) -> None:
    """A synchronous in-process controller completes a whole batch per wake-up, so the host
    makes one SQ and one CQ doorbell decision per `depth` I/Os; the policy decides which ring."""
    r = _rig_for(sq_policy, cq_policy, shadow)
    try:
        ios = 64 * depth
        before = r.controller.statistics()
        result = run_job(r.driver, JobSpec(iodepth=depth, number_ios=ios, iodepth_batch_submit=0))
        after = r.controller.statistics()
        batches = ios // depth
        assert result.ios == ios
        assert after.doorbell_sq_io - before.doorbell_sq_io == sq_per_batch * batches
        assert after.doorbell_cq_io - before.doorbell_cq_io == cq_per_batch * batches
        # The driver's own count (the engine's) agrees with the controller's.
        assert result.sq_doorbells == sq_per_batch * batches
        assert result.cq_doorbells == cq_per_batch * batches
        if shadow and sq_policy is SqEventIdxPolicy.EAGER:
            assert result.doorbells_per_io <= (1 + cq_per_batch) / depth
    finally:
        r.close()


def test_shadow_tail_beyond_queue_size_is_an_error_not_a_hang(rig: Rig) -> None:
    qp = rig.driver.queue(1)
    assert qp.shadow is not None
    qp.shadow.store(qp.sq_slot, qp.depth + 5)
    before = rig.controller.statistics()
    effects = rig.controller.poll()
    after = rig.controller.statistics()
    assert after.io_commands == before.io_commands
    assert after.invalid_doorbell_writes == before.invalid_doorbell_writes + 1
    assert any(isinstance(e, TraceEvent) and e.name == "pci_nvme_err_shadow_invalid_value" for e in effects)
    assert not rig.controller.fatal


def test_cc_enable_without_dbbuf_support_advertised() -> None:
    r = make_rig(config=ControllerConfig(shadow_doorbells=False))
    try:
        assert not r.driver.dbbuf_enabled
        assert r.driver.admin_command(AdminOpcode.DOORBELL_BUFFER_CONFIG, check=False).status == (
            Status.INVALID_OPCODE | DNR
        )
        r.driver.write(1, 0, b"\x01" * 512)
        assert CC.EN.get(r.controller.mmio_read(Reg.CC, 4)) == 1
    finally:
        r.close()


def test_a_stale_posted_doorbell_behind_the_shadow_slot_is_only_a_wake_up() -> None:
    """Posted MMIO writes (QEMU's vfio-user default) can arrive after the controller has already
    read a newer value from the shadow slot. Taking the old value as a tail would make the
    controller run the whole ring again; as a CQ head it would be an invalid doorbell."""
    r = make_rig()
    try:
        driver, ctrl = r.driver, r.controller
        qp = driver.queue(1)
        assert qp.shadow is not None
        driver.write(1, 0, b"\x01" * 512)  # the host has stored into its slots: they are its own
        completions = ctrl.statistics().completions_posted
        stale_tail = qp.sq_tail
        cids = [qp.submit(driver.io_sqe(qp, NvmOpcode.FLUSH, 1)) for _ in range(3)]
        qp.shadow.store(qp.sq_slot, qp.sq_tail)  # stored, and the controller finds it by itself
        r.transport._handle(ctrl.poll())
        assert ctrl.statistics().completions_posted == completions + 3
        # Now the old value arrives, as a late posted write.
        r.transport.mmio_write(qp.sq_db, 4, stale_tail)
        r.transport.mmio_write(qp.cq_db, 4, qp.cq_head)  # the CQ head before reaping: also stale
        assert ctrl.statistics().completions_posted == completions + 3  # nothing ran twice
        assert ctrl.statistics().invalid_doorbell_writes == 0
        assert qp.shadow.load(qp.sq_slot) == qp.sq_tail  # the host's slot was not rewound
        got = {cqe.cid for cqe in qp.reap()}
        assert set(cids) <= got
        assert driver.read(1, 0, 1) == b"\x01" * 512
    finally:
        r.close()
