"""DMA_UNMAP: one mapping exactly as it was mapped, or all of them."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator

import pytest

from vfio_user.peer import PAGE, Peer, fd_count, memfd
from vnvme.memory import GuestMemoryError
from vnvme.vfio_user import protocol as vu
from vnvme.vfio_user.protocol import Command

BASE = 0x1_0000_0000


def _unmap(flags: int, address: int, size: int, argsz: int = vu.DMA_UNMAP.size) -> bytes:
    return vu.DMA_UNMAP.pack(argsz, flags, address, size)


@pytest.fixture
def mapped(ready: Peer) -> Iterator[Peer]:
    """1 MiB at BASE and one page at 0x2_0000_0000, both from one memfd."""
    fd = memfd(2 << 20)
    try:
        ready.dma_map(BASE, 1 << 20, fd)
        ready.dma_map(0x2_0000_0000, PAGE, fd, offset=1 << 20, flags=vu.DmaFlags.READ)
        yield ready
    finally:
        os.close(fd)


def test_dma_unmap(ready: Peer) -> None:
    fd = memfd(2 << 20)
    flags = vu.DmaFlags.READ | vu.DmaFlags.WRITE
    before = fd_count()
    ready.call(Command.DMA_MAP, vu.DMA_MAP.pack(32, flags, 0, BASE, 1 << 20), [fd])
    ready.call(Command.DMA_MAP, vu.DMA_MAP.pack(32, vu.DmaFlags.READ, 1 << 20, 0x2_0000_0000, PAGE), [fd])
    ready.expect_error(Command.DMA_UNMAP, _unmap(0, BASE, PAGE), errno.ENOENT)
    reply = ready.call(Command.DMA_UNMAP, _unmap(0, BASE, 1 << 20))
    assert vu.DMA_UNMAP.unpack(reply.payload) == (24, 0, BASE, 1 << 20)
    ready.call(Command.DMA_UNMAP, _unmap(vu.DmaUnmapFlags.ALL, 0, 0))
    assert ready.function.memory.regions() == ()
    assert fd_count() == before  # every descriptor passed was closed by the server
    os.close(fd)


def test_unmapped_memory_is_gone_for_the_device(mapped: Peer) -> None:
    memory = mapped.function.memory
    memory.write(BASE, b"x")
    before = fd_count()
    mapped.ok(Command.DMA_UNMAP, _unmap(0, BASE, 1 << 20))
    assert fd_count() == before - 1  # the mapping's descriptor
    assert BASE not in mapped.server.dma
    with pytest.raises(GuestMemoryError):
        memory.read(BASE, 1)
    assert not memory.is_mapped(BASE, 1)
    assert [r.gpa for r in memory.regions()] == [0x2_0000_0000]


@pytest.mark.parametrize(
    ("address", "size"),
    [
        (BASE, PAGE),  # the start, but not the size
        (BASE, 2 << 20),
        (BASE + PAGE, (1 << 20) - PAGE),  # inside it
        (0x3_0000_0000, PAGE),  # nothing there
        (0, 0),
    ],
)
def test_unmapping_anything_but_a_whole_mapping_is_enoent(mapped: Peer, address: int, size: int) -> None:
    mapped.expect_error(Command.DMA_UNMAP, _unmap(0, address, size), errno.ENOENT)
    assert len(mapped.function.memory.regions()) == 2


def test_unmap_twice(mapped: Peer) -> None:
    mapped.ok(Command.DMA_UNMAP, _unmap(0, 0x2_0000_0000, PAGE))
    mapped.expect_error(Command.DMA_UNMAP, _unmap(0, 0x2_0000_0000, PAGE), errno.ENOENT)


def test_unmap_all(mapped: Peer) -> None:
    before = fd_count()
    reply = mapped.ok(Command.DMA_UNMAP, _unmap(vu.DmaUnmapFlags.ALL, 0, 0))
    assert vu.DMA_UNMAP.unpack(reply.payload) == (24, vu.DmaUnmapFlags.ALL, 0, 0)
    assert mapped.function.memory.regions() == () and mapped.server.dma == {}
    assert fd_count() == before - 2
    # Nothing mapped: still fine.
    mapped.ok(Command.DMA_UNMAP, _unmap(vu.DmaUnmapFlags.ALL, 0, 0))


@pytest.mark.parametrize(
    ("flags", "address", "size", "err"),
    [
        (vu.DmaUnmapFlags.GET_DIRTY_BITMAP, BASE, 1 << 20, errno.ENOTSUP),
        (vu.DmaUnmapFlags.GET_DIRTY_BITMAP | vu.DmaUnmapFlags.ALL, 0, 0, errno.ENOTSUP),
        (1 << 2, BASE, 1 << 20, errno.EINVAL),  # unknown flag
        (1 << 31, BASE, 1 << 20, errno.EINVAL),
        (vu.DmaUnmapFlags.ALL | 1 << 2, 0, 0, errno.EINVAL),
        (vu.DmaUnmapFlags.ALL, BASE, 0, errno.EINVAL),  # ALL with an address
        (vu.DmaUnmapFlags.ALL, 0, 1 << 20, errno.EINVAL),  # ALL with a size
        (vu.DmaUnmapFlags.ALL, BASE, 1 << 20, errno.EINVAL),
    ],
)
def test_bad_flags(mapped: Peer, flags: int, address: int, size: int, err: int) -> None:
    mapped.expect_error(Command.DMA_UNMAP, _unmap(flags, address, size), err)
    assert len(mapped.function.memory.regions()) == 2  # nothing was unmapped


def test_too_short(mapped: Peer) -> None:
    mapped.expect_error(Command.DMA_UNMAP, _unmap(0, BASE, 1 << 20)[:-1], errno.EINVAL)
    mapped.expect_error(Command.DMA_UNMAP, b"", errno.EINVAL)
    assert len(mapped.function.memory.regions()) == 2


def test_a_descriptor_with_dma_unmap_is_refused_and_closed(mapped: Peer) -> None:
    fd = memfd(PAGE)
    try:
        before = fd_count()
        mapped.expect_error(Command.DMA_UNMAP, _unmap(0, BASE, 1 << 20), errno.EINVAL, [fd])
        assert fd_count() == before
        assert len(mapped.function.memory.regions()) == 2
    finally:
        os.close(fd)


def test_an_address_freed_by_unmap_can_be_mapped_again(mapped: Peer) -> None:
    fd = memfd(PAGE)
    try:
        mapped.ok(Command.DMA_UNMAP, _unmap(0, BASE, 1 << 20))
        mapped.dma_map(BASE + PAGE, PAGE, fd)
        os.pwrite(fd, b"again", 0)
        assert mapped.function.memory.read(BASE + PAGE, 5) == b"again"
    finally:
        os.close(fd)


def test_disconnect_unmaps_everything(mapped: Peer) -> None:
    before = fd_count()
    mapped.disconnect()
    assert mapped.function.memory.regions() == () and mapped.server.dma == {}
    assert fd_count() == before - 3  # the two mappings' descriptors, and our end of the socket
