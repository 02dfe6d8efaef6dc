"""Namespaces and their storage backends: ``null``, ``ram`` and ``file``.

- ``null``: reads return zeroes, writes are dropped (the reference experiment's device).
- ``ram``: an anonymous private mapping, allocated lazily by the kernel page by page.
- ``file``: ``preadv`` / ``pwritev`` on a regular file or block device. Flush calls ``fdatasync``;
  FUA writes, and every write while the Volatile Write Cache is disabled, use ``RWF_DSYNC`` so a
  completion means the data reached stable storage.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import re
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from vnvme.controller.faults import FaultHook

_ZERO_CHUNK_SIZE: Final = 1 << 20
_ZEROES: Final = bytes(_ZERO_CHUNK_SIZE)

_SIZE_SUFFIXES: Final = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """``4096``, ``64k``, ``16M``, ``1G``, ``2T`` (binary multiples) to bytes."""
    match = re.fullmatch(r"\s*(\d+)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", text)
    if not match:
        raise ValueError(f"not a size: {text!r}")
    return int(match.group(1)) * _SIZE_SUFFIXES[match.group(2).lower()]


class Backend:
    """Storage behind a namespace. Offsets and lengths are in bytes and already range-checked."""

    kind = "abstract"
    # True when completed writes may sit in a volatile cache until flush (page cache for files).
    volatile_cache = False

    def __init__(self, size: int) -> None:
        if size <= 0:
            raise ValueError("backend size must be positive")
        self.size = size

    def read_into(self, offset: int, dest: memoryview) -> None:
        raise NotImplementedError

    def write(self, offset: int, src: memoryview, *, sync: bool) -> None:
        raise NotImplementedError

    def write_zeroes(self, offset: int, length: int, *, sync: bool) -> None:
        pos = 0
        while pos < length:
            take = min(length - pos, _ZERO_CHUNK_SIZE)
            self.write(offset + pos, memoryview(_ZEROES)[:take], sync=sync)
            pos += take

    def deallocate(self, offset: int, length: int) -> None:
        """Deallocated blocks read back as zeroes (Identify Namespace DLFEAT = 001b)."""
        self.write_zeroes(offset, length, sync=False)

    def flush(self) -> None:
        """Make every completed write durable."""

    def close(self) -> None:
        """Release resources."""

    def describe(self) -> str:
        return f"{self.kind} {self.size} bytes"


class NullBackend(Backend):
    kind = "null"

    def read_into(self, offset: int, dest: memoryview) -> None:
        length = len(dest)
        if length <= _ZERO_CHUNK_SIZE:
            dest[:] = _ZEROES[:length]
            return
        for pos in range(0, length, _ZERO_CHUNK_SIZE):
            take = min(length - pos, _ZERO_CHUNK_SIZE)
            dest[pos : pos + take] = _ZEROES[:take]

    def write(self, offset: int, src: memoryview, *, sync: bool) -> None:
        pass

    def write_zeroes(self, offset: int, length: int, *, sync: bool) -> None:
        pass

    def deallocate(self, offset: int, length: int) -> None:
        pass


class RamBackend(Backend):
    kind = "ram"

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self._map = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._view = memoryview(self._map)

    def read_into(self, offset: int, dest: memoryview) -> None:
        dest[:] = self._view[offset : offset + len(dest)]

    def write(self, offset: int, src: memoryview, *, sync: bool) -> None:
        self._view[offset : offset + len(src)] = src

    def deallocate(self, offset: int, length: int) -> None:
        self.write_zeroes(offset, length, sync=False)

    def close(self) -> None:
        self._view.release()
        self._map.close()


class FileBackend(Backend):
    kind = "file"
    volatile_cache = True

    def __init__(self, path: str | os.PathLike[str], size: int | None = None) -> None:
        self.path = os.fspath(path)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            current = os.lseek(fd, 0, os.SEEK_END)
            if size is None:
                if current == 0:
                    raise ValueError(f"{self.path} is empty: give a size")
                size = current
            elif current < size:
                os.ftruncate(fd, size)
        except BaseException:
            os.close(fd)
            raise
        super().__init__(size)
        self.fd = fd

    def read_into(self, offset: int, dest: memoryview) -> None:
        pos = 0
        length = len(dest)
        while pos < length:
            got = os.preadv(self.fd, [dest[pos:]], offset + pos)
            if got == 0:  # past the end of a sparse or short file: zeroes
                dest[pos:] = (
                    _ZEROES[: length - pos] if length - pos <= _ZERO_CHUNK_SIZE else bytes(length - pos)
                )
                return
            pos += got

    def write(self, offset: int, src: memoryview, *, sync: bool) -> None:
        flags = os.RWF_DSYNC if sync else 0
        pos = 0
        length = len(src)
        while pos < length:
            pos += os.pwritev(self.fd, [src[pos:]], offset + pos, flags)

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def describe(self) -> str:
        return f"file {self.path} {self.size} bytes"


@dataclass
class Namespace:
    """One namespace: an NSID, an LBA format and a backend sized in whole LBAs.

    ``fault_hook``: called with every I/O command for this namespace before it runs; it may
    delay, fail or media-error it (:mod:`vnvme.controller.faults`).
    """

    nsid: int
    backend: Backend
    lba_size: int = 512
    fault_hook: FaultHook | None = None
    nlba: int = field(init=False)
    lba_shift: int = field(init=False)
    nguid: bytes = field(init=False)
    eui64: bytes = field(init=False)
    uuid: bytes = field(init=False)

    def __post_init__(self) -> None:
        if self.lba_size not in (512, 4096):
            raise ValueError(f"LBA size must be 512 or 4096, not {self.lba_size}")
        if not 1 <= self.nsid < 0xFFFFFFFF:
            raise ValueError(f"invalid NSID {self.nsid}")
        self.lba_shift = self.lba_size.bit_length() - 1
        self.nlba = self.backend.size >> self.lba_shift
        if self.nlba == 0:
            raise ValueError("namespace smaller than one LBA")

    def assign_identifiers(self, serial: str) -> None:
        """Stable, unique identifiers derived from the controller serial number and NSID."""
        digest = hashlib.sha256(f"vnvme:{serial}:{self.nsid}".encode()).digest()
        self.nguid = digest[:16]
        self.eui64 = digest[16:24]
        self.uuid = uuid.uuid5(uuid.NAMESPACE_OID, f"vnvme.{serial}.{self.nsid}").bytes

    @property
    def size_bytes(self) -> int:
        return self.nlba << self.lba_shift


def make_backend(kind: str, *, size: int | None = None, path: str | None = None) -> Backend:
    if kind == "null":
        return NullBackend(size if size is not None else 1 << 30)
    if kind == "ram":
        return RamBackend(size if size is not None else 64 << 20)
    if kind == "file":
        if not path:
            raise ValueError("file backend needs a path")
        return FileBackend(path, size)
    raise ValueError(f"unknown backend {kind!r} (null, ram, file)")


def parse_namespace_spec(text: str, nsid: int) -> Namespace:
    """``null,size=16G`` / ``ram,size=1G,lba=4096`` / ``file=disk.img[,size=..]`` to a Namespace."""
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not parts:
        raise ValueError("empty namespace spec")
    kind, _, path = parts[0].partition("=")
    options: dict[str, str] = {}
    for part in parts[1:]:
        key, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"namespace option {part!r} needs a value")
        options[key.strip().lower()] = value.strip()
    unknown = set(options) - {"size", "lba"}
    if unknown:
        raise ValueError(f"unknown namespace option(s): {', '.join(sorted(unknown))}")
    size = parse_size(options["size"]) if "size" in options else None
    lba = parse_size(options.get("lba", "512"))
    if lba not in (512, 4096):
        raise ValueError(f"LBA size must be 512 or 4096, not {lba}")  # before a file is touched
    backend = make_backend(kind.strip().lower(), size=size, path=path or None)
    try:
        return Namespace(nsid, backend, lba)
    except BaseException:
        backend.close()  # a file backend holds an open descriptor
        raise
