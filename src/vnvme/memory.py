"""Guest memory: the regions a host has handed the controller, with bounds-checked access.

Every access the controller makes to host memory goes through :class:`GuestMemory`. An address
range that is not wholly inside mapped regions raises :class:`GuestMemoryError`, which command
handlers turn into Data Transfer Error: the controller can never touch memory it was not given.
Accesses may span adjacent regions (vm-memory's lesson: "find the region, then copy" breaks at
region boundaries).
"""

from __future__ import annotations

import bisect
import mmap
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from vnvme._mypyc import mypyc_attr

_U32: Final = struct.Struct("<I")

# What can back a region or be copied in: anything exporting a byte buffer.
Buffer = bytes | bytearray | memoryview | mmap.mmap


class GuestMemoryError(Exception):
    """An access to guest memory that is not (wholly) mapped, or a write to read-only memory."""

    def __init__(self, addr: int, length: int, reason: str = "not mapped") -> None:
        super().__init__(f"guest memory [{addr:#x}, +{length:#x}) {reason}")
        self.addr = addr
        self.length = length
        self.reason = reason


# Remote memory (vfio-user DMA_MAP without a file descriptor): reached only by messages.
RemoteReader = Callable[[int, memoryview], None]  # (guest address, destination)
RemoteWriter = Callable[[int, memoryview], None]  # (guest address, source)


@dataclass(frozen=True)
class RemoteAccess:
    read: RemoteReader
    write: RemoteWriter


class MemoryRegion:
    """One contiguous range of guest physical addresses backed by a host buffer, or reachable
    only through ``remote`` calls (then ``view`` is empty). A plain class, not a dataclass:
    mypyc compiles no dataclass with a ``memoryview`` field (scripts/build_mypyc.sh)."""

    __slots__ = ("gpa", "size", "view", "writable", "owner", "remote")

    def __init__(
        self,
        gpa: int,
        size: int,
        view: memoryview,
        writable: bool = True,
        owner: object = None,  # keeps an mmap alive while mapped
        remote: RemoteAccess | None = None,
    ) -> None:
        self.gpa = gpa
        self.size = size
        self.view = view
        self.writable = writable
        self.owner = owner
        self.remote = remote

    def __repr__(self) -> str:
        return f"MemoryRegion(gpa={self.gpa:#x}, size={self.size:#x}, writable={self.writable}, remote={self.remote is not None})"

    @property
    def end(self) -> int:
        return self.gpa + self.size


@mypyc_attr(allow_interpreted_subclasses=True)  # the vfio-user fuzz harness records every map
class GuestMemory:
    """The guest-physical address space as the device sees it."""

    def __init__(self) -> None:
        self._regions: list[MemoryRegion] = []
        self._starts: list[int] = []
        # Bumped on every map/unmap, so holders of cached views know to look them up again.
        self.generation = 0
        self._last_view: MemoryRegion | None = None  # the region view() found last

    # Section: mapping

    def map(self, gpa: int, buffer: Buffer, *, writable: bool = True, owner: object = None) -> MemoryRegion:
        """Expose ``buffer`` at guest address ``gpa``. Overlapping an existing region is an error."""
        view = memoryview(buffer).cast("B")
        return self._insert(MemoryRegion(gpa, len(view), view, writable, owner))

    def _insert(self, region: MemoryRegion) -> MemoryRegion:
        gpa, size = region.gpa, region.size
        if gpa < 0 or size <= 0 or gpa + size > 1 << 64:
            raise ValueError(f"invalid region [{gpa:#x}, +{size:#x})")
        index = bisect.bisect_left(self._starts, gpa)
        if index > 0 and self._regions[index - 1].end > gpa:
            raise ValueError(f"region at {gpa:#x} overlaps {self._regions[index - 1]!r}")
        if index < len(self._regions) and self._regions[index].gpa < gpa + size:
            raise ValueError(f"region at {gpa:#x} overlaps {self._regions[index]!r}")
        self._regions.insert(index, region)
        self._starts.insert(index, gpa)
        self._last_view = None
        self.generation += 1
        return region

    def map_remote(self, gpa: int, size: int, access: RemoteAccess, *, writable: bool = True) -> MemoryRegion:
        """Expose a range the controller can reach only through ``access`` (message round trips):
        :meth:`read` / :meth:`write` work there, :meth:`view` does not (see :meth:`window`)."""
        return self._insert(MemoryRegion(gpa, size, memoryview(b""), writable, None, access))

    def is_remote(self, addr: int) -> bool:
        region = self._region_at(addr)
        return region is not None and region.remote is not None

    def window(self, addr: int, length: int, *, write: bool = False) -> tuple[memoryview, bool]:
        """A view of ``length`` bytes for a queue ring: the memory itself, or for remote memory a
        local mirror (second value True) that the caller keeps in step with :meth:`read_into` /
        :meth:`write`."""
        region = self._region_at(addr)
        if region is not None and region.remote is not None:
            if addr < 0 or length < 0 or addr + length > region.end:
                raise GuestMemoryError(addr, length, "not mapped in one region")
            if write and not region.writable:
                raise GuestMemoryError(addr, length, "read-only")
            return memoryview(bytearray(length)), True
        return self.view(addr, length, write=write), False

    def unmap(self, gpa: int, size: int) -> MemoryRegion:
        """Remove the region that starts at ``gpa`` with exactly ``size`` bytes."""
        index = bisect.bisect_left(self._starts, gpa)
        if index == len(self._regions) or self._regions[index].gpa != gpa:
            raise KeyError(f"no region at {gpa:#x}")
        region = self._regions[index]
        if region.size != size:
            raise KeyError(f"region at {gpa:#x} has size {region.size:#x}, not {size:#x}")
        del self._regions[index]
        del self._starts[index]
        self._last_view = None
        self.generation += 1
        region.view.release()
        return region

    def unmap_all(self) -> list[MemoryRegion]:
        regions = list(self._regions)
        for region in regions:
            self.unmap(region.gpa, region.size)
        return regions

    def regions(self) -> tuple[MemoryRegion, ...]:
        return tuple(self._regions)

    # Section: access

    def _region_at(self, addr: int) -> MemoryRegion | None:
        index = bisect.bisect_right(self._starts, addr) - 1
        if index < 0:
            return None
        region = self._regions[index]
        return region if addr < region.gpa + region.size else None  # region.end, without a call

    def is_mapped(self, addr: int, length: int) -> bool:
        try:
            self._pieces(addr, length, write=False)
        except GuestMemoryError:
            return False
        return True

    def _pieces(self, addr: int, length: int, *, write: bool) -> list[tuple[MemoryRegion, int, int]]:
        """(region, offset in region, length) covering [addr, addr + length); raises if any byte
        is unmapped (or read-only, for a write)."""
        if addr < 0 or length < 0:
            raise GuestMemoryError(addr, length, "negative address or length")
        out: list[tuple[MemoryRegion, int, int]] = []
        pos, remaining = addr, length
        while remaining > 0:
            region = self._region_at(pos)
            if region is None:
                raise GuestMemoryError(addr, length)
            if write and not region.writable:
                raise GuestMemoryError(addr, length, "read-only")
            start = pos - region.gpa
            take = min(remaining, region.size - start)
            out.append((region, start, take))
            pos += take
            remaining -= take
        return out

    def _chunks(self, addr: int, length: int, *, write: bool) -> list[memoryview]:
        """The views covering [addr, addr + length), in order; raises if any byte is unmapped
        or lies in remote memory."""
        out: list[memoryview] = []
        for region, start, take in self._pieces(addr, length, write=write):
            if region.remote is not None:
                raise GuestMemoryError(addr, length, "reachable only through DMA messages")
            out.append(region.view[start : start + take])
        return out

    def view(self, addr: int, length: int, *, write: bool = False) -> memoryview:
        """A zero-copy view of a range that lies inside one region."""
        region = self._last_view
        if region is None or not region.gpa <= addr < region.gpa + region.size:
            # Not the region of the last view (I/O buffers mostly share one): look it up.
            region = self._region_at(addr)
            if region is None:
                raise GuestMemoryError(addr, length, "not mapped in one region")
            self._last_view = region
        if addr < 0 or length < 0 or addr + length > region.gpa + region.size:
            raise GuestMemoryError(addr, length, "not mapped in one region")
        if region.remote is not None:
            raise GuestMemoryError(addr, length, "reachable only through DMA messages")
        if write and not region.writable:
            raise GuestMemoryError(addr, length, "read-only")
        start = addr - region.gpa
        return region.view[start : start + length]

    def read(self, addr: int, length: int) -> bytes:
        buf = bytearray(length)
        self.read_into(addr, memoryview(buf))
        return bytes(buf)

    def read_into(self, addr: int, dest: memoryview) -> None:
        pos = 0
        for region, start, take in self._pieces(addr, len(dest), write=False):
            if region.remote is not None:
                region.remote.read(region.gpa + start, dest[pos : pos + take])
            else:
                dest[pos : pos + take] = region.view[start : start + take]
            pos += take

    def write(self, addr: int, data: Buffer) -> None:
        src = memoryview(data).cast("B")
        pos = 0
        for region, start, take in self._pieces(addr, len(src), write=True):
            if region.remote is not None:
                region.remote.write(region.gpa + start, src[pos : pos + take])
            else:
                region.view[start : start + take] = src[pos : pos + take]
            pos += take

    def fill(self, addr: int, length: int, byte: int = 0) -> None:
        for region, start, take in self._pieces(addr, length, write=True):
            if region.remote is not None:
                region.remote.write(region.gpa + start, memoryview(bytes([byte]) * take))
            else:
                region.view[start : start + take] = bytes([byte]) * take

    def read_u32(self, addr: int) -> int:
        """A little-endian dword, whatever the host's byte order."""
        value: int = _U32.unpack(self.read(addr, 4))[0]
        return value

    def write_u32(self, addr: int, value: int) -> None:
        self.write(addr, _U32.pack(value & 0xFFFFFFFF))


class RemoteDwordPage:
    """:class:`DwordPage` over remote memory: every load and store is a message round trip."""

    __slots__ = ("_memory", "_addr")

    def __init__(self, memory: GuestMemory, addr: int) -> None:
        self._memory = memory
        self._addr = addr

    def load(self, index: int) -> int:
        return self._memory.read_u32(self._addr + 4 * index)

    def store(self, index: int, value: int) -> None:
        self._memory.write_u32(self._addr + 4 * index, value)

    def release(self) -> None:
        pass


class DwordPage:
    """Little-endian dword access to one guest page (shadow doorbells, EventIdx).

    Uses a native ``memoryview.cast('I')`` on little-endian hosts (14 ns a load) and explicit
    little-endian packing elsewhere, so values in the page are little-endian either way.
    """

    __slots__ = ("load", "store", "_view", "_words")

    load: Callable[[int], int]
    store: Callable[[int, int], None]

    def __init__(self, view: memoryview) -> None:
        if len(view) % 4:
            raise ValueError("page length must be a multiple of 4")
        self._view = view
        if sys.byteorder == "little":
            words = view.cast("I")
            self._words: memoryview | None = words
            self.load = words.__getitem__
            self.store = words.__setitem__
        else:  # pragma: no cover - exercised only on big-endian hosts
            self._words = None

            def load(index: int) -> int:
                value: int = _U32.unpack_from(view, index * 4)[0]
                return value

            def store(index: int, value: int) -> None:
                _U32.pack_into(view, index * 4, value)

            self.load = load
            self.store = store

    def release(self) -> None:
        if self._words is not None:
            self._words.release()
        self._view.release()
