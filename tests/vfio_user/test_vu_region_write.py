"""REGION_WRITE: BAR0 registers, the MSI-X table (the PBA is read-only), config space (BAR
sizing included); posted writes get no reply and stay ordered."""

from __future__ import annotations

import errno

import pytest

from vfio_user.peer import Peer
from vnvme.spec.registers import CSTS, NSSR_MAGIC, Reg
from vnvme.vfio_user import protocol as vu
from vnvme.vfio_user.protocol import Command
from vnvme.vfio_user.server import Region, ServerOptions

BAR0 = vu.PciRegion.BAR0
BAR4 = vu.PciRegion.BAR4
CONFIG = vu.PciRegion.CONFIG


def _write(offset: int, region: int, data: bytes, count: int | None = None) -> bytes:
    return vu.REGION_ACCESS.pack(offset, region, len(data) if count is None else count) + data


def test_region_write_errors(ready: Peer) -> None:
    # A write whose count disagrees with the data that came.
    ready.expect_error(Command.REGION_WRITE, vu.REGION_ACCESS.pack(0x14, 0, 4) + b"\0" * 8, errno.EINVAL)
    ready.expect_error(Command.REGION_WRITE, b"\0" * 8, errno.EINVAL)
    # A read-only register through BAR0: refused, and CAP is unchanged.
    before = ready.call(Command.REGION_READ, vu.REGION_ACCESS.pack(Reg.CAP, 0, 8)).payload[16:]
    ready.expect_error(Command.REGION_WRITE, vu.REGION_ACCESS.pack(Reg.CAP, 0, 8) + b"\xff" * 8, errno.EPERM)
    assert ready.call(Command.REGION_READ, vu.REGION_ACCESS.pack(Reg.CAP, 0, 8)).payload[16:] == before


def test_posted_writes_get_no_reply_and_stay_ordered(ready: Peer) -> None:
    payload = vu.REGION_ACCESS.pack(Reg.INTMS, 0, 4) + (5).to_bytes(4, "little")
    ready.send(Command.REGION_WRITE, payload, flags=vu.FLAG_NO_REPLY)
    reply = ready.call(Command.REGION_READ, vu.REGION_ACCESS.pack(Reg.INTMS, 0, 4))
    assert int.from_bytes(reply.payload[16:], "little") == 5  # the read did not pass the posted write
    assert ready.server.messages["REGION_WRITE"] == 2  # the posted one and the fixture's Command write


def test_a_refused_posted_write_gets_no_error_reply_either(ready: Peer) -> None:
    ready.send(Command.REGION_WRITE, _write(0, 3, b"\0" * 4), flags=vu.FLAG_NO_REPLY)  # no such BAR
    ready.send(
        Command.REGION_WRITE, _write(ready.function.pba_offset, BAR4, b"\0" * 4), flags=vu.FLAG_NO_REPLY
    )
    ready.assert_silent()
    assert ready.server.errors["REGION_WRITE"] == 2
    # The next reply is the next call's.
    assert ready.read_int(BAR0, Reg.VS, 4) == 0x00010300


def test_many_posted_writes_then_one_read(ready: Peer) -> None:
    for value in range(1, 101):
        ready.send(
            Command.REGION_WRITE, _write(Reg.AQA, BAR0, value.to_bytes(4, "little")), flags=vu.FLAG_NO_REPLY
        )
    assert ready.read_int(BAR0, Reg.AQA, 4) == 100
    assert ready.server.messages["REGION_WRITE"] == 100 + 1  # and the fixture's Command write


# Section: BAR0


def test_bar0_registers(ready: Peer) -> None:
    ctrl = ready.function.controller
    ready.write_int(BAR0, Reg.AQA, 4, 0x001F001F)
    assert ctrl.aqa == 0x001F001F
    ready.write_int(BAR0, Reg.ASQ, 8, 0x1_2345_6000)
    assert ctrl.asq == 0x1_2345_6000 and ready.read_int(BAR0, Reg.ASQ, 8) == 0x1_2345_6000
    ready.write_int(BAR0, Reg.ACQ, 4, 0x7000)
    ready.write_int(BAR0, Reg.ACQ + 4, 4, 0x2)
    assert ctrl.acq == 0x2_0000_7000
    ready.write_int(BAR0, Reg.INTMS, 4, 0b1010)
    ready.write_int(BAR0, Reg.INTMC, 4, 0b0010)
    assert ctrl.intms == 0b1000 and ready.read_int(BAR0, Reg.INTMC, 4) == 0b1000


@pytest.mark.parametrize(("offset", "count"), [(Reg.AQA + 1, 4), (Reg.AQA, 3), (Reg.ASQ + 4, 8), (0, 16)])
def test_bar0_writes_that_are_not_a_register_width(ready: Peer, offset: int, count: int) -> None:
    ready.expect_error(Command.REGION_WRITE, _write(offset, BAR0, b"\xff" * count), errno.EINVAL)
    assert ready.function.controller.aqa == 0 and ready.function.controller.asq == 0


@pytest.mark.parametrize(
    ("offset", "count"),
    [(Reg.CAP, 4), (Reg.CAP + 4, 4), (Reg.CAP, 8), (Reg.VS, 4), (Reg.CMBLOC, 4), (Reg.CMBSZ, 4)],
)
def test_a_write_to_a_read_only_register_is_eperm(ready: Peer, offset: int, count: int) -> None:
    fn = ready.function
    registers = range(Reg.CAP, Reg.CMBSZ + 4, 4)  # every dword from CAP through CMBSZ
    before = [ready.read_int(BAR0, at, 4) for at in registers]
    ready.expect_error(Command.REGION_WRITE, _write(offset, BAR0, b"\xff" * count), errno.EPERM)
    ready.expect_error(Command.REGION_WRITE, _write(offset, BAR0, b"\0" * count), errno.EPERM)
    assert [ready.read_int(BAR0, at, 4) for at in registers] == before
    assert ready.read_int(BAR0, offset, count) == fn.controller.mmio_read(offset, count)
    assert ready.server.errors["REGION_WRITE"] == 2


def test_a_write_to_csts_is_accepted_and_clears_only_nssro(ready: Peer) -> None:
    ctrl = ready.function.controller
    ready.write_int(BAR0, Reg.NSSR, 4, NSSR_MAGIC)  # an NVM subsystem reset sets CSTS.NSSRO
    assert ready.read_int(BAR0, Reg.CSTS, 4) == CSTS.NSSRO.put(0, 1)
    ready.write_int(BAR0, Reg.CSTS, 4, 0)  # RW1C: a 0 clears nothing
    assert ready.read_int(BAR0, Reg.CSTS, 4) == CSTS.NSSRO.put(0, 1)
    ready.write_int(BAR0, Reg.CSTS, 4, 0xFFFF_FFEF)  # every bit but NSSRO: all read-only
    assert ready.read_int(BAR0, Reg.CSTS, 4) == CSTS.NSSRO.put(0, 1)
    ready.write_int(BAR0, Reg.CSTS, 4, CSTS.NSSRO.put(0, 1))
    assert ready.read_int(BAR0, Reg.CSTS, 4) == 0 == ctrl.csts
    assert ready.server.errors["REGION_WRITE"] == 0


def test_bar_writes_are_dropped_while_memory_space_is_disabled(peer: Peer) -> None:
    peer.version()  # no enable_decoding(): the Command register is 0
    fn = peer.function
    assert peer.read_int(CONFIG, 0x04, 2) == 0
    peer.write_int(BAR0, Reg.INTMS, 4, 0b0101)  # accepted (a master abort is silent), not decoded
    peer.write_int(BAR0, Reg.AQA, 4, 0x001F001F)
    peer.write_int(BAR4, 12, 4, 0)  # vector 0's Vector Control: would unmask it
    assert fn.stats.undecoded_bar_accesses == 3
    assert fn.controller.intms == 0 and fn.controller.aqa == 0
    assert bytes(fn.msix_table[12:16]) == b"\x01\0\0\0"
    # Bus Master Enable alone decodes nothing either.
    peer.write_int(CONFIG, 0x04, 2, 0x0004)
    peer.write_int(BAR0, Reg.INTMS, 4, 0b0101)
    assert fn.stats.undecoded_bar_accesses == 4 and fn.controller.intms == 0
    # Memory Space Enable: the same accesses work and are no longer counted.
    peer.write_int(CONFIG, 0x04, 2, 0x0002)
    assert peer.read_int(BAR0, Reg.INTMS, 4) == 0  # the dropped writes left no trace
    peer.write_int(BAR0, Reg.INTMS, 4, 0b0101)
    peer.write_int(BAR0, Reg.AQA, 4, 0x001F001F)
    peer.write_int(BAR4, 12, 4, 0)
    assert fn.controller.intms == 0b0101 and peer.read_int(BAR0, Reg.INTMS, 4) == 0b0101
    assert fn.controller.aqa == 0x001F001F
    assert peer.read_int(BAR4, 12, 4) == 0 and bytes(fn.msix_table[12:16]) == b"\0" * 4
    assert fn.stats.undecoded_bar_accesses == 4
    assert peer.server.errors["REGION_WRITE"] == 0


# Section: BAR4


def test_the_msix_table_is_writable(ready: Peer) -> None:
    ready.write(BAR4, 16, (0xFEE0_0000).to_bytes(8, "little"))
    ready.write_int(BAR4, 24, 4, 0x4041)
    ready.write_int(BAR4, 28, 4, 0)  # unmask
    assert ready.read(BAR4, 16, 8) == (0xFEE0_0000).to_bytes(8, "little")
    assert ready.read_int(BAR4, 24, 8) == 0x4041
    assert bytes(ready.function.msix_table[16:32]) == ready.read(BAR4, 16, 8) + ready.read(BAR4, 24, 8)
    assert ready.read_int(BAR4, 12, 4) == 1  # its neighbour untouched


@pytest.mark.parametrize("where", ["pba", "pba+8", "gap", "end"])
def test_the_pba_and_beyond_the_table_are_read_only(ready: Peer, where: str) -> None:
    fn = ready.function
    offset = {
        "pba": fn.pba_offset,
        "pba+8": fn.pba_offset + 8,
        "gap": 16 * fn.vectors,
        "end": fn.bar4_size - 8,
    }[where]
    fn._raise(0)
    ready.expect_error(Command.REGION_WRITE, _write(offset, BAR4, b"\xff" * 8), errno.EPERM)
    ready.expect_error(Command.REGION_WRITE, _write(offset, BAR4, b"\xff" * 4), errno.EPERM)
    assert ready.read_int(BAR4, fn.pba_offset, 8) == 1
    assert ready.read(BAR4, 16 * fn.vectors, 4) == b"\0" * 4


def test_a_write_straddling_the_end_of_the_table_is_eperm(ready: Peer) -> None:
    last = 16 * (ready.function.vectors - 1)
    ready.expect_error(Command.REGION_WRITE, _write(last + 12, BAR4, b"\0" * 8), errno.EPERM)
    assert ready.read_int(BAR4, last + 12, 4) == 1


@pytest.mark.parametrize(("offset", "count"), [(0, 1), (0, 2), (2, 4), (0, 16)])
def test_bar4_writes_that_are_not_dwords_or_qwords(ready: Peer, offset: int, count: int) -> None:
    ready.expect_error(Command.REGION_WRITE, _write(offset, BAR4, b"\xff" * count), errno.EINVAL)
    assert ready.read_int(BAR4, 0, 8) == 0


# Section: config space


def test_bar_sizing_reads_back_the_size_mask(ready: Peer) -> None:
    fn = ready.function
    ones = 0xFFFFFFFF
    for offset in range(0x10, 0x28, 4):
        ready.write_int(CONFIG, offset, 4, ones)
    ready.write_int(CONFIG, 0x30, 4, ones)
    # BAR0 is 64-bit (type bits 100b), so BAR1 is its upper half.
    assert ready.read_int(CONFIG, 0x10, 4) == (~(fn.bar0_size - 1) & 0xFFFFFFF0) | 0b100 == 0xFFFFC004
    assert ready.read_int(CONFIG, 0x14, 4) == ones
    assert ready.read_int(CONFIG, 0x18, 4) == 0  # BAR2, BAR3: not implemented
    assert ready.read_int(CONFIG, 0x1C, 4) == 0
    assert ready.read_int(CONFIG, 0x20, 4) == ~(fn.bar4_size - 1) & ones == 0xFFFFF000  # BAR4, 32-bit
    assert ready.read_int(CONFIG, 0x24, 4) == 0  # BAR5
    assert ready.read_int(CONFIG, 0x30, 4) == 0  # no expansion ROM
    # Then the firmware programs addresses.
    ready.write_int(CONFIG, 0x10, 4, 0xFEB0_0000)
    ready.write_int(CONFIG, 0x14, 4, 0x1)
    ready.write_int(CONFIG, 0x20, 4, 0xFEC0_1234)
    assert ready.read_int(CONFIG, 0x10, 8) == 0x1_FEB0_0004
    assert fn.pci.bar_address(0) == 0x1_FEB0_0000
    assert fn.pci.bar_address(4) == 0xFEC0_1000


def test_the_command_register_keeps_only_its_writable_bits(ready: Peer) -> None:
    ready.write_int(CONFIG, 0x04, 2, 0xFFFF)
    assert ready.read_int(CONFIG, 0x04, 2) == 0x0546  # memory, master, parity, SERR, INTx disable
    pci = ready.function.pci
    assert pci.memory_enabled and pci.bus_master and pci.intx_disabled
    ready.write_int(CONFIG, 0x04, 2, 0x0006)
    assert ready.read_int(CONFIG, 0x04, 2) == 0x0006


def test_read_only_config_fields_ignore_writes(ready: Peer) -> None:
    before = ready.read(CONFIG, 0, 0x10)
    ready.write(CONFIG, 0x00, b"\xff" * 4)  # vendor, device
    ready.write(CONFIG, 0x08, b"\xff" * 4)  # revision, class code
    ready.write_int(CONFIG, 0x34, 1, 0x80)  # capabilities pointer
    after = ready.read(CONFIG, 0, 0x10)
    assert after[:4] == before[:4] and after[8:12] == before[8:12]
    assert ready.read_int(CONFIG, 0x34, 1) == 0x40


def test_config_writes_of_other_widths_go_byte_by_byte(ready: Peer) -> None:
    ready.write(CONFIG, 0x3C, b"\x0b\xff\xff")  # interrupt line, pin (RO), min_gnt (RO)
    assert ready.read(CONFIG, 0x3C, 2) == b"\x0b\x01"
    ready.write(CONFIG, 0x0C, b"\x10" + b"\xff" * 7)  # cache line size, then RO bytes up to BAR0
    assert ready.read_int(CONFIG, 0x0C, 1) == 0x10 and ready.read_int(CONFIG, 0x0E, 1) == 0


def test_config_space_beyond_its_end(ready: Peer) -> None:
    ready.expect_error(Command.REGION_WRITE, _write(4094, CONFIG, b"\0" * 4), errno.EINVAL)
    ready.expect_error(Command.REGION_WRITE, _write(4096, CONFIG, b"\0"), errno.EINVAL)


# Section: the server's checks


@pytest.mark.parametrize(
    "index", [vu.PciRegion.BAR1, vu.PciRegion.BAR2, vu.PciRegion.ROM, vu.PciRegion.VGA, 9]
)
def test_regions_without_a_handler(ready: Peer, index: int) -> None:
    ready.expect_error(Command.REGION_WRITE, _write(0, index, b"\0" * 4), errno.EINVAL)


@pytest.mark.parametrize(("data", "count"), [(b"\0" * 4, 8), (b"\0" * 8, 4), (b"", 4), (b"\0" * 4, 0)])
def test_count_must_match_the_data(ready: Peer, data: bytes, count: int) -> None:
    ready.expect_error(Command.REGION_WRITE, _write(Reg.AQA, BAR0, data, count), errno.EINVAL)
    assert ready.function.controller.aqa == 0


def test_a_region_that_cannot_be_written_is_eperm(ready: Peer) -> None:
    fn = ready.function
    fn.regions[CONFIG] = Region(CONFIG, 4096, fn._config_read, None)
    assert ready.read_int(CONFIG, 0x04, 2) == 0x0006  # the fixture's
    ready.expect_error(Command.REGION_WRITE, _write(0x04, CONFIG, b"\x00\x00"), errno.EPERM)
    assert ready.read_int(CONFIG, 0x04, 2) == 0x0006


def test_too_short(ready: Peer) -> None:
    ready.expect_error(Command.REGION_WRITE, _write(0, CONFIG, b"")[:15], errno.EINVAL)


def test_max_data_xfer_size_limits_a_write() -> None:
    p = Peer(ServerOptions(max_data_xfer_size=256))
    try:
        p.version()
        p.write(CONFIG, 0x100, b"\0" * 256)
        p.expect_error(Command.REGION_WRITE, _write(0x100, CONFIG, b"\0" * 257), errno.EINVAL)
    finally:
        p.close()
