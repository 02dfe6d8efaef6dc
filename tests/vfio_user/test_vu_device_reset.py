"""DEVICE_RESET, as Linux's VFIO_DEVICE_RESET (the vfio-user spec only mirrors that ioctl): the
NVMe controller resets and pending interrupts are forgotten; config space (Memory Space and Bus
Master Enable, BARs, MSI-X capability), the MSI-X table, eventfds, masks and DMA mappings stay.
A disconnect resets all of it, as a bus reset: the next client is a new VM.

These tests once asserted the opposite (config space back to power-on, BARs undecoded after a
reset): reversed on purpose, because a client that resets the device and then re-initialises the
controller, as the first hour of a new user does, read CC and CSTS as 0xffffffff. Linux's
vfio-pci saves and restores config space around the function reset, and QEMU's vfio-user server
serves BAR accesses whatever its Command register says; clients rely on one or the other.
"""

from __future__ import annotations

import errno
import os
import select

from vfio_user.peer import LE, PAGE, Peer, eventfd, fd_count, make_function, memfd, signalled
from vnvme.function import NvmeFunction
from vnvme.spec.commands import SQE, AdminOpcode, Cns
from vnvme.spec.registers import CC, CSTS, Reg, compose, sq_tail_doorbell
from vnvme.vfio_user import protocol as vu
from vnvme.vfio_user.pci import PM_CAP_OFFSET, PmReg
from vnvme.vfio_user.protocol import Command

BAR0 = vu.PciRegion.BAR0
BAR4 = vu.PciRegion.BAR4
CONFIG = vu.PciRegion.CONFIG
EVENTFD_TRIGGER = vu.IrqSetFlags.DATA_EVENTFD | vu.IrqSetFlags.ACTION_TRIGGER
BASE = 0x4000_0000
ASQ, ACQ, DATA = BASE, BASE + PAGE, BASE + 2 * PAGE


def _config_space(fn: NvmeFunction) -> bytes:
    return b"".join(fn.pci.read(offset, 4).to_bytes(4, LE) for offset in range(0, 4096, 4))


def _assert_decoded(peer: Peer) -> None:
    """BAR0 and BAR4 answer at once, nobody having touched the Command register again."""
    fn = peer.function
    before = fn.stats.undecoded_bar_accesses
    assert peer.read_int(BAR0, Reg.VS, 4) == 0x00010300
    assert peer.read_int(BAR4, 12, 4) in (0, 1)  # a Vector Control word, not all ones
    assert fn.stats.undecoded_bar_accesses == before


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


def test_device_reset_keeps_config_space(ready: Peer) -> None:
    ready.write_int(CONFIG, 0x04, 2, 0x0406)  # memory, master, INTx disable
    ready.write_int(CONFIG, 0x10, 4, 0xFEB0_0000)
    ready.write_int(CONFIG, 0x20, 4, 0xFEC0_0000)
    ready.write_int(CONFIG, 0x3C, 1, 11)
    ready.write_int(CONFIG, 0x52, 2, 1 << 15)  # MSI-X enable
    pci = ready.function.pci
    before_reset = ready.read(CONFIG, 0, 4096)
    ready.ok(Command.DEVICE_RESET)
    assert ready.read(CONFIG, 0, 4096) == before_reset
    assert pci.memory_enabled and pci.bus_master and pci.intx_disabled and pci.msix_enabled
    assert pci.bar_address(0) == 0xFEB0_0000 and pci.bar_address(4) == 0xFEC0_0000
    _assert_decoded(ready)


def test_a_client_reinitialises_the_controller_after_a_device_reset(ready: Peer) -> None:
    """The issue's scenario: bring-up, DEVICE_RESET, bring-up again with nothing else between;
    the admin command after it completes and signals the eventfd set before the reset."""
    memory = ready.map_shared(BASE, 16 * PAGE)
    vector0 = ready.enable_with_admin_queues(ASQ, ACQ)
    try:
        ready.ok(Command.DEVICE_RESET)
        assert ready.read_int(BAR0, Reg.CSTS, 4) == 0  # reset, and decoded: not 0xffffffff
        assert ready.read_int(BAR0, Reg.CC, 4) == 0
        memory[PAGE : 2 * PAGE] = bytes(PAGE)  # the CQ starts over at phase 1
        ready.write_int(BAR0, Reg.AQA, 4, (1 << 16) | 1)
        ready.write_int(BAR0, Reg.ASQ, 8, ASQ)
        ready.write_int(BAR0, Reg.ACQ, 8, ACQ)
        ready.write_int(BAR0, Reg.CC, 4, compose((CC.EN, 1), (CC.IOSQES, 6), (CC.IOCQES, 4)))
        assert CSTS.RDY.get(ready.read_int(BAR0, Reg.CSTS, 4))
        SQE.pack_into(
            memory, 0, AdminOpcode.IDENTIFY, 0, 0x42, 0, 0, 0, 0, DATA, 0, Cns.CONTROLLER, 0, 0, 0, 0, 0
        )
        ready.write_int(BAR0, sq_tail_doorbell(0, 0), 4, 1)
        assert select.select([vector0], [], [], 5)[0] and signalled(vector0) == 1
        assert int.from_bytes(memory[PAGE + 12 : PAGE + 16], LE) == 0x42 | (1 << 16)  # CID, phase 1, success
    finally:
        os.close(vector0)
        memory.close()


def test_memory_space_still_gates_the_bars_across_a_device_reset(ready: Peer) -> None:
    """Kept means kept: a client that cleared Memory Space Enable finds it clear after the reset
    (BARs undecoded, reads all ones) until it sets it again."""
    fn = ready.function
    ready.write_int(CONFIG, 0x04, 2, 0x0004)  # bus master only
    ready.ok(Command.DEVICE_RESET)
    assert ready.read_int(CONFIG, 0x04, 2) == 0x0004
    before = fn.stats.undecoded_bar_accesses
    assert ready.read(BAR0, Reg.VS, 4) == b"\xff" * 4
    assert ready.read(BAR4, 0, 8) == b"\xff" * 8
    assert fn.stats.undecoded_bar_accesses == before + 2
    ready.enable_decoding()
    assert ready.read_int(BAR0, Reg.VS, 4) == 0x00010300


def test_device_reset_returns_the_function_to_d0(ready: Peer) -> None:
    """As vfio-pci does before the reset; the rest of the PM capability stays."""
    pmcsr = PM_CAP_OFFSET + PmReg.PMCSR
    ready.write_int(CONFIG, pmcsr, 2, 0b11)  # D3hot
    assert ready.function.pci.power_state == 3
    ready.ok(Command.DEVICE_RESET)
    assert ready.function.pci.power_state == 0
    assert ready.read_int(CONFIG, pmcsr, 2) == 1 << 3  # No_Soft_Reset, D0
    _assert_decoded(ready)


def test_device_reset_keeps_the_msix_table(ready: Peer) -> None:
    """vfio-pci restores the MSI-X table with the rest of the MSI-X state."""
    ready.write_int(BAR4, 0, 8, 0xFEE0_0000)
    ready.write_int(BAR4, 8, 4, 0x41)
    ready.write_int(BAR4, 12, 4, 0)
    table = ready.read(BAR4, 0, 8) + ready.read(BAR4, 8, 8)
    assert table == (0xFEE0_0000).to_bytes(8, LE) + (0x41).to_bytes(8, LE)  # unmasked
    ready.ok(Command.DEVICE_RESET)
    assert ready.read(BAR4, 0, 8) + ready.read(BAR4, 8, 8) == table


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
        ready.function._raise(0)  # Bus Master Enable kept: no firmware step needed first
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
    _assert_decoded(ready)
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
    """Unlike DEVICE_RESET: config space and the MSI-X table back to power-on, eventfds and
    masks dropped (the next client is a new VM)."""
    fn = ready.function
    fresh = make_function()
    power_on = _config_space(fresh), bytes(fresh.msix_table)
    fresh.close()
    efd = eventfd()
    try:
        ready.set_irqs(EVENTFD_TRIGGER, vu.PciIrq.MSIX, 0, 1, fds=[efd])
        ready.set_irqs(vu.IrqSetFlags.DATA_NONE | vu.IrqSetFlags.ACTION_MASK, vu.PciIrq.MSIX, 0, 1)
        ready.write_int(BAR0, Reg.AQA, 4, 0x001F001F)
        ready.write_int(CONFIG, 0x10, 4, 0xFEB0_0000)
        ready.write_int(CONFIG, 0x52, 2, 1 << 15)
        ready.write_int(BAR4, 12, 4, 0)
        ready.disconnect()
        assert fn.controller.aqa == 0
        assert (_config_space(fn), bytes(fn.msix_table)) == power_on
        assert fn.pci.bar_address(0) == 0 and not fn.pci.msix_enabled
        assert set(fn.eventfds[vu.PciIrq.MSIX]) == {-1} and not any(fn.masked[vu.PciIrq.MSIX])
    finally:
        os.close(efd)
