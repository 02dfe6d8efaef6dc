"""Doorbell Buffer Config and the EventIdx protocol, driven through the host driver.

NVMe 1.3, Doorbell Buffer Config command: PRP1 is the Shadow Doorbell buffer, PRP2 the EventIdx
buffer, each one memory page and page aligned; SQ y's tail lives at dword (2y) << CAP.DSTRD and
CQ y's head at dword (2y + 1) << CAP.DSTRD of both buffers.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest

import vnvme.controller.controller as controller_module
from host import Rig, make_rig
from vnvme.controller.config import ControllerConfig, CqEventIdxPolicy, SqEventIdxPolicy
from vnvme.controller.namespace import Namespace, NullBackend
from vnvme.driver.transport import PAGE_SIZE
from vnvme.effects import TraceEvent
from vnvme.spec.commands import AdminOpcode, NvmOpcode, Sqe
from vnvme.spec.dbbuf import cq_slot, sq_slot
from vnvme.spec.registers import CC, Reg
from vnvme.spec.status import DNR, Status
from vnvme.workload import run_random_io


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
        assert not r.controller.dbbuf.active
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


def test_linux_style_host_keeps_ringing_mmio_for_the_admin_queue(rig: Rig) -> None:
    """Linux never uses the admin queue's shadow slots: its MMIO values must stay authoritative."""
    before = rig.controller.statistics()
    for _ in range(40):  # more than one lap of the 32-entry admin queue
        rig.driver.identify_controller()
    after = rig.controller.statistics()
    assert after.admin_commands["identify"] - before.admin_commands["identify"] == 40
    assert after.doorbell_sq_admin - before.doorbell_sq_admin == 40
    # The controller noticed the host does not keep the admin slots and kept them current itself;
    # no I/O queue slot was ever behind its MMIO value.
    caught_up = {(e.args[0], e.args[1]) for e in rig.trace.named("pci_nvme_dbbuf_shadow_catchup")}
    assert caught_up == {(0, 0), (0, 1)}
    assert after.shadow_catchups - before.shadow_catchups == 80
    assert rig.driver.dbbuf_pages is not None
    shadow_words = rig.driver.dbbuf_pages[0].view.cast("I")
    assert rig.driver.admin is not None
    assert shadow_words[sq_slot(0, 0)] == rig.driver.admin.sq_tail
    assert shadow_words[cq_slot(0, 0)] == rig.driver.admin.cq_head
    shadow_words.release()


def test_host_that_uses_the_admin_shadow_too() -> None:
    """SPDK issue 2147: the spec allows shadow doorbells for the admin queue; a host may use them."""
    r = make_rig(admin_shadow=True)
    try:
        before = r.driver.stats.admin_sq_doorbell_mmio
        for _ in range(40):
            r.driver.identify_controller()
        # EAGER EventIdx on an idle admin queue: each command still rings (the controller sleeps
        # between them), but nothing had to be caught up: the host keeps its admin slots.
        assert r.driver.stats.admin_sq_doorbell_mmio - before == 40
        assert r.controller.statistics().shadow_catchups <= 2  # the CQ ring before the switch
        modes = _io_queue_modes(r)
        assert modes[(0, False)] and modes[(0, True)]
        r.driver.write(1, 1, b"\x33" * 512)
        assert r.driver.read(1, 1, 1) == b"\x33" * 512
    finally:
        r.close()


def test_values_are_little_endian_in_both_pages(rig: Rig) -> None:
    """QEMU issue 1765: shadow and EventIdx values are 32-bit little-endian."""
    for lba in range(5):
        rig.driver.write(1, lba, b"\x44" * 512)
    shadow_buf, eventidx_buf = rig.driver.dbbuf_pages or (None, None)
    assert shadow_buf is not None and eventidx_buf is not None
    qp = rig.driver.queue(1)
    slot = sq_slot(1, 0)
    assert bytes(shadow_buf.view[4 * slot : 4 * slot + 4]) == struct.pack("<I", qp.sq_tail)
    # Event-driven EAGER policy: EventIdx = the tail the controller consumed last.
    assert bytes(eventidx_buf.view[4 * slot : 4 * slot + 4]) == struct.pack("<I", 5)


def test_reset_forgets_the_pages_and_a_new_config_works(rig: Rig) -> None:
    """OpenVMM PR 4080: after a reset nothing may be written to the old pages."""
    assert rig.driver.dbbuf_pages is not None
    old_shadow, old_eventidx = rig.driver.dbbuf_pages
    rig.driver.disable()
    assert not rig.controller.dbbuf.active
    # The old pages now belong to "someone else": fill them with a pattern.
    old_shadow.view[:] = b"\xee" * PAGE_SIZE
    old_eventidx.view[:] = b"\xdd" * PAGE_SIZE
    # Re-enable without shadow doorbells and do I/O: the pattern must survive.
    rig.driver.want_shadow = False
    rig.driver.probe()
    for lba in range(50):
        rig.driver.write(1, lba, b"\x55" * 512)
    rig.driver.read(1, 3, 1)
    assert bytes(old_shadow.view) == b"\xee" * PAGE_SIZE
    assert bytes(old_eventidx.view) == b"\xdd" * PAGE_SIZE
    # A later Doorbell Buffer Config (next boot) works.
    rig.driver.want_shadow = True
    rig.driver.probe()
    assert rig.driver.dbbuf_enabled and rig.controller.statistics().dbbuf_configs >= 2
    rig.driver.write(1, 9, b"\x66" * 512)
    assert rig.driver.read(1, 9, 1) == b"\x66" * 512


def test_stale_shadow_value_in_a_recreated_queue_is_not_taken_for_a_tail(rig: Rig) -> None:
    """SPDK: older Linux left garbage in the slots after a reset; zero the slot on create."""
    qp = rig.driver.queue(1)
    rig.driver.delete_io_queue_pair(qp)
    assert rig.driver.dbbuf_pages is not None
    shadow_buf = rig.driver.dbbuf_pages[0]
    slot = sq_slot(1, 0)
    shadow_buf.view[4 * slot : 4 * slot + 4] = struct.pack("<I", 7)  # garbage tail
    # Create the queue with raw admin commands (the driver would zero the slot itself).
    sq_mem = rig.host_memory.alloc(16 * 64)
    cq_mem = rig.host_memory.alloc(16 * 16)
    sq_mem.view[:] = b"\x02" * len(sq_mem.view)  # what a garbage tail would make it "fetch"
    rig.driver.admin_command(
        AdminOpcode.CREATE_IO_CQ, prp1=cq_mem.addr, cdw10=(15 << 16) | 1, cdw11=0b11 | (1 << 16)
    )
    rig.driver.admin_command(
        AdminOpcode.CREATE_IO_SQ, prp1=sq_mem.addr, cdw10=(15 << 16) | 1, cdw11=(1 << 16) | 1
    )
    assert bytes(shadow_buf.view[4 * slot : 4 * slot + 4]) == bytes(4)
    before = rig.controller.statistics().io_commands
    rig.controller.poll()
    assert rig.controller.statistics().io_commands == before


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
        result = run_random_io(r.driver, nsid=1, iodepth=depth, ios=ios, controller=r.controller)
        batches = ios // depth
        assert result.ios == ios
        assert result.sq_doorbells == sq_per_batch * batches
        assert result.cq_doorbells == cq_per_batch * batches
        # The driver's own count agrees with the controller's.
        assert r.driver.stats.sq_doorbell_mmio == result.sq_doorbells
        assert r.driver.stats.cq_doorbell_mmio == result.cq_doorbells
        if shadow and sq_policy is SqEventIdxPolicy.EAGER:
            assert result.doorbells_per_io <= (1 + cq_per_batch) / depth
    finally:
        r.close()


def test_publish_reread_race_is_caught_without_a_doorbell(monkeypatch: pytest.MonkeyPatch) -> None:
    """The host stores a new tail exactly between the controller's EventIdx store and its re-read
    (a deliberately slowed controller). The host then reads the old EventIdx... and must not be
    left waiting: the controller's re-read finds the command."""
    r = _rig_for(SqEventIdxPolicy.EAGER, CqEventIdxPolicy.NEVER, True)
    try:
        qp = r.driver.queue(1)
        buf = r.host_memory.alloc(4096)
        injected: list[int] = []
        real_fence: Callable[[], None] = controller_module.full_fence

        def slowed_fence() -> None:
            if not injected:
                # The host's half, racing: SQE + shadow tail store, then it decides from the
                # EventIdx value it sees now (the controller's store is already visible).
                sqe = r.driver.io_sqe(qp, NvmOpcode.READ, 1, 0, 1, buf, length=4096)
                injected.append(qp.submit(sqe))
                assert qp.shadow is not None
                qp.shadow.store(qp.sq_slot, qp.sq_tail)
            real_fence()

        monkeypatch.setattr(controller_module, "full_fence", slowed_fence)
        sqe = r.driver.io_sqe(qp, NvmOpcode.READ, 1, 8, 1, buf, length=4096)
        first = qp.submit(sqe)
        qp.ring_sq()  # one MMIO; the controller runs, publishes EventIdx, the host races in
        stats = r.controller.statistics()
        assert stats.rearms_lost >= 1
        assert stats.io_commands["read"] == 2  # the raced command was processed too
        assert stats.doorbell_sq_io == 1
        got = {c.cid for c in qp.reap()}
        assert got == {first, injected[0]}
    finally:
        r.close()


def test_rearm_attempts_are_bounded_and_work_is_left_pending(monkeypatch: pytest.MonkeyPatch) -> None:
    """A host that keeps moving the tail at every rearm: the controller gives up after
    max_rearm_attempts, leaves the SQ pending (latency, not a hang) and catches up next pass."""
    r = make_rig(
        namespaces=[Namespace(1, NullBackend(1 << 30), 4096)],
        config=ControllerConfig(max_rearm_attempts=2),
        trace=("pci_nvme_err_rearm_exhausted",),
    )
    try:
        qp = r.driver.queue(1)
        buf = r.host_memory.alloc(4096)
        real_fence: Callable[[], None] = controller_module.full_fence
        budget = [5]

        def hostile_fence() -> None:
            if budget[0] > 0 and qp.can_submit():
                budget[0] -= 1
                qp.submit(r.driver.io_sqe(qp, NvmOpcode.READ, 1, 0, 1, buf, length=4096))
                assert qp.shadow is not None
                qp.shadow.store(qp.sq_slot, qp.sq_tail)
            real_fence()

        monkeypatch.setattr(controller_module, "full_fence", hostile_fence)
        qp.submit(r.driver.io_sqe(qp, NvmOpcode.READ, 1, 0, 1, buf, length=4096))
        r.transport.mmio_write(qp.sq_db, 4, qp.sq_tail)
        qp.last_sq_tail = qp.sq_tail
        assert r.trace.named("pci_nvme_err_rearm_exhausted")
        # Everything submitted gets processed without another doorbell.
        for _ in range(10):
            r.transport.device_idle()
        assert r.controller.statistics().io_commands["read"] == 6
        assert len(qp.reap()) == 6
    finally:
        r.close()


def test_full_cq_with_shadow_heads_never_stalls() -> None:
    """QEMU fa5db2aa trade-off: with CQ policy NEVER the host is not asked for head doorbells,
    so when the CQ fills the controller must ask (EventIdx = head) and resume on the ring."""
    r = make_rig(
        namespaces=[Namespace(1, NullBackend(1 << 30), 4096)], io_queue_depth=8, io_queues=2, trace=()
    )
    try:
        qp = r.driver.queue(1)
        # A second SQ sharing CQ 1 lets the host queue more commands than the CQ can hold.
        r.driver.delete_io_queue_pair(r.driver.queue(2))
        sq2_mem = r.host_memory.alloc(8 * 64)
        r.driver.admin_command(
            AdminOpcode.CREATE_IO_SQ, prp1=sq2_mem.addr, cdw10=(7 << 16) | 2, cdw11=(1 << 16) | 1
        )
        buf = r.host_memory.alloc(4096)
        for _ in range(7):
            qp.submit(r.driver.io_sqe(qp, NvmOpcode.READ, 1, 0, 1, buf, length=4096))
        qp.ring_sq()
        # CQ of 8 entries holds 7: now full. Commands on SQ 2 must wait for room.
        sqe2 = Sqe(NvmOpcode.READ, 0, 900, 1, 0, 0, 0, buf.addr, 0, 0, 0, 0)
        for index in range(3):
            struct.pack_into("<BBHIIIQQQ6I", sq2_mem.view, index * 64, *sqe2._replace(cid=900 + index))
        assert qp.shadow is not None and qp.eventidx is not None
        qp.shadow.store(sq_slot(2, 0), 3)
        r.transport.mmio_write(0x1000 + 2 * 2 * 4, 4, 3)
        assert r.controller.statistics().io_commands["read"] == 7  # blocked on the full CQ
        # The controller asked for a head doorbell: EventIdx = head.
        assert qp.eventidx.load(cq_slot(1, 0)) == 0
        got = qp.reap()  # the host's head update crosses EventIdx: it rings
        assert len(got) == 7
        assert r.controller.statistics().doorbell_cq_io == 1
        assert r.controller.statistics().io_commands["read"] == 10
        late = qp.reap()
        assert sorted(c.cid for c in late) == [900, 901, 902]
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
