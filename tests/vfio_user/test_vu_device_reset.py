"""DEVICE_RESET: a function level reset of controller, config space and MSI-X table; eventfds and
DMA mappings stay. A disconnect resets the device too, and drops both."""

from __future__ import annotations

import errno
import os

from vfio_user.peer import Peer, eventfd, fd_count, memfd, signalled
from vnvme.spec.registers import CSTS, Reg
from vnvme.vfio_user import protocol as vu
from vnvme.vfio_user.protocol import Command

BAR0 = vu.PciRegion.BAR0
BAR4 = vu.PciRegion.BAR4
CONFIG = vu.PciRegion.CONFIG
EVENTFD_TRIGGER = vu.IrqSetFlags.DATA_EVENTFD | vu.IrqSetFlags.ACTION_TRIGGER


def _assert_not_decoded_until_enabled(peer: Peer) -> None:
    """After a reset the Command register is 0: BAR reads are all ones until firmware sets it."""
    fn = peer.function
    assert peer.read_int(CONFIG, 0x04, 2) == 0
    assert not fn.pci.memory_enabled and not fn.pci.bus_master
    before = fn.stats.undecoded_bar_accesses
    assert peer.read(BAR0, Reg.VS, 4) == b"\xff" * 4
    assert peer.read(BAR4, 0, 8) == b"\xff" * 8
    assert peer.read(BAR4, fn.pba_offset, 8) == b"\xff" * 8
    assert fn.stats.undecoded_bar_accesses == before + 3
    peer.enable_decoding()
    assert peer.read_int(BAR0, Reg.VS, 4) == 0x00010300


def test_device_reset_resets_the_controller(ready: Peer) -> None:
    ctrl = ready.function.controller
    ready.call(
        Command.REGION_WRITE, vu.REGION_ACCESS.pack(Reg.AQA, 0, 4) + (0x001F001F).to_bytes(4, "little")
    )
    assert ctrl.aqa == 0x001F001F
    ready.call(Command.DEVICE_RESET)
    assert ctrl.aqa == 0 and not CSTS.RDY.get(ctrl.csts)


def test_the_reply_is_empty(ready: Peer) -> None:
    reply = ready.ok(Command.DEVICE_RESET)
    assert reply.payload == b"" and not reply.fds
    assert ready.ok(Command.DEVICE_RESET, b"\0" * 8).payload == b""  # a payload is ignored


def test_device_reset_resets_config_space(ready: Peer) -> None:
    ready.write_int(CONFIG, 0x04, 2, 0x0406)  # memory, master, INTx disable
    ready.write_int(CONFIG, 0x10, 4, 0xFEB0_0000)
    ready.write_int(CONFIG, 0x20, 4, 0xFEC0_0000)
    ready.write_int(CONFIG, 0x3C, 1, 11)
    ready.write_int(CONFIG, 0x52, 2, 1 << 15)  # MSI-X enable
    pci = ready.function.pci
    assert pci.memory_enabled and pci.bus_master and pci.msix_enabled
    before_reset = ready.read(CONFIG, 0, 4096)
    ready.ok(Command.DEVICE_RESET)
    assert ready.read_int(CONFIG, 0x04, 2) == 0
    assert not pci.memory_enabled and not pci.bus_master and not pci.intx_disabled and not pci.msix_enabled
    assert ready.read_int(CONFIG, 0x10, 4) == 0b100 and ready.read_int(CONFIG, 0x20, 4) == 0
    assert ready.read_int(CONFIG, 0x3C, 1) == 0
    assert ready.read_int(CONFIG, 0x52, 2) & 1 << 15 == 0
    # The identity is what it was.
    after = ready.read(CONFIG, 0, 4096)
    assert after[:4] == before_reset[:4] and after[8:12] == before_reset[8:12]
    _assert_not_decoded_until_enabled(ready)


def test_device_reset_masks_the_msix_table_again(ready: Peer) -> None:
    ready.write_int(BAR4, 0, 8, 0xFEE0_0000)
    ready.write_int(BAR4, 8, 4, 0x41)
    ready.write_int(BAR4, 12, 4, 0)
    assert ready.read_int(BAR4, 0, 8) == 0xFEE0_0000 and ready.read_int(BAR4, 8, 8) == 0x41  # unmasked
    ready.ok(Command.DEVICE_RESET)
    _assert_not_decoded_until_enabled(ready)
    assert ready.read(BAR4, 0, 8) + ready.read(BAR4, 8, 8) == b"\0" * 12 + b"\x01\0\0\0"


def test_eventfds_and_mappings_survive_a_device_reset(ready: Peer) -> None:
    efd = eventfd()
    fd = memfd()
    try:
        ready.set_irqs(EVENTFD_TRIGGER, vu.PciIrq.MSIX, 0, 1, fds=[efd])
        ready.dma_map(0x1_0000_0000, 1 << 20, fd)
        before = fd_count()
        ready.ok(Command.DEVICE_RESET)
        assert fd_count() == before
        assert [r.gpa for r in ready.function.memory.regions()] == [0x1_0000_0000]
        os.pwrite(fd, b"still", 0)
        assert ready.function.memory.read(0x1_0000_0000, 5) == b"still"
        ready.enable_decoding()  # the reset cleared Bus Master Enable: set it again, as firmware would
        ready.function._raise(0)
        assert signalled(efd) == 1
    finally:
        os.close(efd)
        os.close(fd)


def test_device_reset_forgets_pending_interrupts(ready: Peer) -> None:
    fn = ready.function
    msix = vu.PciIrq.MSIX
    efd = eventfd()
    try:
        ready.set_irqs(EVENTFD_TRIGGER, msix, 2, 1, fds=[efd])
        ready.set_irqs(vu.IrqSetFlags.DATA_NONE | vu.IrqSetFlags.ACTION_MASK, msix, 2, 1)
        fn._raise(1)  # no eventfd yet: pending
        fn._raise(2)  # masked: pending
        fn._raise(64)  # the last vector, in the second PBA QWORD
        assert signalled(efd) == 0
        assert ready.read_int(BAR4, fn.pba_offset, 8) == 0b110
        assert ready.read_int(BAR4, fn.pba_offset + 8, 8) == 1
        ready.ok(Command.DEVICE_RESET)
        assert not any(fn.pending[msix]) and not any(fn.pending[vu.PciIrq.INTX])
        ready.enable_decoding()
        assert ready.read_int(BAR4, fn.pba_offset, 8) == 0
        assert ready.read_int(BAR4, fn.pba_offset + 8, 8) == 0
        # Forgotten, not merely hidden: neither unmasking nor a new eventfd delivers them.
        ready.set_irqs(vu.IrqSetFlags.DATA_NONE | vu.IrqSetFlags.ACTION_UNMASK, msix, 2, 1)
        ready.set_irqs(EVENTFD_TRIGGER, msix, 1, 1, fds=[efd])
        assert signalled(efd) == 0
        assert fn.stats.interrupts_signalled == 0
    finally:
        os.close(efd)


def test_the_server_serves_on_after_a_reset(ready: Peer) -> None:
    for _ in range(3):
        ready.ok(Command.DEVICE_RESET)
    assert ready.server.version_done
    _assert_not_decoded_until_enabled(ready)
    assert ready.server.messages["DEVICE_RESET"] == 3


def test_a_descriptor_is_refused_and_closed(ready: Peer) -> None:
    fd = memfd()
    try:
        ready.write_int(BAR0, Reg.AQA, 4, 5)
        before = fd_count()
        ready.expect_error(Command.DEVICE_RESET, b"", errno.EINVAL, [fd])
        assert fd_count() == before
        assert ready.function.controller.aqa == 5  # and nothing was reset
    finally:
        os.close(fd)


def test_disconnect_resets_the_device_as_well(ready: Peer) -> None:
    fn = ready.function
    ready.write_int(BAR0, Reg.AQA, 4, 0x001F001F)
    ready.write_int(CONFIG, 0x04, 2, 0x0006)
    ready.write_int(BAR4, 12, 4, 0)
    ready.disconnect()
    assert fn.controller.aqa == 0
    assert fn.pci.read(0x04, 2) == 0
    assert bytes(fn.msix_table[12:16]) == b"\x01\0\0\0"
