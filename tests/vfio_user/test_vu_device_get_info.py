"""DEVICE_GET_INFO: a PCI device that can be reset, with the nine VFIO regions and five IRQ types."""

from __future__ import annotations

import errno
import os

from vfio_user.peer import Peer, fd_count, memfd
from vnvme.vfio_user import protocol as vu
from vnvme.vfio_user.protocol import Command


def test_device_info(ready: Peer) -> None:
    reply = ready.call(Command.DEVICE_GET_INFO, vu.DEVICE_INFO.pack(16, 0, 0, 0))
    argsz, flags, regions, irqs = vu.DEVICE_INFO.unpack(reply.payload)
    assert (argsz, flags, regions, irqs) == (16, vu.DeviceFlags.RESET | vu.DeviceFlags.PCI, 9, 5)
    assert not reply.is_error and not reply.fds and len(reply.payload) == vu.DEVICE_INFO.size


def test_what_the_client_filled_in_does_not_matter(ready: Peer) -> None:
    reply = ready.ok(Command.DEVICE_GET_INFO, vu.DEVICE_INFO.pack(64, 0xFFFF, 77, 88) + b"\0" * 48)
    assert vu.DEVICE_INFO.unpack(reply.payload) == (16, vu.DeviceFlags.RESET | vu.DeviceFlags.PCI, 9, 5)


def test_too_short(ready: Peer) -> None:
    ready.expect_error(Command.DEVICE_GET_INFO, b"", errno.EINVAL)
    ready.expect_error(Command.DEVICE_GET_INFO, vu.DEVICE_INFO.pack(16, 0, 0, 0)[:15], errno.EINVAL)


def test_a_descriptor_is_refused_and_closed(ready: Peer) -> None:
    fd = memfd()
    try:
        before = fd_count()
        ready.expect_error(Command.DEVICE_GET_INFO, vu.DEVICE_INFO.pack(16, 0, 0, 0), errno.EINVAL, [fd])
        assert fd_count() == before
    finally:
        os.close(fd)


def test_the_counts_match_the_info_commands(ready: Peer) -> None:
    """Every index below the counts is answered, the first beyond them refused."""
    reply = ready.ok(Command.DEVICE_GET_INFO, vu.DEVICE_INFO.pack(16, 0, 0, 0))
    _argsz, _flags, regions, irqs = vu.DEVICE_INFO.unpack(reply.payload)
    for index in range(regions):
        ready.ok(Command.DEVICE_GET_REGION_INFO, vu.REGION_INFO.pack(32, 0, index, 0, 0, 0))
    ready.expect_error(
        Command.DEVICE_GET_REGION_INFO, vu.REGION_INFO.pack(32, 0, regions, 0, 0, 0), errno.EINVAL
    )
    for index in range(irqs):
        ready.ok(Command.DEVICE_GET_IRQ_INFO, vu.IRQ_INFO.pack(16, 0, index, 0))
    ready.expect_error(Command.DEVICE_GET_IRQ_INFO, vu.IRQ_INFO.pack(16, 0, irqs, 0), errno.EINVAL)
