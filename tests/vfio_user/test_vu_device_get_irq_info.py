"""DEVICE_GET_IRQ_INFO: INTx (one line) and MSI-X (one eventfd per vector); no MSI, ERR or REQ."""

from __future__ import annotations

import errno

import pytest

from vfio_user.peer import Peer
from vnvme.vfio_user import protocol as vu
from vnvme.vfio_user.protocol import Command

EVENTFD_MASKABLE_NORESIZE = vu.IrqInfoFlags.EVENTFD | vu.IrqInfoFlags.MASKABLE | vu.IrqInfoFlags.NORESIZE


def _info(peer: Peer, index: int) -> tuple[int, int, int, int]:
    reply = peer.ok(Command.DEVICE_GET_IRQ_INFO, vu.IRQ_INFO.pack(16, 0, index, 0))
    assert len(reply.payload) == vu.IRQ_INFO.size and not reply.fds
    argsz, flags, got_index, count = vu.IRQ_INFO.unpack(reply.payload)
    return argsz, flags, got_index, count


def test_irq_info(ready: Peer) -> None:
    reply = ready.call(Command.DEVICE_GET_IRQ_INFO, vu.IRQ_INFO.pack(16, 0, vu.PciIrq.MSIX, 0))
    _argsz, flags, index, count = vu.IRQ_INFO.unpack(reply.payload)
    assert index == vu.PciIrq.MSIX and count == ready.function.vectors and flags & vu.IrqInfoFlags.EVENTFD
    reply = ready.call(Command.DEVICE_GET_IRQ_INFO, vu.IRQ_INFO.pack(16, 0, vu.PciIrq.MSI, 0))
    assert vu.IRQ_INFO.unpack(reply.payload)[3] == 0  # no MSI
    ready.expect_error(Command.DEVICE_GET_IRQ_INFO, vu.IRQ_INFO.pack(16, 0, 5, 0), errno.EINVAL)


def test_msix(ready: Peer) -> None:
    assert _info(ready, vu.PciIrq.MSIX) == (16, EVENTFD_MASKABLE_NORESIZE, vu.PciIrq.MSIX, 65)
    assert ready.function.vectors == 65  # one per queue pair, admin included


def test_intx(ready: Peer) -> None:
    assert _info(ready, vu.PciIrq.INTX) == (16, EVENTFD_MASKABLE_NORESIZE, vu.PciIrq.INTX, 1)


@pytest.mark.parametrize("index", [vu.PciIrq.MSI, vu.PciIrq.ERR, vu.PciIrq.REQ])
def test_absent_types_have_no_interrupts(ready: Peer, index: int) -> None:
    assert _info(ready, index) == (16, 0, index, 0)


@pytest.mark.parametrize("index", [5, 6, 0xFFFFFFFF])
def test_beyond_the_irq_types(ready: Peer, index: int) -> None:
    ready.expect_error(Command.DEVICE_GET_IRQ_INFO, vu.IRQ_INFO.pack(16, 0, index, 0), errno.EINVAL)


def test_too_short(ready: Peer) -> None:
    ready.expect_error(Command.DEVICE_GET_IRQ_INFO, vu.IRQ_INFO.pack(16, 0, 2, 0)[:12], errno.EINVAL)
