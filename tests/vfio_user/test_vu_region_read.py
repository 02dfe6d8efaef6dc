"""REGION_READ: BAR0 registers, the BAR4 MSI-X table and PBA, and PCI config space."""

from __future__ import annotations

import errno
import struct

import pytest

from vfio_user.peer import LE, Peer
from vnvme.spec.registers import Reg
from vnvme.vfio_user import protocol as vu
from vnvme.vfio_user.protocol import Command
from vnvme.vfio_user.server import Region, ServerOptions

BAR0 = vu.PciRegion.BAR0
BAR4 = vu.PciRegion.BAR4
CONFIG = vu.PciRegion.CONFIG


def test_config_space_reads_the_nvme_class_code(ready: Peer) -> None:
    reply = ready.call(Command.REGION_READ, vu.REGION_ACCESS.pack(0x08, vu.PciRegion.CONFIG, 4))
    offset, region, count = vu.REGION_ACCESS.unpack_from(reply.payload)
    assert (offset, region, count) == (0x08, vu.PciRegion.CONFIG, 4)
    assert int.from_bytes(reply.payload[16:], "little") >> 8 == 0x010802


def test_region_read_errors(ready: Peer) -> None:
    bar0 = ready.function.bar0_size
    for payload in (
        vu.REGION_ACCESS.pack(bar0 - 2, 0, 4),  # runs past the end
        vu.REGION_ACCESS.pack(0, 3, 4),  # no such BAR
        vu.REGION_ACCESS.pack(0, 0, 0),  # zero bytes
        vu.REGION_ACCESS.pack(1, 0, 4),  # misaligned register access
        vu.REGION_ACCESS.pack(0, 0, 3),  # odd width
    ):
        ready.expect_error(Command.REGION_READ, payload, errno.EINVAL)


# Section: Memory Space Enable


def test_bars_read_all_ones_until_memory_space_is_enabled(peer: Peer) -> None:
    peer.version()  # no enable_decoding(): the Command register is 0
    fn = peer.function
    fn._raise(0)  # a pending vector: the PBA would read 1
    assert fn.pending[vu.PciIrq.MSIX][0]
    undecoded = [
        (BAR0, Reg.CAP, 8),
        (BAR0, Reg.VS, 4),
        (BAR0, Reg.VS + 1, 1),
        (BAR0, Reg.CSTS, 2),
        (BAR4, 8, 8),  # vector 0's data and Vector Control
        (BAR4, 12, 4),
        (BAR4, fn.pba_offset, 8),
    ]
    for region, offset, count in undecoded:
        assert peer.read(region, offset, count) == b"\xff" * count, (region, offset)
    assert fn.stats.undecoded_bar_accesses == len(undecoded)
    # A malformed access is still refused, before decoding: EINVAL, not counted.
    peer.expect_error(Command.REGION_READ, vu.REGION_ACCESS.pack(1, BAR0, 4), errno.EINVAL)
    peer.expect_error(Command.REGION_READ, vu.REGION_ACCESS.pack(0, BAR4, 2), errno.EINVAL)
    # Config space is always decoded; Bus Master Enable alone decodes no BAR.
    assert peer.read_int(CONFIG, 0x00, 2) == fn.controller.config.pci_vendor_id
    peer.write_int(CONFIG, 0x04, 2, 0x0004)
    assert peer.read(BAR0, Reg.VS, 4) == b"\xff" * 4
    assert fn.stats.undecoded_bar_accesses == len(undecoded) + 1
    # Memory Space Enable: the same reads see the registers, and are not counted.
    peer.write_int(CONFIG, 0x04, 2, 0x0002)
    assert peer.read_int(BAR0, Reg.CAP, 8) == fn.controller.cap
    assert peer.read_int(BAR0, Reg.VS, 4) == 0x00010300
    assert peer.read_int(BAR0, Reg.VS + 1, 1) == 0x03
    assert peer.read_int(BAR0, Reg.CSTS, 2) == 0
    assert peer.read_int(BAR4, 8, 8) == 1 << 32
    assert peer.read_int(BAR4, 12, 4) == 1
    assert peer.read_int(BAR4, fn.pba_offset, 8) == 1
    assert fn.stats.undecoded_bar_accesses == len(undecoded) + 1
    # And clearing it again stops decoding again.
    peer.write_int(CONFIG, 0x04, 2, 0x0000)
    assert peer.read(BAR0, Reg.VS, 4) == b"\xff" * 4
    assert fn.stats.undecoded_bar_accesses == len(undecoded) + 2


# Section: BAR0


def test_bar0_registers(ready: Peer) -> None:
    ctrl = ready.function.controller
    assert ready.read_int(BAR0, Reg.VS, 4) == ctrl.mmio_read(Reg.VS, 4) == 0x00010300
    cap = ready.read_int(BAR0, Reg.CAP, 8)
    assert cap == ctrl.cap != 0
    assert ready.read_int(BAR0, Reg.CAP, 4) | ready.read_int(BAR0, Reg.CAP + 4, 4) << 32 == cap
    # Narrower reads see the right bytes of the register.
    assert ready.read_int(BAR0, Reg.VS + 2, 2) == 0x0001
    assert ready.read_int(BAR0, Reg.VS + 1, 1) == 0x03
    assert ready.read_int(BAR0, Reg.CSTS, 4) == 0  # not enabled


def test_bar0_doorbells_and_the_rest_read_zero(ready: Peer) -> None:
    assert ready.read(BAR0, 0x1000, 4) == b"\0" * 4  # doorbells are write-only
    assert ready.read(BAR0, ready.function.bar0_size - 8, 8) == b"\0" * 8


@pytest.mark.parametrize(("offset", "count"), [(2, 4), (4, 8), (1, 2), (0, 16), (0, 5), (0, 6)])
def test_bar0_accesses_that_are_not_a_register_width(ready: Peer, offset: int, count: int) -> None:
    ready.expect_error(Command.REGION_READ, vu.REGION_ACCESS.pack(offset, BAR0, count), errno.EINVAL)


# Section: BAR4


def test_the_msix_table_starts_masked(ready: Peer) -> None:
    fn = ready.function
    for vector in (0, 1, fn.vectors - 1):
        entry = ready.read(BAR4, 16 * vector, 8) + ready.read(BAR4, 16 * vector + 8, 8)
        assert struct.unpack("<QII", entry) == (0, 0, 1)  # address, data, vector control: masked
        assert ready.read_int(BAR4, 16 * vector + 12, 4) == 1


def test_the_pba_shows_pending_vectors(ready: Peer) -> None:
    fn = ready.function
    assert fn.pba_offset == 0x800
    assert ready.read(BAR4, fn.pba_offset, 8) == b"\0" * 8
    fn._raise(0)
    fn._raise(63)
    fn._raise(64)  # the last of 65 vectors: second QWORD
    assert ready.read_int(BAR4, fn.pba_offset, 8) == 1 | 1 << 63
    assert ready.read_int(BAR4, fn.pba_offset + 4, 4) == 1 << 31
    assert ready.read_int(BAR4, fn.pba_offset + 8, 8) == 1
    assert ready.read_int(BAR4, fn.pba_offset + 8, 4) == 1


def test_between_the_table_and_the_pba_reads_zero(ready: Peer) -> None:
    table_end = 16 * ready.function.vectors
    assert ready.read(BAR4, table_end, 4) == b"\0" * 4
    assert ready.read(BAR4, ready.function.pba_offset - 8, 8) == b"\0" * 8
    assert ready.read(BAR4, ready.function.bar4_size - 4, 4) == b"\0" * 4


@pytest.mark.parametrize(("offset", "count"), [(0, 1), (0, 2), (2, 4), (0, 16), (0x800, 2), (6, 8)])
def test_bar4_accesses_that_are_not_dwords_or_qwords(ready: Peer, offset: int, count: int) -> None:
    ready.expect_error(Command.REGION_READ, vu.REGION_ACCESS.pack(offset, BAR4, count), errno.EINVAL)


def test_bar4_beyond_its_end(ready: Peer) -> None:
    size = ready.function.bar4_size
    ready.expect_error(Command.REGION_READ, vu.REGION_ACCESS.pack(size, BAR4, 4), errno.EINVAL)
    ready.expect_error(Command.REGION_READ, vu.REGION_ACCESS.pack(size - 4, BAR4, 8), errno.EINVAL)


# Section: config space


def test_config_space_identity(peer: Peer) -> None:
    peer.version()  # and no more: the Command register as the function came out of reset
    cfg = peer.function.controller.config
    assert peer.read_int(CONFIG, 0x00, 2) == cfg.pci_vendor_id
    assert peer.read_int(CONFIG, 0x02, 2) == peer.function.pci.read(0x02, 2)
    assert peer.read_int(CONFIG, 0x2C, 2) == cfg.pci_subsystem_vendor_id
    assert peer.read_int(CONFIG, 0x08, 1) == 1  # revision
    assert peer.read_int(CONFIG, 0x09, 4) & 0xFFFFFF == 0x010802  # a 3-byte field, a 4-byte read
    assert peer.read_int(CONFIG, 0x0E, 1) == 0  # type 0 header
    assert peer.read_int(CONFIG, 0x3D, 1) == 1  # INTA
    assert peer.read_int(CONFIG, 0x04, 2) == 0  # Command: nothing enabled at power-on
    assert peer.read_int(CONFIG, 0x06, 2) & 1 << 4  # Status: capabilities list


def test_config_space_capability_chain(ready: Peer) -> None:
    found = []
    at = ready.read_int(CONFIG, 0x34, 1)
    while at:
        cap_id, nxt = ready.read(CONFIG, at, 2)
        found.append((at, cap_id))
        at = nxt
    assert found == [(0x40, 0x01), (0x50, 0x11), (0x60, 0x10)]  # PM, MSI-X, PCI Express
    # MSI-X: table size N - 1, table at BAR4 offset 0, PBA at BAR4 + pba_offset.
    fn = ready.function
    assert ready.read_int(CONFIG, 0x52, 2) & 0x7FF == fn.vectors - 1
    assert ready.read_int(CONFIG, 0x54, 4) == 0 | 4
    assert ready.read_int(CONFIG, 0x58, 4) == fn.pba_offset | 4
    assert ready.read_int(CONFIG, 0x100, 4) == 0  # no extended capabilities


def test_config_space_in_one_read_and_in_odd_pieces(ready: Peer) -> None:
    whole = ready.read(CONFIG, 0, 4096)
    assert whole == b"".join(ready.function.pci.read(i, 1).to_bytes(1, LE) for i in range(4096))
    assert ready.read(CONFIG, 0x09, 3) == whole[0x09:0x0C]
    assert ready.read(CONFIG, 0x01, 8) == whole[0x01:0x09]
    assert ready.read(CONFIG, 4095, 1) == whole[4095:]
    ready.expect_error(Command.REGION_READ, vu.REGION_ACCESS.pack(4095, CONFIG, 2), errno.EINVAL)
    ready.expect_error(Command.REGION_READ, vu.REGION_ACCESS.pack(4096, CONFIG, 1), errno.EINVAL)
    ready.expect_error(Command.REGION_READ, vu.REGION_ACCESS.pack(0, CONFIG, 4097), errno.EINVAL)


# Section: the server's checks


@pytest.mark.parametrize(
    "index",
    [vu.PciRegion.BAR1, vu.PciRegion.BAR2, vu.PciRegion.BAR5, vu.PciRegion.ROM, vu.PciRegion.VGA, 9, 1 << 31],
)
def test_regions_without_a_handler(ready: Peer, index: int) -> None:
    ready.expect_error(Command.REGION_READ, vu.REGION_ACCESS.pack(0, index, 4), errno.EINVAL)


@pytest.mark.parametrize("offset", [1 << 32, (1 << 64) - 4, (1 << 64) - 1])
def test_huge_offsets(ready: Peer, offset: int) -> None:
    ready.expect_error(Command.REGION_READ, vu.REGION_ACCESS.pack(offset, CONFIG, 4), errno.EINVAL)


def test_a_region_that_cannot_be_read_is_eperm(ready: Peer) -> None:
    ready.function.regions[BAR4] = Region(BAR4, 0x1000, None, None)
    ready.expect_error(Command.REGION_READ, vu.REGION_ACCESS.pack(0, BAR4, 4), errno.EPERM)


def test_a_device_failure_is_eio_and_the_server_carries_on(ready: Peer) -> None:
    def broken(offset: int, count: int) -> bytes:
        raise RuntimeError("device bug")

    ready.function.regions[BAR4] = Region(BAR4, 0x1000, broken, None)
    ready.expect_error(Command.REGION_READ, vu.REGION_ACCESS.pack(0, BAR4, 4), errno.EIO)
    assert ready.server.errors["REGION_READ"] == 1
    assert ready.read_int(BAR0, Reg.VS, 4) == 0x00010300


def test_too_short(ready: Peer) -> None:
    ready.expect_error(Command.REGION_READ, vu.REGION_ACCESS.pack(0, CONFIG, 4)[:15], errno.EINVAL)
    ready.expect_error(Command.REGION_READ, b"", errno.EINVAL)


def test_max_data_xfer_size_limits_a_read() -> None:
    p = Peer(ServerOptions(max_data_xfer_size=256))
    try:
        caps = p.version()["capabilities"]
        assert isinstance(caps, dict) and caps["max_data_xfer_size"] == 256
        assert len(p.read(CONFIG, 0, 256)) == 256
        p.expect_error(Command.REGION_READ, vu.REGION_ACCESS.pack(0, CONFIG, 257), errno.EINVAL)
        p.expect_error(Command.REGION_READ, vu.REGION_ACCESS.pack(0, CONFIG, 4096), errno.EINVAL)
        assert len(p.read(CONFIG, 3840, 256)) == 256
    finally:
        p.close()
