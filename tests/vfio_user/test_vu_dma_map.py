"""DMA_MAP: client memory handed to the device as a file descriptor and mmapped by the server."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator

import pytest

from vfio_user.peer import PAGE, Peer, eventfd, fd_count, memfd
from vnvme.memory import GuestMemoryError
from vnvme.vfio_user import protocol as vu
from vnvme.vfio_user.protocol import Command
from vnvme.vfio_user.server import ServerOptions

RW = vu.DmaFlags.READ | vu.DmaFlags.WRITE
BASE = 0x1_0000_0000


def _map(flags: int, offset: int, address: int, size: int, argsz: int = vu.DMA_MAP.size) -> bytes:
    return vu.DMA_MAP.pack(argsz, flags, offset, address, size)


@pytest.fixture
def fd() -> Iterator[int]:
    """A 2 MiB memfd, closed after the test."""
    descriptor = memfd(2 << 20)
    try:
        yield descriptor
    finally:
        os.close(descriptor)


def test_dma_map(ready: Peer, fd: int) -> None:
    before = fd_count()
    reply = ready.call(Command.DMA_MAP, _map(RW, 0, BASE, 1 << 20), [fd])
    assert not reply.is_error and reply.payload == b"" and not reply.fds
    regions = ready.function.memory.regions()
    assert [(r.gpa, r.size, r.writable) for r in regions] == [(BASE, 1 << 20, True)]
    # The device sees what the client writes into its memfd, and the client what the device writes.
    os.pwrite(fd, b"hello", 16)
    assert ready.function.memory.read(BASE + 16, 5) == b"hello"
    ready.function.memory.write(BASE + 100, b"world")
    assert os.pread(fd, 5, 100) == b"world"
    ready.expect_error(Command.DMA_MAP, _map(RW, 0, BASE + PAGE, PAGE), errno.EEXIST, [fd])
    ready.expect_error(Command.DMA_MAP, _map(RW, 0, BASE + 0x10_0000_0, 100), errno.EINVAL, [fd])
    # No fd: memory the device reaches by DMA_READ / DMA_WRITE messages (an offset makes no sense).
    ready.expect_error(Command.DMA_MAP, _map(RW, PAGE, 0x9_0000_0000, PAGE), errno.EINVAL)
    ready.call(Command.DMA_MAP, _map(RW, 0, 0x9_0000_0000, PAGE))
    assert ready.function.memory.is_remote(0x9_0000_0000)
    ready.call(Command.DMA_UNMAP, vu.DMA_UNMAP.pack(24, 0, 0x9_0000_0000, PAGE))
    ready.expect_error(Command.DMA_MAP, _map(RW, 0, 0x9_0000_0000, PAGE), errno.EINVAL, [fd, fd])
    ready.expect_error(Command.DMA_MAP, _map(0, 0, 0x9_0000_0000, PAGE), errno.EINVAL, [fd])
    ready.expect_error(Command.DMA_MAP, b"\0" * 16, errno.EINVAL)
    # Read-only mapping: the device may not write there.
    ready.call(Command.DMA_MAP, _map(vu.DmaFlags.READ, 1 << 20, 0x2_0000_0000, PAGE), [fd])
    assert not [r for r in ready.function.memory.regions() if r.gpa == 0x2_0000_0000][0].writable
    # Each mapping holds one descriptor of its own (the mmap's); every one passed was closed.
    assert fd_count() == before + 2
    assert sorted(ready.server.dma) == [BASE, 0x2_0000_0000]


def test_a_read_only_mapping_refuses_device_writes(ready: Peer, fd: int) -> None:
    os.pwrite(fd, b"readable", (1 << 20) + 8)
    ready.dma_map(BASE, PAGE, fd, offset=1 << 20, flags=vu.DmaFlags.READ)
    memory = ready.function.memory
    assert memory.read(BASE + 8, 8) == b"readable"
    with pytest.raises(GuestMemoryError):
        memory.write(BASE + 8, b"written!")
    with pytest.raises(GuestMemoryError):
        memory.view(BASE, 16, write=True)
    assert os.pread(fd, 8, (1 << 20) + 8) == b"readable"


def test_a_read_only_descriptor_can_back_a_read_only_mapping_only(ready: Peer, fd: int) -> None:
    rdonly = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY)
    try:
        before = fd_count()
        ready.expect_error(Command.DMA_MAP, _map(RW, 0, BASE, PAGE), errno.EACCES, [rdonly])
        assert fd_count() == before and ready.function.memory.regions() == ()
        ready.dma_map(BASE, PAGE, rdonly, flags=vu.DmaFlags.READ)
        assert not ready.function.memory.regions()[0].writable
    finally:
        os.close(rdonly)


def test_the_mapping_count_is_limited() -> None:
    p = Peer(ServerOptions(max_dma_maps=2))
    fd = memfd(4 * PAGE)
    try:
        caps = p.version()["capabilities"]
        assert isinstance(caps, dict) and caps["max_dma_maps"] == 2
        p.dma_map(BASE, PAGE, fd)
        p.dma_map(BASE + PAGE, PAGE, fd, offset=PAGE)
        before = fd_count()
        p.expect_error(Command.DMA_MAP, _map(RW, 2 * PAGE, BASE + 2 * PAGE, PAGE), errno.ENOSPC, [fd])
        assert fd_count() == before  # the refused descriptor was closed
        assert len(p.function.memory.regions()) == 2
        p.ok(Command.DMA_UNMAP, vu.DMA_UNMAP.pack(24, 0, BASE, PAGE))
        p.dma_map(BASE + 2 * PAGE, PAGE, fd, offset=2 * PAGE)  # room again
        assert sorted(p.server.dma) == [BASE + PAGE, BASE + 2 * PAGE]
    finally:
        p.close()
        os.close(fd)


@pytest.mark.parametrize(
    ("offset", "size", "err"),
    [
        (4 << 20, PAGE, errno.EINVAL),  # starts beyond the 2 MiB file
        (2 << 20, PAGE, errno.EINVAL),  # starts at its end
        ((2 << 20) - PAGE, 2 * PAGE, errno.EINVAL),  # runs past its end
        (1 << 63, PAGE, errno.EINVAL),  # an offset mmap cannot even express
        ((1 << 64) - PAGE, PAGE, errno.EINVAL),
    ],
)
def test_an_offset_or_size_beyond_the_file_is_an_error_not_a_crash(
    ready: Peer, fd: int, offset: int, size: int, err: int
) -> None:
    before = fd_count()
    ready.expect_error(Command.DMA_MAP, _map(RW, offset, BASE, size), err, [fd])
    assert fd_count() == before
    assert ready.function.memory.regions() == () and ready.server.dma == {}
    ready.dma_map(BASE, PAGE, fd)  # still serving, and the address is still free


def test_a_descriptor_that_cannot_be_mapped(ready: Peer) -> None:
    efd = eventfd()
    try:
        before = fd_count()
        ready.expect_error(Command.DMA_MAP, _map(RW, 0, BASE, PAGE), errno.ENODEV, [efd])
        assert fd_count() == before and ready.function.memory.regions() == ()
    finally:
        os.close(efd)


_BAD_MAPPINGS = [
    (_map(RW, 0, BASE, PAGE, argsz=31), "argsz below the structure"),
    (_map(RW, 0, BASE, 0), "size 0"),
    (_map(RW, 0, BASE + 1, PAGE), "address not page aligned"),
    (_map(RW, 1, BASE, PAGE), "offset not page aligned"),
    (_map(RW, 0, BASE, PAGE + 512), "size not page aligned"),
    (_map(RW, 0, (1 << 64) - PAGE, 2 * PAGE), "wraps past 2^64"),
    (_map(RW | 4, 0, BASE, PAGE), "unknown flag"),
    (_map(vu.DmaFlags.WRITE, 0, BASE, PAGE), "write without read"),
]


@pytest.mark.parametrize(
    ("payload", "why"), _BAD_MAPPINGS, ids=[why.replace(" ", "-") for _, why in _BAD_MAPPINGS]
)
def test_bad_mappings_are_einval_and_close_the_descriptor(
    ready: Peer, fd: int, payload: bytes, why: str
) -> None:
    before = fd_count()
    ready.expect_error(Command.DMA_MAP, payload, errno.EINVAL, [fd])
    assert fd_count() == before, why
    assert ready.function.memory.regions() == ()


def test_too_many_descriptors_are_all_closed(ready: Peer, fd: int) -> None:
    before = fd_count()
    ready.expect_error(Command.DMA_MAP, _map(RW, 0, BASE, PAGE), errno.EINVAL, [fd, fd, fd])
    assert fd_count() == before
    # Even when the message is refused for something else first.
    ready.expect_error(Command.DMA_MAP, b"\0" * 8, errno.EINVAL, [fd, fd])
    assert fd_count() == before


@pytest.mark.parametrize(
    ("address", "size"),
    [
        (BASE, PAGE),  # same start
        (BASE - PAGE, 2 * PAGE),  # overlaps the head
        (BASE + 3 * PAGE, 2 * PAGE),  # overlaps the tail
        (BASE - PAGE, 8 * PAGE),  # contains it
        (BASE + PAGE, PAGE),  # inside it
    ],
)
def test_overlapping_mappings_are_eexist(ready: Peer, fd: int, address: int, size: int) -> None:
    ready.dma_map(BASE, 4 * PAGE, fd)
    before = fd_count()
    ready.expect_error(Command.DMA_MAP, _map(RW, 0, address, size), errno.EEXIST, [fd])
    assert fd_count() == before
    assert [(r.gpa, r.size) for r in ready.function.memory.regions()] == [(BASE, 4 * PAGE)]


def test_adjacent_mappings_and_file_offsets(ready: Peer, fd: int) -> None:
    os.pwrite(fd, b"second", 1 << 20)
    ready.dma_map(BASE + PAGE, PAGE, fd, offset=1 << 20)
    ready.dma_map(BASE, PAGE, fd)  # ends where the other starts
    ready.dma_map(BASE + 2 * PAGE, PAGE, fd, offset=PAGE)
    memory = ready.function.memory
    assert [r.gpa for r in memory.regions()] == [BASE, BASE + PAGE, BASE + 2 * PAGE]
    assert memory.read(BASE + PAGE, 6) == b"second"
    # One access may span adjacent mappings.
    memory.write(BASE + PAGE - 2, b"abcd")
    assert os.pread(fd, 2, PAGE - 2) == b"ab" and os.pread(fd, 2, 1 << 20) == b"cd"


def test_the_same_memory_may_be_mapped_at_two_addresses(ready: Peer, fd: int) -> None:
    ready.dma_map(BASE, PAGE, fd)
    ready.dma_map(0x2_0000_0000, PAGE, fd)
    ready.function.memory.write(BASE, b"alias")
    assert ready.function.memory.read(0x2_0000_0000, 5) == b"alias"
