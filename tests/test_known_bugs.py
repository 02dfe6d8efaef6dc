"""Regression tests named after failures seen in other shadow doorbell implementations.

Each test reproduces the situation that broke QEMU hw/nvme, Linux nvme-pci, SPDK or OpenVMM
(see the project's design notes on Doorbell Buffer Config) and asserts vnvme's behaviour there.
Every one of them was checked to fail with the corresponding part of the controller broken.

NVMe 1.3 Doorbell Buffer Config (admin opcode 7Ch): PRP1 is the Shadow Doorbell buffer, PRP2 the
EventIdx buffer; SQ y's tail slot is dword (2y) << CAP.DSTRD, CQ y's head slot (2y + 1) << DSTRD.
"""

from __future__ import annotations

import struct
import types
from collections.abc import Callable

import pytest

import vnvme.controller.doorbells as doorbells_module
import vnvme.memory as memory_module
from host import Rig, make_rig
from vnvme.controller.config import ControllerConfig, CqEventIdxPolicy, SqEventIdxPolicy
from vnvme.controller.doorbells import Doorbells, QueueDoorbell
from vnvme.controller.namespace import Namespace, NullBackend, RamBackend
from vnvme.driver.transport import PAGE_SIZE, DmaBuffer
from vnvme.spec import registers as regs
from vnvme.spec.commands import AdminOpcode, NvmOpcode, Sqe
from vnvme.spec.dbbuf import cq_slot, sq_slot
from vnvme.spec.registers import Reg

_SQE = struct.Struct("<BBHIIIQQQ6I")


def _null_rig(**options: object) -> Rig:
    return make_rig(namespaces=[Namespace(1, NullBackend(1 << 30), 4096)], trace=(), **options)  # type: ignore[arg-type]


def _reads(rig: Rig) -> int:
    return rig.controller.statistics().io_commands.get("read", 0)


def _place_reads(sq_memory: memoryview, count: int, buf_addr: int, first_cid: int = 900) -> None:
    """Well-formed Read commands in an SQ ring (what a stale tail would make the controller run)."""
    for index in range(count):
        sqe = Sqe(NvmOpcode.READ, 0, first_cid + index, 1, 0, 0, 0, buf_addr, 0, 0, 0, 0)
        _SQE.pack_into(sq_memory, index * 64, *sqe)


# Section: QEMU issue 1765 (endianness of shadow and EventIdx values)


@pytest.mark.parametrize(
    "page_access",
    # explicit-packing replaces memory's sys, which compiled memory.py does not look up again.
    ["native-cast", pytest.param("explicit-packing", marks=pytest.mark.pure_python)],
)
def test_qemu_1765_shadow_and_eventidx_values_are_little_endian(
    monkeypatch: pytest.MonkeyPatch, page_access: str
) -> None:
    """Both buffers hold 32-bit little-endian values whatever the host's byte order. QEMU read
    and wrote them in host order, which broke big-endian hosts. ``explicit-packing`` forces the
    code path a big-endian host takes (memory.DwordPage without a native cast)."""
    if page_access == "explicit-packing":
        monkeypatch.setattr(memory_module, "sys", types.SimpleNamespace(byteorder="big"))
    r = _null_rig(io_queue_depth=64)
    try:
        qp = r.driver.queue(1)
        assert r.driver.dbbuf_pages is not None
        shadow_buf, eventidx_buf = r.driver.dbbuf_pages
        slot = sq_slot(1, 0)
        buf = r.host_memory.alloc(4096)
        for _ in range(3):
            qp.submit(r.driver.io_sqe(qp, NvmOpcode.READ, 1, 0, 1, buf, length=4096))
        # The host's tail as raw little-endian bytes; byte-swapped it would be 0x03000000, far
        # beyond the 64-entry queue (an invalid value: nothing would be fetched).
        shadow_buf.view[4 * slot : 4 * slot + 4] = b"\x03\x00\x00\x00"
        r.controller.poll()
        assert _reads(r) == 3
        assert r.controller.statistics().invalid_doorbell_writes == 0
        # EventIdx = the tail just consumed (EAGER), stored little-endian.
        assert bytes(eventidx_buf.view[4 * slot : 4 * slot + 4]) == b"\x03\x00\x00\x00"
        # The CQ EventIdx (policy NEVER: head - 1 = 63 with nothing consumed yet), little-endian.
        cslot = cq_slot(1, 0)
        assert bytes(eventidx_buf.view[4 * cslot : 4 * cslot + 4]) == struct.pack("<I", 63)
        qp.last_sq_tail = qp.sq_tail
        assert len(qp.reap()) == 3
        # And what the controller writes into the shadow page itself (Doorbell Buffer Config
        # copies each existing queue's values there) is little-endian too.
        r.driver.write(1, 0, b"\x01" * 4096)
        assert bytes(shadow_buf.view[4 * slot : 4 * slot + 4]) == struct.pack("<I", qp.sq_tail)
    finally:
        r.close()


# Section: QEMU fa5db2aa (CQ EventIdx)


def test_qemu_fa5db2aa_host_never_waits_for_a_cq_doorbell_the_controller_did_not_ask_for() -> None:
    """QEMU 8.0 started publishing CQ EventIdx because a host may skip the CQ head doorbell
    (it did on riscv64) and the controller then waited for one. With CQ policy NEVER the host is
    never asked to ring for a CQ head, so the controller must learn heads from the shadow slot
    itself when it needs room: here the CQ fills, the host consumes without ringing, and the
    next commands run anyway."""
    r = _null_rig(io_queue_depth=8, config=ControllerConfig(cq_eventidx=CqEventIdxPolicy.NEVER))
    try:
        qp = r.driver.queue(1)
        buf = r.host_memory.alloc(4096)
        for _ in range(7):
            qp.submit(r.driver.io_sqe(qp, NvmOpcode.READ, 1, 0, 1, buf, length=4096))
        qp.ring_sq()
        assert _reads(r) == 7  # 7 of the CQ's 8 entries used: the CQ is full
        assert len(qp.reap()) == 7  # the host stores its head in the shadow slot only
        assert r.driver.stats.cq_doorbell_mmio == 0
        for _ in range(7):
            qp.submit(r.driver.io_sqe(qp, NvmOpcode.READ, 1, 0, 1, buf, length=4096))
        qp.ring_sq()
        # Room found through the shadow head: no CQ doorbell, nothing waiting.
        assert _reads(r) == 14
        assert len(qp.reap()) == 7
        stats = r.controller.statistics()
        assert stats.doorbell_cq_io == 0
        assert not r.controller.has_pending_work
    finally:
        r.close()


def _shared_cq_rig() -> tuple[Rig, DmaBuffer]:
    """CQ 1 (8 entries) shared by SQ 1 and a second SQ 2 (raw), so more commands than the CQ
    holds can be outstanding. Returns the rig and SQ 2's ring."""
    r = _null_rig(io_queue_depth=8, io_queues=2)
    r.driver.delete_io_queue_pair(r.driver.queue(2))
    sq2 = r.host_memory.alloc(8 * 64)
    r.driver.admin_command(AdminOpcode.CREATE_IO_SQ, prp1=sq2.addr, cdw10=(7 << 16) | 2, cdw11=(1 << 16) | 1)
    return r, sq2


def test_qemu_fa5db2aa_controller_never_stalls_on_a_full_cq() -> None:
    """With CQ policy NEVER the host is not asked for head doorbells, so a controller blocked on
    a full CQ must ask (EventIdx = head) and resume on the ring; otherwise it stalls forever."""
    r, sq2 = _shared_cq_rig()
    try:
        qp = r.driver.queue(1)
        buf = r.host_memory.alloc(4096)
        for _ in range(7):
            qp.submit(r.driver.io_sqe(qp, NvmOpcode.READ, 1, 0, 1, buf, length=4096))
        qp.ring_sq()
        _place_reads(sq2.view, 3, buf.addr)
        assert qp.shadow is not None and qp.eventidx is not None
        qp.shadow.store(sq_slot(2, 0), 3)
        r.transport.mmio_write(regs.sq_tail_doorbell(2, 0), 4, 3)
        assert _reads(r) == 7  # blocked on the full CQ
        assert qp.eventidx.load(cq_slot(1, 0)) == 0  # asks for a doorbell: EventIdx = head
        got = qp.reap()  # the host's head update crosses EventIdx: it rings
        assert len(got) == 7
        assert r.controller.statistics().doorbell_cq_io == 1
        assert _reads(r) == 10
        assert sorted(c.cid for c in qp.reap()) == [900, 901, 902]
        assert not r.controller.has_pending_work
    finally:
        r.close()


@pytest.mark.pure_python
def test_qemu_fa5db2aa_full_cq_race_host_consumes_just_before_the_controller_asks() -> None:
    """The lost wake-up on the CQ side: the host stores its new head and loads EventIdx (still
    head - 1: no doorbell) just before the blocked controller publishes EventIdx = head. Only the
    controller's re-read after its fence can see the room; without it the SQ stalls forever."""
    r, sq2 = _shared_cq_rig()
    try:
        qp = r.driver.queue(1)
        ctrl = r.controller
        buf = r.host_memory.alloc(4096)
        reaped: list[int] = []
        real_probe = Doorbells.probe

        def racing_probe(doorbells: Doorbells, queue: QueueDoorbell, value: int, size: int = 1 << 32) -> int:
            if queue.slot == cq_slot(1, 0) and not reaped:
                reaped.append(len(qp.reap()))  # sees EventIdx = head - 1: does not ring
            return real_probe(doorbells, queue, value, size)

        for _ in range(7):
            qp.submit(r.driver.io_sqe(qp, NvmOpcode.READ, 1, 0, 1, buf, length=4096))
        qp.ring_sq()
        _place_reads(sq2.view, 3, buf.addr)
        assert qp.shadow is not None
        qp.shadow.store(sq_slot(2, 0), 3)
        with pytest.MonkeyPatch.context() as m:
            m.setattr(Doorbells, "probe", racing_probe)
            r.transport.mmio_write(regs.sq_tail_doorbell(2, 0), 4, 3)
        assert reaped == [7]
        assert _reads(r) == 10  # SQ 2's commands ran without a CQ doorbell
        assert ctrl.statistics().doorbell_cq_io == 0
        assert sorted(c.cid for c in qp.reap()) == [900, 901, 902]
        assert not ctrl.has_pending_work
    finally:
        r.close()


# Section: OpenVMM PR 4080 (reset with shadow doorbells active)


def _reset_by(rig: Rig, kind: str) -> None:
    if kind == "cc-enable-cleared":
        rig.driver.disable()
    elif kind == "bus-reset":
        rig.controller.reset()
        rig.driver.disable()
    else:  # NVM Subsystem Reset (§7.3.1)
        rig.transport.mmio_write(Reg.NSSR, 4, regs.NSSR_MAGIC)
        rig.driver.disable()


@pytest.mark.parametrize("kind", ["cc-enable-cleared", "bus-reset", "nssr"])
def test_openvmm_4080_reset_with_shadow_doorbells_active_never_touches_the_old_pages(kind: str) -> None:
    """OpenVMM kept the guest's pages across a reset and, after a reboot, wrote EventIdx values
    into memory the new kernel had reused. After any reset vnvme neither reads nor writes the old
    pages (§7.3.2: a controller reset deletes the queues; the buffer addresses go with them),
    and the next Doorbell Buffer Config works."""
    r = make_rig(io_queue_depth=16, trace=())
    try:
        r.driver.write(1, 0, b"\x11" * 512)  # I/O queue 1 is on its shadow slots
        assert r.driver.dbbuf_pages is not None
        old_shadow, old_eventidx = r.driver.dbbuf_pages
        _reset_by(r, kind)
        assert not r.controller.doorbells.active
        # The pages now belong to someone else. Every shadow slot reads as tail 3: a controller
        # still reading them would fetch (zeroed, so Flush-like garbage) commands by itself.
        old_shadow.view[:] = struct.pack("<I", 3) * (PAGE_SIZE // 4)
        old_eventidx.view[:] = b"\xdd" * PAGE_SIZE
        r.driver.want_shadow = False
        r.driver.probe()
        before = r.controller.statistics().io_commands
        for lba in range(40):  # more than two laps of the 16-entry queue
            r.driver.write(1, lba, bytes([lba]) * 512)
        assert r.driver.read(1, 7, 1) == bytes([7]) * 512
        after = r.controller.statistics().io_commands
        assert after["write"] - before.get("write", 0) == 40
        assert after["read"] - before.get("read", 0) == 1
        assert bytes(old_shadow.view) == struct.pack("<I", 3) * (PAGE_SIZE // 4)
        assert bytes(old_eventidx.view) == b"\xdd" * PAGE_SIZE
        # The next boot's Doorbell Buffer Config works.
        configs = r.controller.statistics().dbbuf_configs
        r.driver.want_shadow = True
        r.driver.probe()
        assert r.driver.dbbuf_enabled and r.controller.statistics().dbbuf_configs == configs + 1
        r.driver.write(1, 9, b"\x66" * 512)
        assert r.driver.read(1, 9, 1) == b"\x66" * 512
        assert r.driver.queue(1).shadow is not None
    finally:
        r.close()


# Section: SPDK, stale shadow values ("garbage after reset")


def test_spdk_garbage_after_reset_stale_tail_in_a_reused_shadow_page_is_not_fetched() -> None:
    """Older Linux kept its shadow page across a controller reset and did not clear the slots;
    after the reset it configured the same page again and created queues whose slots still held
    the old tails. SPDK zeroes a queue's slot at creation, and so does vnvme."""
    r = make_rig(io_queue_depth=16, trace=())
    try:
        for lba in range(5):
            r.driver.write(1, lba, b"\x22" * 512)
        assert r.driver.dbbuf_pages is not None
        shadow_buf, eventidx_buf = r.driver.dbbuf_pages
        slot = sq_slot(1, 0)
        assert struct.unpack_from("<I", shadow_buf.view, 4 * slot)[0] == 5  # the old tail, left there
        # A reset and a bring-up done by hand, as that host did it: same pages, not cleared.
        r.driver.disable()
        r.driver.want_shadow = False
        r.driver.probe()  # admin queue and I/O queue 1 on plain doorbells
        r.driver.delete_io_queue_pair(r.driver.queue(1))
        assert struct.unpack_from("<I", shadow_buf.view, 4 * slot)[0] == 5
        r.driver.admin_command(
            AdminOpcode.DOORBELL_BUFFER_CONFIG, prp1=shadow_buf.addr, prp2=eventidx_buf.addr
        )
        sq_mem, cq_mem = r.host_memory.alloc(16 * 64), r.host_memory.alloc(16 * 16)
        buf = r.host_memory.alloc(4096)
        _place_reads(sq_mem.view, 16, buf.addr)  # what the stale tail would make it run
        before = _reads(r)
        r.driver.admin_command(
            AdminOpcode.CREATE_IO_CQ, prp1=cq_mem.addr, cdw10=(15 << 16) | 1, cdw11=0b11 | (1 << 16)
        )
        r.driver.admin_command(
            AdminOpcode.CREATE_IO_SQ, prp1=sq_mem.addr, cdw10=(15 << 16) | 1, cdw11=(1 << 16) | 1
        )
        r.controller.poll()  # look at every shadow tail as if rung
        assert _reads(r) == before
        assert struct.unpack_from("<I", shadow_buf.view, 4 * slot)[0] == 0
        sq = r.controller.sqs[1]
        assert sq is not None and sq.head == 0 and sq.shadow_mode
    finally:
        r.close()


def test_spdk_stale_tail_in_a_recreated_queue_is_not_fetched(rig: Rig) -> None:
    """The same without a reset: a queue deleted and created again while shadow doorbells stay
    on finds the previous queue's tail in its slot."""
    qp = rig.driver.queue(1)
    rig.driver.delete_io_queue_pair(qp)
    assert rig.driver.dbbuf_pages is not None
    shadow_buf = rig.driver.dbbuf_pages[0]
    slot = sq_slot(1, 0)
    shadow_buf.view[4 * slot : 4 * slot + 4] = struct.pack("<I", 7)  # garbage tail
    sq_mem, cq_mem = rig.host_memory.alloc(16 * 64), rig.host_memory.alloc(16 * 16)
    buf = rig.host_memory.alloc(4096)
    _place_reads(sq_mem.view, 16, buf.addr)
    before = rig.controller.statistics().io_commands
    rig.driver.admin_command(
        AdminOpcode.CREATE_IO_CQ, prp1=cq_mem.addr, cdw10=(15 << 16) | 1, cdw11=0b11 | (1 << 16)
    )
    rig.driver.admin_command(
        AdminOpcode.CREATE_IO_SQ, prp1=sq_mem.addr, cdw10=(15 << 16) | 1, cdw11=(1 << 16) | 1
    )
    assert bytes(shadow_buf.view[4 * slot : 4 * slot + 4]) == bytes(4)
    rig.controller.poll()
    assert rig.controller.statistics().io_commands == before


# Section: SPDK issue 2147 (which queues use the shadow buffer)


def test_spdk_2147_host_rings_mmio_for_admin_and_uses_shadow_for_io(rig: Rig) -> None:
    """Linux (and SPDK's host) never use the admin queue's shadow slots: their MMIO values must
    stay authoritative there, while I/O queues work from their slots."""
    before = rig.controller.statistics()
    for _ in range(40):  # more than one lap of the 32-entry admin queue
        rig.driver.identify_controller()
    after = rig.controller.statistics()
    assert after.admin_commands["identify"] - before.admin_commands["identify"] == 40
    assert after.doorbell_sq_admin - before.doorbell_sq_admin == 40
    # The controller noticed the host does not keep the admin slots and kept them current.
    caught_up = {(e.args[0], e.args[1]) for e in rig.trace.named("pci_nvme_dbbuf_shadow_catchup")}
    assert caught_up == {(0, 0), (0, 1)}
    assert after.shadow_catchups - before.shadow_catchups == 80
    assert rig.driver.dbbuf_pages is not None and rig.driver.admin is not None
    shadow_words = rig.driver.dbbuf_pages[0].view.cast("I")
    try:
        assert shadow_words[sq_slot(0, 0)] == rig.driver.admin.sq_tail
        assert shadow_words[cq_slot(0, 0)] == rig.driver.admin.cq_head
    finally:
        shadow_words.release()
    # I/O on the shadow slots: the host keeps them, nothing caught up, no CQ doorbell.
    for lba in range(20):
        rig.driver.write(1, lba, bytes([lba]) * 512)
    assert rig.driver.read(1, 13, 1) == bytes([13]) * 512
    final = rig.controller.statistics()
    assert final.shadow_catchups == after.shadow_catchups
    assert final.doorbell_cq_io == 0


def test_spdk_2147_host_uses_shadow_for_admin_and_io() -> None:
    """The spec allows shadow doorbells for the admin queue too; a host may use them."""
    r = make_rig(admin_shadow=True, trace=())
    try:
        before = r.driver.stats.admin_sq_doorbell_mmio
        for _ in range(40):
            r.driver.identify_controller()
        # EAGER EventIdx on an idle admin queue: each command still rings (the controller sleeps
        # between them), and nothing had to be caught up: the host keeps its admin slots.
        assert r.driver.stats.admin_sq_doorbell_mmio - before == 40
        assert r.controller.statistics().admin_commands["identify"] >= 40
        assert r.controller.statistics().shadow_catchups <= 2  # the CQ ring before the switch
        assert r.driver.admin is not None and r.driver.admin.shadow is not None
        sq0, cq0 = r.controller.sqs[0], r.controller.cqs[0]
        assert sq0 is not None and sq0.shadow_mode and sq0.doorbell.slot_kept
        assert cq0 is not None and cq0.shadow_mode
        r.driver.write(1, 1, b"\x33" * 512)
        assert r.driver.read(1, 1, 1) == b"\x33" * 512
    finally:
        r.close()


# Section: the EventIdx race


def test_eventidx_race_tail_written_while_the_controller_publishes_is_processed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The host stores a new tail exactly between the controller's EventIdx store and its re-read
    (a deliberately slowed controller), so it may not ring. The controller's re-read after its
    fence finds the command: processed with no further doorbell, nothing left pending."""
    r = _null_rig(config=ControllerConfig(sq_eventidx=SqEventIdxPolicy.EAGER))
    try:
        qp = r.driver.queue(1)
        buf = r.host_memory.alloc(4096)
        injected: list[int] = []
        real_fence: Callable[[], None] = doorbells_module.full_fence

        def slowed_fence() -> None:
            if not injected:
                sqe = r.driver.io_sqe(qp, NvmOpcode.READ, 1, 0, 1, buf, length=4096)
                injected.append(qp.submit(sqe))
                assert qp.shadow is not None
                qp.shadow.store(qp.sq_slot, qp.sq_tail)
            real_fence()

        monkeypatch.setattr(doorbells_module, "full_fence", slowed_fence)
        first = qp.submit(r.driver.io_sqe(qp, NvmOpcode.READ, 1, 8, 1, buf, length=4096))
        qp.ring_sq()  # one MMIO; the controller runs, publishes EventIdx, the host races in
        stats = r.controller.statistics()
        sq = r.controller.sqs[1]
        assert sq is not None and (sq.rearms_lost, sq.rearms_won) == (1, 1)
        assert stats.io_commands["read"] == 2  # the raced command was processed too
        assert stats.doorbell_sq_io == 1
        assert not r.controller.has_pending_work
        assert {c.cid for c in qp.reap()} == {first, injected[0]}
    finally:
        r.close()


def test_eventidx_race_rearm_attempts_are_bounded_and_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    """A host that moves the tail at every rearm: the controller gives up after
    max_rearm_attempts (counted as lost rearms), leaves the SQ pending instead of sleeping or
    spinning, and takes the rest on its next pass without another doorbell."""
    r = make_rig(
        namespaces=[Namespace(1, RamBackend(1 << 20), 4096)],
        config=ControllerConfig(max_rearm_attempts=2, sq_eventidx=SqEventIdxPolicy.EAGER),
        trace=("pci_nvme_err_rearm_exhausted",),
    )
    try:
        qp = r.driver.queue(1)
        buf = r.host_memory.alloc(4096)
        real_fence: Callable[[], None] = doorbells_module.full_fence
        budget = [2]

        def hostile_fence() -> None:
            if budget[0] > 0 and qp.can_submit():
                budget[0] -= 1
                qp.submit(r.driver.io_sqe(qp, NvmOpcode.READ, 1, 0, 1, buf, length=4096))
                assert qp.shadow is not None
                qp.shadow.store(qp.sq_slot, qp.sq_tail)
            real_fence()

        monkeypatch.setattr(doorbells_module, "full_fence", hostile_fence)
        qp.submit(r.driver.io_sqe(qp, NvmOpcode.READ, 1, 0, 1, buf, length=4096))
        r.controller.mmio_write(qp.sq_db, 4, qp.sq_tail)  # the doorbell alone, no pass yet
        qp.last_sq_tail = qp.sq_tail
        sq = r.controller.sqs[1]
        assert sq is not None
        # One pass of 2 commands: each rearm loses to the host, the second loss ends the tries.
        r.transport._handle(r.controller.process(budget=2))
        exhausted = r.trace.named("pci_nvme_err_rearm_exhausted")
        assert [e.args for e in exhausted] == [(1, 2)]  # gave up after exactly 2 attempts
        assert (sq.rearms_lost, sq.rearms_won) == (2, 0)
        assert r.controller.statistics().io_commands["read"] == 2
        assert r.controller.has_pending_work  # left pending: it neither sleeps nor spins
        r.transport.device_idle()  # the next pass takes the third command, and then rests
        stats = r.controller.statistics()
        assert stats.io_commands["read"] == 3
        assert stats.doorbell_sq_io == 1
        assert (sq.rearms_lost, sq.rearms_won) == (2, 1)
        assert not r.controller.has_pending_work
        assert len(qp.reap()) == 3
    finally:
        r.close()
