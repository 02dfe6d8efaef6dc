"""DEVICE_GET_REGION_INFO: BAR0 (registers), BAR4 (MSI-X table and PBA), config space; the
doorbell page as a sparse mmap area when the function offers mappable doorbells."""

from __future__ import annotations

import errno
import mmap
import os
import socket

import pytest

from vfio_user.peer import Peer, make_function
from vnvme.vfio_user import protocol as vu
from vnvme.vfio_user.protocol import Channel, Command
from vnvme.vfio_user.server import VfioUserServer

RW = vu.RegionFlags.READ | vu.RegionFlags.WRITE


def _info(peer: Peer, index: int, argsz: int = 32) -> tuple[vu.Message, tuple[int, int, int, int, int, int]]:
    reply = peer.ok(Command.DEVICE_GET_REGION_INFO, vu.REGION_INFO.pack(argsz, 0, index, 0, 0, 0))
    fields: tuple[int, int, int, int, int, int] = vu.REGION_INFO.unpack_from(reply.payload)
    return reply, fields


def test_region_info(ready: Peer) -> None:
    sizes = {}
    for index in range(vu.PCI_NUM_REGIONS):
        reply = ready.call(Command.DEVICE_GET_REGION_INFO, vu.REGION_INFO.pack(32, 0, index, 0, 0, 0))
        argsz, rflags, rindex, _cap, size, _off = vu.REGION_INFO.unpack(reply.payload)
        assert rindex == index and not reply.fds
        sizes[index] = (size, rflags)
    fn = ready.function
    rw = vu.RegionFlags.READ | vu.RegionFlags.WRITE
    assert sizes[vu.PciRegion.BAR0] == (fn.bar0_size, rw)
    assert sizes[vu.PciRegion.BAR4] == (fn.bar4_size, rw)
    assert sizes[vu.PciRegion.CONFIG] == (4096, rw)
    assert sizes[vu.PciRegion.VGA] == (0, 0) and sizes[vu.PciRegion.BAR2] == (0, 0)
    ready.expect_error(Command.DEVICE_GET_REGION_INFO, vu.REGION_INFO.pack(32, 0, 9, 0, 0, 0), errno.EINVAL)
    ready.expect_error(Command.DEVICE_GET_REGION_INFO, b"\x20\x00", errno.EINVAL)


def test_trapped_regions_exactly(ready: Peer) -> None:
    fn = ready.function
    for index, size in ((vu.PciRegion.BAR0, fn.bar0_size), (vu.PciRegion.BAR4, fn.bar4_size)):
        reply, fields = _info(ready, index)
        # Exactly the fixed part: no caps, no mmap, offset 0.
        assert fields == (32, RW, index, 0, size, 0) and len(reply.payload) == 32 and not reply.fds
    assert fn.bar0_size == 0x4000 and fn.bar4_size == 0x1000
    _, fields = _info(ready, vu.PciRegion.CONFIG)
    assert fields == (32, RW, vu.PciRegion.CONFIG, 0, 4096, 0)


@pytest.mark.parametrize(
    "index",
    [
        vu.PciRegion.BAR1,
        vu.PciRegion.BAR2,
        vu.PciRegion.BAR3,
        vu.PciRegion.BAR5,
        vu.PciRegion.ROM,
        vu.PciRegion.VGA,
    ],
)
def test_absent_regions_are_empty(ready: Peer, index: int) -> None:
    reply, fields = _info(ready, index)
    assert fields == (32, 0, index, 0, 0, 0) and not reply.fds


@pytest.mark.parametrize("argsz", [0, 16, 31, 32, 4096])
def test_argsz_does_not_matter_without_caps(ready: Peer, argsz: int) -> None:
    _, fields = _info(ready, vu.PciRegion.BAR0, argsz)
    assert fields == (32, RW, 0, 0, ready.function.bar0_size, 0)


@pytest.mark.parametrize("index", [9, 10, 0xFFFFFFFF])
def test_beyond_the_regions(ready: Peer, index: int) -> None:
    ready.expect_error(
        Command.DEVICE_GET_REGION_INFO, vu.REGION_INFO.pack(32, 0, index, 0, 0, 0), errno.EINVAL
    )


def test_too_short(ready: Peer) -> None:
    ready.expect_error(
        Command.DEVICE_GET_REGION_INFO, vu.REGION_INFO.pack(32, 0, 0, 0, 0, 0)[:31], errno.EINVAL
    )


def test_region_info_offers_the_doorbell_page_as_a_sparse_mmap_area() -> None:
    function = make_function(mappable_doorbells=True)
    server = VfioUserServer(function)
    server.version_done = True
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    channel = Channel(theirs, max_message=1 << 21, max_fds=4)
    client = Channel(mine, max_message=1 << 21, max_fds=4)
    try:
        # Too little room: the reply says how much the full answer needs, and carries no caps.
        client.send(
            vu.pack_message(1, Command.DEVICE_GET_REGION_INFO, 0, vu.REGION_INFO.pack(32, 0, 0, 0, 0, 0))
        )
        server._handle_one(channel)
        reply = client.receive()
        argsz, flags, _index, cap_offset, size, _offset = vu.REGION_INFO.unpack(reply.payload)
        assert argsz == 32 + 8 + 8 + 16 and cap_offset == 0 and size == function.bar0_size
        # no CAPS flag without caps: QEMU's vfio-user-pci rejects CAPS with cap_offset 0
        assert flags & vu.RegionFlags.MMAP and not flags & vu.RegionFlags.CAPS
        for fd in reply.fds:
            os.close(fd)
        client.send(
            vu.pack_message(2, Command.DEVICE_GET_REGION_INFO, 0, vu.REGION_INFO.pack(argsz, 0, 0, 0, 0, 0))
        )
        server._handle_one(channel)
        reply = client.receive()
        argsz, flags, _index, cap_offset, size, offset = vu.REGION_INFO.unpack_from(reply.payload)
        assert flags & vu.RegionFlags.MMAP and flags & vu.RegionFlags.CAPS and cap_offset == 32
        cap_id, version, nxt = vu.CAP_HEADER.unpack_from(reply.payload, cap_offset)
        assert (cap_id, version, nxt) == (vu.REGION_INFO_CAP_SPARSE_MMAP, 1, 0)
        nr, _ = vu.SPARSE_MMAP.unpack_from(reply.payload, cap_offset + 8)
        area = vu.SPARSE_AREA.unpack_from(reply.payload, cap_offset + 16)
        assert nr == 1 and area == (0x1000, 0x1000)
        assert len(reply.fds) == 1
        # A store through the client's mapping is what the device scans.
        mapping = mmap.mmap(reply.fds[0], area[1], offset=offset + area[0])
        mapping[0:4] = (3).to_bytes(4, "little")
        assert bytes(function._db_page.view[0:4]) == (3).to_bytes(4, "little")
        mapping.close()
        os.close(reply.fds[0])
    finally:
        mine.close()
        theirs.close()
        function.close()


def test_the_doorbell_page_over_a_served_connection() -> None:
    p = Peer(function=make_function(mappable_doorbells=True))
    try:
        p.version()
        reply, fields = _info(p, vu.PciRegion.BAR0, argsz=64)
        need, flags, index, cap_offset, size, offset = fields
        assert (need, index, cap_offset, size) == (64, 0, 32, p.function.bar0_size)
        assert flags == RW | vu.RegionFlags.MMAP | vu.RegionFlags.CAPS
        assert len(reply.payload) == 64 and len(reply.fds) == 1
        # Each reply carries a fresh copy of the descriptor; the server keeps its own.
        again, _ = _info(p, vu.PciRegion.BAR0, argsz=64)
        assert len(again.fds) == 1 and again.fds[0] != reply.fds[0]
        for fd in reply.fds + again.fds:
            os.close(fd)
        # Other regions stay trapped.
        reply, fields = _info(p, vu.PciRegion.BAR4, argsz=64)
        assert fields[1] == RW and not reply.fds and len(reply.payload) == 32
        # And the page still works after the client dropped its copies.
        third, _ = _info(p, vu.PciRegion.BAR0, argsz=64)
        mapping = mmap.mmap(third.fds[0], 0x1000, offset=offset + 0x1000)
        try:
            mapping[4:8] = (9).to_bytes(4, "little")
            assert bytes(p.function._db_page.view[4:8]) == (9).to_bytes(4, "little")
        finally:
            mapping.close()
            os.close(third.fds[0])
    finally:
        p.close()
