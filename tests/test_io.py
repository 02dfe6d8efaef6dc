"""NVM I/O commands through the host driver (NVMe 1.4 §6): data, ranges, statuses, queues."""

from __future__ import annotations

import random
import struct
from collections.abc import Iterator

import pytest

from host import Rig, make_rig
from vnvme.controller.config import ControllerConfig
from vnvme.controller.namespace import Namespace, NullBackend, RamBackend
from vnvme.driver.driver import QueuePair
from vnvme.driver.transport import PAGE_SIZE, DmaBuffer
from vnvme.spec.commands import NSID_BROADCAST, Cqe, NvmOpcode
from vnvme.spec.identify import DLFEAT_READ_ZEROES, DLFEAT_WRITE_ZEROES_DEALLOCATE
from vnvme.spec.status import DNR, Status

_FUA = 1 << 30
_DEAC = 1 << 25
_AD = 1 << 2  # Dataset Management attribute: Deallocate


def pattern(seed: int, length: int) -> bytes:
    return random.Random(seed).randbytes(length)


@pytest.fixture
def ram() -> Iterator[Rig]:
    """ns 1: 16 MiB ram, 512 B LBAs; ns 2: 16 MiB ram, 4 KiB LBAs. MDTS 2^11 pages = 8 MiB."""
    r = make_rig(
        namespaces=[Namespace(1, RamBackend(16 << 20), 512), Namespace(2, RamBackend(16 << 20), 4096)],
        config=ControllerConfig(mdts=11),
        trace=(),
    )
    try:
        yield r
    finally:
        r.close()


def _stored(rig: Rig, nsid: int, slba: int, nlb: int) -> bytes:
    """What the namespace's backend holds, read behind the controller's back."""
    ns = rig.controller.namespaces[nsid]
    out = bytearray(nlb * ns.lba_size)
    ns.backend.read_into(slba * ns.lba_size, memoryview(out))
    return bytes(out)


def _command(
    rig: Rig,
    opcode: int,
    nsid: int,
    slba: int = 0,
    nlb: int = 1,
    buf: DmaBuffer | None = None,
    *,
    offset: int = 0,
    length: int = 0,
    cdw12_flags: int = 0,
    qid: int = 1,
) -> int:
    """One command through the driver's PRP setup; the completion status."""
    qp = rig.driver.queue(qid)
    sqe = rig.driver.io_sqe(
        qp, opcode, nsid, slba, nlb, buf, offset=offset, length=length, cdw12_flags=cdw12_flags
    )
    return rig.driver.io_command(qp, sqe, check=False).status


def _dsm(rig: Rig, nsid: int, ranges: list[tuple[int, int]], attributes: int = _AD) -> int:
    raw = b"".join(struct.pack("<IIQ", 0, nlb, slba) for slba, nlb in ranges)
    buf = rig.host_memory.alloc(len(raw))
    buf.view[:] = raw
    qp = rig.driver.queue(1)
    sqe = rig.driver.io_sqe(qp, NvmOpcode.DATASET_MANAGEMENT, nsid, buf=buf, length=len(raw))
    sqe = sqe._replace(cdw10=len(ranges) - 1, cdw11=attributes, cdw12=0)
    status = rig.driver.io_command(qp, sqe, check=False).status
    rig.host_memory.free(buf)
    return status


# Section: Read / Write data


@pytest.mark.parametrize(
    ("nsid", "nlb"),
    [
        (1, 1),
        (1, 7),
        (1, 8),  # one page
        (1, 9),  # PRP1 + PRP2
        (1, 16),  # two pages: PRP2 is a data pointer
        (1, 17),  # three pages: PRP2 is a list pointer
        (1, 1024),  # 512 KiB: a 127-entry list
        (2, 1),
        (2, 2),
        (2, 3),
        (2, 513),  # 512 list entries: one full list page, no chain
        (2, 514),  # 513 entries: the first list page chains on its last slot
        (2, 1024),  # 4 MiB: 1023 entries, two list pages (the last holds 512 entries)
        (2, 1025),  # 1024 entries: three list pages
        (2, 2048),  # 8 MiB = MDTS: 2047 entries over five list pages
        (1, 8192),  # 4 MiB of 512 B LBAs
    ],
)
def test_write_then_read_returns_the_data(ram: Rig, nsid: int, nlb: int) -> None:
    lba_size = ram.driver.namespaces[nsid].lba_size
    data = pattern(nlb * nsid, nlb * lba_size)
    slba = 3
    ram.driver.write(nsid, slba, data)
    assert _stored(ram, nsid, slba, nlb) == data
    assert ram.driver.read(nsid, slba, nlb) == data
    # The neighbours are untouched.
    assert ram.driver.read(nsid, slba - 1, 1) == bytes(lba_size)
    assert ram.driver.read(nsid, slba + nlb, 1) == bytes(lba_size)
    stats = ram.controller.statistics().io_commands
    assert stats == {"write": 1, "read": 3}


def test_chained_prp_lists_really_are_chained(ram: Rig) -> None:
    """An 8 MiB read: the driver's PRP list spans five pages, each chaining to the next."""
    size = 8 << 20
    ram.driver.write(2, 0, pattern(5, size))
    qp = ram.driver.queue(1)
    buf = ram.host_memory.alloc(size)
    sqe = ram.driver.io_sqe(qp, NvmOpcode.READ, 2, 0, size // 4096, buf, length=size)
    assert sqe.prp1 == buf.addr and sqe.prp2 & (PAGE_SIZE - 1) == 0
    lst = qp.prp_lists[qp.free_cids[-1]]
    assert lst.size == 5 * PAGE_SIZE
    for page in range(4):
        (chain,) = struct.unpack_from("<Q", lst.view, (page + 1) * PAGE_SIZE - 8)
        assert chain == lst.addr + (page + 1) * PAGE_SIZE
    assert ram.driver.io_command(qp, sqe).status == Status.SUCCESS
    assert bytes(buf.view) == pattern(5, size)


@pytest.mark.parametrize("offset", [4, 0x200, 0x800, 0xFFC])
@pytest.mark.parametrize(("nsid", "nlb"), [(1, 1), (1, 8), (1, 24), (2, 1), (2, 2), (2, 600)])
def test_buffers_with_an_in_page_offset(ram: Rig, offset: int, nsid: int, nlb: int) -> None:
    """PRP1 carries an offset; the rest of the buffer follows page by page (§4.3)."""
    lba_size = ram.driver.namespaces[nsid].lba_size
    length = nlb * lba_size
    data = pattern(offset + nlb, length)
    src = ram.host_memory.alloc(length + PAGE_SIZE)
    src.view[offset : offset + length] = data
    assert _command(ram, NvmOpcode.WRITE, nsid, 10, nlb, src, offset=offset, length=length) == 0
    assert _stored(ram, nsid, 10, nlb) == data
    dst = ram.host_memory.alloc(length + PAGE_SIZE)
    dst.view[:] = b"\xcc" * len(dst.view)
    back = (offset * 3) & 0xFFC  # a different offset on the way back
    assert _command(ram, NvmOpcode.READ, nsid, 10, nlb, dst, offset=back, length=length) == 0
    assert bytes(dst.view[back : back + length]) == data
    assert bytes(dst.view[:back]) == b"\xcc" * back
    assert bytes(dst.view[back + length :]) == b"\xcc" * (len(dst.view) - back - length)


def test_buffer_offset_that_is_not_dword_aligned(ram: Rig) -> None:
    buf = ram.host_memory.alloc(2 * PAGE_SIZE)
    for offset in (1, 2, 3, 0x1FF):
        status = _command(ram, NvmOpcode.WRITE, 1, 0, 1, buf, offset=offset, length=512)
        assert status == Status.PRP_OFFSET_INVALID | DNR
    assert _stored(ram, 1, 0, 1) == bytes(512)


def test_fua_write(ram: Rig) -> None:
    ram.driver.write(1, 40, b"\x42" * 1024, fua=True)
    assert ram.driver.read(1, 40, 2) == b"\x42" * 1024


# Section: ranges, limits, namespaces, opcodes


@pytest.mark.parametrize(
    "opcode", [NvmOpcode.READ, NvmOpcode.WRITE, NvmOpcode.COMPARE, NvmOpcode.WRITE_ZEROES]
)
def test_lba_range_beyond_the_namespace(ram: Rig, opcode: int) -> None:
    nlba = ram.driver.namespaces[1].nlba
    assert nlba == (16 << 20) // 512
    ram.driver.write(1, nlba - 1, b"\x99" * 512)
    buf = ram.host_memory.alloc(2 * PAGE_SIZE)
    buf.view[:1024] = b"\x99" * 1024
    for slba, nlb in ((nlba - 1, 2), (nlba, 1), (nlba + 100, 1), (2**64 - 1, 1), (2**63, 16)):
        status = _command(ram, opcode, 1, slba, nlb, buf, length=nlb * 512)
        assert status == Status.LBA_OUT_OF_RANGE | DNR, (slba, nlb)
    # The last LBA itself is fine, and nothing was changed by the failures.
    assert _command(ram, opcode, 1, nlba - 1, 1, buf, length=512) == Status.SUCCESS
    if opcode == NvmOpcode.WRITE_ZEROES:
        assert _stored(ram, 1, nlba - 1, 1) == bytes(512)
    else:
        assert _stored(ram, 1, nlba - 1, 1) == b"\x99" * 512


def test_transfers_beyond_mdts_are_invalid_field() -> None:
    """MDTS 7 with CAP.MPSMIN 4 KiB: at most 512 KiB per command (§5.15.2 MDTS)."""
    r = make_rig(namespaces=[Namespace(1, RamBackend(8 << 20), 512)], trace=())
    try:
        assert r.driver.controller_info["mdts"] == 7
        limit = (1 << 7) * PAGE_SIZE
        buf = r.host_memory.alloc(limit + PAGE_SIZE)
        buf.view[:] = pattern(1, len(buf.view))
        for opcode in (NvmOpcode.WRITE, NvmOpcode.READ, NvmOpcode.COMPARE):
            status = _command(r, opcode, 1, 0, limit // 512 + 1, buf, length=limit + 512)
            assert status == Status.INVALID_FIELD | DNR
        assert _stored(r, 1, 0, 1) == bytes(512)  # the oversized write did nothing
        assert _command(r, NvmOpcode.WRITE, 1, 0, limit // 512, buf, length=limit) == Status.SUCCESS
        assert _command(r, NvmOpcode.COMPARE, 1, 0, limit // 512, buf, length=limit) == Status.SUCCESS
        # Write Zeroes moves no data: MDTS does not apply (NLB is 16 bits: 32 MiB here would
        # not fit the namespace, 4 MiB does).
        assert _command(r, NvmOpcode.WRITE_ZEROES, 1, 0, 8192) == Status.SUCCESS
        assert _stored(r, 1, 0, 8192) == bytes(4 << 20)
    finally:
        r.close()


@pytest.mark.parametrize("nsid", [0, 3, 1000, NSID_BROADCAST])
@pytest.mark.parametrize(
    "opcode", [NvmOpcode.READ, NvmOpcode.WRITE, NvmOpcode.COMPARE, NvmOpcode.WRITE_ZEROES]
)
def test_invalid_namespace(rig: Rig, nsid: int, opcode: int) -> None:
    buf = rig.host_memory.alloc(PAGE_SIZE)
    assert _command(rig, opcode, nsid, 0, 1, buf, length=512) == Status.INVALID_NAMESPACE | DNR


@pytest.mark.parametrize("nsid", [0, 3, NSID_BROADCAST - 1])
def test_invalid_namespace_for_flush_and_dsm(rig: Rig, nsid: int) -> None:
    assert _command(rig, NvmOpcode.FLUSH, nsid) == Status.INVALID_NAMESPACE | DNR
    assert _dsm(rig, nsid, [(0, 1)]) == Status.INVALID_NAMESPACE | DNR


@pytest.mark.parametrize("opcode", [0x03, 0x04, 0x06, 0x0D, 0x11, 0x7F, 0x80, 0xC1, 0xFF])
def test_unknown_io_opcode(rig: Rig, opcode: int) -> None:
    buf = rig.host_memory.alloc(PAGE_SIZE)
    assert _command(rig, opcode, 1, 0, 1, buf, length=512) == Status.INVALID_OPCODE | DNR
    # The queue carries on.
    rig.driver.write(1, 0, b"\x01" * 512)
    assert rig.driver.read(1, 0, 1) == b"\x01" * 512


def test_fused_commands_are_refused(rig: Rig) -> None:
    qp = rig.driver.queue(1)
    buf = rig.host_memory.alloc(PAGE_SIZE)
    sqe = rig.driver.io_sqe(qp, NvmOpcode.COMPARE, 1, 0, 1, buf, length=512)._replace(flags=0b01)
    assert rig.driver.io_command(qp, sqe, check=False).status == Status.INVALID_FIELD | DNR


# Section: Flush, Write Zeroes, Dataset Management, Compare


def test_flush_reaches_the_backend(ram: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    for nsid, ns in ram.controller.namespaces.items():
        monkeypatch.setattr(ns.backend, "flush", lambda nsid=nsid: calls.append(nsid))
    ram.driver.flush(1)
    assert calls == [1]
    ram.driver.flush(2)
    assert calls == [1, 2]
    # NSID FFFFFFFFh: every attached namespace.
    assert _command(ram, NvmOpcode.FLUSH, NSID_BROADCAST) == Status.SUCCESS
    assert sorted(calls[2:]) == [1, 2]
    assert ram.controller.statistics().io_commands["flush"] == 3


@pytest.mark.parametrize("deallocate", [False, True])
@pytest.mark.parametrize("nsid", [1, 2])
def test_write_zeroes(ram: Rig, nsid: int, deallocate: bool) -> None:
    info = ram.driver.namespaces[nsid]
    assert info.raw["dlfeat"] & DLFEAT_WRITE_ZEROES_DEALLOCATE  # the DEAC bit is supported
    size = info.lba_size
    data = pattern(nsid, 16 * size)
    ram.driver.write(nsid, 0, data)
    ram.driver.write_zeroes(nsid, 4, 8, deallocate=deallocate)
    # Write Zeroes reads back zeroes whether or not the blocks were deallocated.
    expected = data[: 4 * size] + bytes(8 * size) + data[12 * size :]
    assert ram.driver.read(nsid, 0, 16) == expected
    assert _stored(ram, nsid, 0, 16) == expected


def test_write_zeroes_with_fua(ram: Rig) -> None:
    ram.driver.write(1, 0, b"\x11" * 2048)
    assert _command(ram, NvmOpcode.WRITE_ZEROES, 1, 1, 2, cdw12_flags=_FUA) == Status.SUCCESS
    assert _command(ram, NvmOpcode.WRITE_ZEROES, 1, 3, 1, cdw12_flags=_FUA | _DEAC) == Status.SUCCESS
    assert ram.driver.read(1, 0, 4) == b"\x11" * 512 + bytes(1536)


def test_dataset_management_deallocate(ram: Rig) -> None:
    # DLFEAT bits 2:0 = 001b: deallocated blocks read back as zeroes (deterministic).
    assert ram.driver.namespaces[1].raw["dlfeat"] & 0x7 == DLFEAT_READ_ZEROES
    data = pattern(9, 64 * 512)
    ram.driver.write(1, 0, data)
    status = _dsm(ram, 1, [(2, 3), (10, 0), (20, 4), (63, 1)])
    assert status == Status.SUCCESS
    expected = bytearray(data)
    for slba, nlb in ((2, 3), (20, 4), (63, 1)):
        expected[slba * 512 : (slba + nlb) * 512] = bytes(nlb * 512)
    assert ram.driver.read(1, 0, 64) == bytes(expected)
    assert _stored(ram, 1, 0, 64) == bytes(expected)


def test_dataset_management_without_deallocate_changes_nothing(ram: Rig) -> None:
    data = pattern(10, 8 * 512)
    ram.driver.write(1, 0, data)
    assert _dsm(ram, 1, [(0, 8)], attributes=0b11) == Status.SUCCESS  # IDR | IDW hints
    assert ram.driver.read(1, 0, 8) == data


def test_dataset_management_range_beyond_the_namespace_changes_nothing(ram: Rig) -> None:
    nlba = ram.driver.namespaces[1].nlba
    data = pattern(11, 8 * 512)
    ram.driver.write(1, 0, data)
    assert _dsm(ram, 1, [(0, 8), (nlba - 1, 2)]) == Status.LBA_OUT_OF_RANGE | DNR
    assert ram.driver.read(1, 0, 8) == data  # the valid first range was not deallocated either
    assert _dsm(ram, 1, [(nlba - 1, 1)]) == Status.SUCCESS


def test_dataset_management_256_ranges(ram: Rig) -> None:
    ram.driver.write(1, 0, b"\xff" * (512 * 512))
    ranges = [(2 * i, 1) for i in range(256)]  # every even LBA of the first 512
    assert _dsm(ram, 1, ranges) == Status.SUCCESS
    got = ram.driver.read(1, 0, 512)
    for lba in range(512):
        block = got[lba * 512 : (lba + 1) * 512]
        assert block == (bytes(512) if lba % 2 == 0 else b"\xff" * 512), lba


@pytest.mark.parametrize("nsid", [1, 2])
def test_compare(ram: Rig, nsid: int) -> None:
    size = ram.driver.namespaces[nsid].lba_size
    data = pattern(12, 24 * size)
    ram.driver.write(nsid, 5, data)
    assert ram.driver.compare(nsid, 5, data)
    buf = ram.host_memory.alloc(len(data))
    buf.view[:] = data
    assert _command(ram, NvmOpcode.COMPARE, nsid, 5, 24, buf, length=len(data)) == Status.SUCCESS
    # One byte different, in the last block.
    buf.view[len(data) - 1] ^= 1
    assert _command(ram, NvmOpcode.COMPARE, nsid, 5, 24, buf, length=len(data)) == Status.COMPARE_FAILURE
    assert not ram.driver.compare(nsid, 5, bytes(buf.view))
    # Compare never changes the data.
    assert ram.driver.read(nsid, 5, 24) == data


def test_null_backend_reads_zeroes_and_drops_writes(rig: Rig) -> None:
    info = rig.driver.namespaces[2]
    assert (info.lba_size, info.nlba) == (4096, (1 << 30) // 4096)
    data = pattern(13, 64 * 4096)
    rig.driver.write(2, 100, data)
    assert rig.driver.read(2, 100, 64) == bytes(64 * 4096)
    rig.driver.write_zeroes(2, 0, 10, deallocate=True)
    rig.driver.deallocate(2, [(0, 10)])
    rig.driver.flush(2)
    assert rig.driver.compare(2, 100, bytes(4096))
    assert not rig.driver.compare(2, 100, data[:4096])
    assert rig.driver.read(2, info.nlba - 1, 1) == bytes(4096)


# Section: queues


def _lba_data(lba: int, generation: int) -> bytes:
    return struct.pack("<II", lba, generation) * 64  # 512 bytes, self-describing


@pytest.mark.parametrize("shadow", [False, True])
def test_queue_wraparound_one_command_at_a_time(shadow: bool) -> None:
    r = make_rig(
        namespaces=[Namespace(1, RamBackend(1 << 20), 512)],
        io_queue_depth=4,
        shadow_doorbells=shadow,
        trace=(),
    )
    try:
        qp = r.driver.queue(1)
        assert qp.depth == 4 and (qp.shadow is not None) == shadow == r.driver.dbbuf_enabled
        latest: dict[int, int] = {}
        for i in range(1000):
            lba = (i * 7) % 64
            if i % 3 == 2:
                expected = _lba_data(lba, latest[lba]) if lba in latest else bytes(512)
                assert r.driver.read(1, lba, 1) == expected
            else:
                r.driver.write(1, lba, _lba_data(lba, i))
                latest[lba] = i
        for lba, generation in latest.items():
            assert r.driver.read(1, lba, 1) == _lba_data(lba, generation)
        stats = r.controller.statistics()
        total = 1000 + len(latest)
        assert sum(stats.io_commands.values()) == total
        assert stats.error_completions == 0
        assert r.driver.stats.completions >= total
        # 1000+ commands on a 4-entry queue: the host is where the counts say, mod the size.
        assert qp.sq_tail == total % 4 and qp.cq_head == total % 4
        assert qp.cq_phase == (1 if (total // 4) % 2 == 0 else 0)
        if shadow:
            assert stats.doorbell_cq_io == 0  # CQ heads went through the shadow page only
    finally:
        r.close()


@pytest.mark.parametrize("shadow", [False, True])
def test_queue_wraparound_with_the_queue_kept_full(shadow: bool) -> None:
    """Depth 4 holds 3 commands: submit 3, ring once, reap 3; 334 laps of mixed writes / reads."""
    r = make_rig(
        namespaces=[Namespace(1, RamBackend(1 << 20), 512)],
        io_queue_depth=4,
        shadow_doorbells=shadow,
        trace=(),
    )
    try:
        qp = r.driver.queue(1)
        bufs = [r.host_memory.alloc(512) for _ in range(qp.depth)]
        latest: dict[int, int] = {}
        done = 0
        rounds = 0
        while done < 1000:
            expected: dict[int, tuple[int, int]] = {}  # cid -> (buffer index, lba) of reads
            for slot in range(qp.depth - 1):
                lba = (done + slot) % 96  # distinct within a batch
                buf = bufs[slot]
                if rounds % 2 == 0 or lba not in latest:
                    buf.view[:] = _lba_data(lba, done + slot)
                    latest[lba] = done + slot
                    qp.submit(r.driver.io_sqe(qp, NvmOpcode.WRITE, 1, lba, 1, buf, length=512))
                else:
                    cid = qp.submit(r.driver.io_sqe(qp, NvmOpcode.READ, 1, lba, 1, buf, length=512))
                    expected[cid] = (slot, lba)
            qp.ring_sq()
            cqes: list[Cqe] = []
            while len(cqes) < qp.depth - 1:
                cqes.extend(qp.wait())
            assert [c.status for c in cqes] == [0] * (qp.depth - 1)
            for cqe in cqes:
                if cqe.cid in expected:
                    slot, lba = expected[cqe.cid]
                    assert bytes(bufs[slot].view) == _lba_data(lba, latest[lba])
            done += qp.depth - 1
            rounds += 1
        assert done >= 1000
        for lba, generation in latest.items():
            assert r.driver.read(1, lba, 1) == _lba_data(lba, generation)
        assert r.controller.statistics().error_completions == 0
    finally:
        r.close()


def test_several_queue_pairs_are_served_round_robin() -> None:
    """Four SQs with work at once, arbitration burst 1: the controller alternates between them."""
    r = make_rig(
        namespaces=[Namespace(1, RamBackend(1 << 20), 512)],
        config=ControllerConfig(arbitration_burst=1),
        io_queues=4,
        io_queue_depth=8,
        shadow_doorbells=False,
        trace=("pci_nvme_io_cmd",),
    )
    try:
        queues = r.driver.io
        assert [qp.qid for qp in queues] == [1, 2, 3, 4]
        bufs: list[DmaBuffer] = []
        for qp in queues:
            for i in range(3):
                buf = r.host_memory.alloc(1024)
                buf.view[:] = _lba_data(qp.qid * 10 + i, qp.qid) * 2
                bufs.append(buf)
                qp.submit(r.driver.io_sqe(qp, NvmOpcode.WRITE, 1, qp.qid * 10 + 2 * i, 2, buf, length=1024))
        before = len(r.trace.events)
        # Ring every doorbell before the controller runs, then let it run once.
        for qp in queues:
            r.controller.mmio_write(qp.sq_db, 4, qp.sq_tail)
            qp.last_sq_tail = qp.sq_tail
        r.transport.device_idle()
        order = [e.args[2] for e in r.trace.events[before:] if e.name == "pci_nvme_io_cmd"]
        assert order == [1, 2, 3, 4] * 3
        for qp in queues:
            cqes = qp.reap()
            assert [(c.sqid, c.status) for c in cqes] == [(qp.qid, 0)] * 3
        # Every queue reads what the others wrote.
        for qp in queues:
            for i in range(3):
                reader = queues[(qp.qid + i) % 4].qid
                lba = qp.qid * 10 + 2 * i
                assert r.driver.read(1, lba, 2, qid=reader) == _lba_data(qp.qid * 10 + i, qp.qid) * 2
    finally:
        r.close()


def test_several_queue_pairs_with_shadow_doorbells_interleaved() -> None:
    r = make_rig(
        namespaces=[Namespace(1, RamBackend(1 << 20), 512)], io_queues=3, io_queue_depth=16, trace=()
    )
    try:
        assert r.driver.dbbuf_enabled
        queues: list[QueuePair] = r.driver.io
        written: dict[int, bytes] = {}
        buffers = []
        for round_ in range(20):
            for qp in queues:  # a few commands outstanding on every queue at once
                for k in range(4):
                    lba = (round_ * 12 + qp.qid * 4 + k) % 2048
                    data = pattern(lba * 31 + round_, 512)
                    buf = r.host_memory.alloc(512)
                    buf.view[:] = data
                    buffers.append(buf)
                    qp.submit(r.driver.io_sqe(qp, NvmOpcode.WRITE, 1, lba, 1, buf, length=512))
                    written[lba] = data
            for qp in reversed(queues):
                qp.ring_sq()
            for qp in queues:
                got: list[Cqe] = []
                while len(got) < 4:
                    got.extend(qp.wait())
                assert all(c.status == 0 and c.sqid == qp.qid for c in got)
            for buf in buffers:
                r.host_memory.free(buf)
            buffers.clear()
        for lba, data in written.items():
            assert r.driver.read(1, lba, 1, qid=1 + lba % 3) == data
    finally:
        r.close()


def test_multiple_namespaces_are_independent() -> None:
    namespaces = [
        Namespace(1, RamBackend(4 << 20), 512),
        Namespace(2, NullBackend(64 << 20), 4096),
        Namespace(5, RamBackend(8 << 20), 4096),
        Namespace(9, RamBackend(1 << 20), 512),
    ]
    r = make_rig(namespaces=namespaces, trace=())
    try:
        assert r.driver.controller_info["nn"] == 9
        assert sorted(r.driver.namespaces) == [1, 2, 5, 9]
        shapes = {nsid: (info.lba_size, info.nlba) for nsid, info in r.driver.namespaces.items()}
        assert shapes == {1: (512, 8192), 2: (4096, 16384), 5: (4096, 2048), 9: (512, 2048)}
        for nsid, info in r.driver.namespaces.items():
            r.driver.write(nsid, 7, pattern(nsid, 2 * info.lba_size))
        for nsid, info in r.driver.namespaces.items():
            expected = bytes(2 * info.lba_size) if nsid == 2 else pattern(nsid, 2 * info.lba_size)
            assert r.driver.read(nsid, 7, 2) == expected
        r.driver.write_zeroes(5, 7, 1)
        assert r.driver.read(1, 7, 2) == pattern(1, 1024)  # other namespaces unaffected
        assert r.driver.read(9, 7, 2) == pattern(9, 1024)
        assert r.driver.read(5, 7, 2) == bytes(4096) + pattern(5, 8192)[4096:]
        # Ranges are per namespace: LBA 2048 exists on ns 1, not on ns 9.
        buf = r.host_memory.alloc(512)
        assert _command(r, NvmOpcode.READ, 1, 2048, 1, buf, length=512) == Status.SUCCESS
        assert _command(r, NvmOpcode.READ, 9, 2048, 1, buf, length=512) == Status.LBA_OUT_OF_RANGE | DNR
        for gap in (3, 4, 6, 8, 10):
            assert _command(r, NvmOpcode.READ, gap, 0, 1, buf, length=512) == Status.INVALID_NAMESPACE | DNR
    finally:
        r.close()


def test_io_commands_the_controller_counts(rig: Rig) -> None:
    rig.driver.write(1, 0, b"\x01" * 512)
    rig.driver.read(1, 0, 1)
    rig.driver.flush(1)
    rig.driver.write_zeroes(1, 0, 1)
    rig.driver.deallocate(1, [(0, 1)])
    rig.driver.compare(1, 0, bytes(512))
    assert rig.controller.statistics().io_commands == {
        "write": 1,
        "read": 1,
        "flush": 1,
        "write_zeroes": 1,
        "dataset_management": 1,
        "compare": 1,
    }
