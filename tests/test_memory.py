"""GuestMemory: mapped and remote regions, bounds, spans across regions."""

from __future__ import annotations

import pytest

from vnvme.memory import GuestMemory, GuestMemoryError, RemoteAccess, RemoteDwordPage


class FakeRemote:
    """Memory the device reaches only through calls, counting them (as DMA messages)."""

    def __init__(self, base: int, size: int) -> None:
        self.base = base
        self.data = bytearray(size)
        self.reads = 0
        self.writes = 0

    def read(self, addr: int, dest: memoryview) -> None:
        self.reads += 1
        start = addr - self.base
        dest[:] = self.data[start : start + len(dest)]

    def write(self, addr: int, src: memoryview) -> None:
        self.writes += 1
        start = addr - self.base
        self.data[start : start + len(src)] = src

    @property
    def access(self) -> RemoteAccess:
        return RemoteAccess(self.read, self.write)


def test_remote_region_read_write_fill_and_spans() -> None:
    memory = GuestMemory()
    local = bytearray(4096)
    memory.map(0x1000, local)
    remote = FakeRemote(0x2000, 4096)
    memory.map_remote(0x2000, 4096, remote.access)
    assert memory.is_remote(0x2000) and not memory.is_remote(0x1000)
    # A write across the boundary lands half locally, half through one remote call.
    memory.write(0x1FFC, b"ABCDEFGH")
    assert local[-4:] == b"ABCD" and remote.data[:4] == b"EFGH" and remote.writes == 1
    assert memory.read(0x1FFC, 8) == b"ABCDEFGH" and remote.reads == 1
    memory.fill(0x2010, 16, 0x5A)
    assert remote.data[0x10:0x20] == b"\x5a" * 16
    memory.write_u32(0x2100, 0xDEADBEEF)
    assert memory.read_u32(0x2100) == 0xDEADBEEF and remote.data[0x100:0x104] == bytes.fromhex("efbeadde")
    assert memory.is_mapped(0x1F00, 0x200)
    with pytest.raises(GuestMemoryError, match="DMA messages"):
        memory.view(0x2000, 16)
    with pytest.raises(GuestMemoryError):
        memory.read(0x2FFC, 8)  # runs past the end of everything mapped


def test_window_is_the_memory_or_a_local_mirror() -> None:
    memory = GuestMemory()
    local = bytearray(8192)
    memory.map(0x10000, local)
    remote = FakeRemote(0x20000, 8192)
    memory.map_remote(0x20000, 8192, remote.access, writable=False)
    view, mirrored = memory.window(0x10000, 64, write=True)
    assert not mirrored
    view[0:2] = b"hi"
    assert local[0:2] == b"hi"
    view.release()
    mirror, mirrored = memory.window(0x20000, 64)
    assert mirrored and len(mirror) == 64 and remote.reads == 0  # nothing fetched yet
    with pytest.raises(GuestMemoryError, match="read-only"):
        memory.window(0x20000, 64, write=True)
    with pytest.raises(GuestMemoryError, match="read-only"):
        memory.write(0x20000, b"x")
    with pytest.raises(GuestMemoryError, match="one region"):
        memory.window(0x21F00, 0x200)


def test_remote_dword_page_is_little_endian_through_calls() -> None:
    memory = GuestMemory()
    remote = FakeRemote(0x3000, 4096)
    memory.map_remote(0x3000, 4096, remote.access)
    page = RemoteDwordPage(memory, 0x3000)
    page.store(3, 0x01020304)
    assert remote.data[12:16] == b"\x04\x03\x02\x01"
    assert page.load(3) == 0x01020304
    assert (remote.reads, remote.writes) == (1, 1)


def test_overlapping_regions_are_refused() -> None:
    memory = GuestMemory()
    memory.map(0x1000, bytearray(4096))
    remote = FakeRemote(0x1800, 4096)
    with pytest.raises(ValueError, match="overlaps"):
        memory.map_remote(0x1800, 4096, remote.access)
    with pytest.raises(ValueError, match="invalid region"):
        memory.map_remote(0x9000, 0, remote.access)
    generation = memory.generation
    memory.map_remote(0x2000, 4096, remote.access)
    assert memory.generation == generation + 1
    region = memory.unmap(0x2000, 4096)
    assert region.remote is not None and memory.generation == generation + 2
