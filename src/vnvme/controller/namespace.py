"""Namespaces and their storage backends: ``null``, ``ram`` and ``file``.

- ``null``: reads return zeroes, writes are dropped (the reference experiment's device).
- ``ram``: an anonymous private mapping, allocated lazily by the kernel page by page.
- ``file``: ``preadv`` / ``pwritev`` on a regular file or block device. Flush calls ``fdatasync``;
  FUA writes, and every write while the Volatile Write Cache is disabled, use ``RWF_DSYNC`` so a
  completion means the data reached stable storage.

A user's file is never resized unless they ask for it (``grow``), is created only when it does
not exist and a size is given, and is opened read-only when the namespace is ``readonly``. Any
backend can be ``readonly``: the namespace is then write protected (Identify Namespace NSATTR
bit 0) and Write, Write Zeroes and deallocation fail with Namespace Is Write Protected.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import mmap
import os
import re
import stat
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from vnvme.controller.faults import FaultHook

_ZERO_CHUNK_SIZE: Final = 1 << 20
_ZEROES: Final = bytes(_ZERO_CHUNK_SIZE)
# Sliced per read: a memoryview's slice copies nothing (a slice of the bytes would copy it).
_ZERO_VIEW: Final = memoryview(_ZEROES)

_SIZE_SUFFIXES: Final = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """``4096``, ``64k``, ``16M``, ``1G``, ``2T`` (binary multiples) to bytes."""
    match = re.fullmatch(r"\s*(\d+)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", text)
    if not match:
        raise ValueError(f"not a size: {text!r}")
    return int(match.group(1)) * _SIZE_SUFFIXES[match.group(2).lower()]


#: The largest size a file (a C ``off_t``) or a mapping can have.
MAX_BACKEND_SIZE = (1 << 63) - 1


def _check_size(size: int) -> None:
    if size <= 0:
        raise ValueError("backend size must be positive")
    if size > MAX_BACKEND_SIZE:
        raise ValueError(f"backend size must be at most {MAX_BACKEND_SIZE} bytes (2^63 - 1)")


class Backend:
    """Storage behind a namespace. Offsets and lengths are in bytes and already range-checked."""

    kind = "abstract"
    # True when completed writes may sit in a volatile cache until flush (page cache for files).
    volatile_cache = False

    def __init__(self, size: int, *, read_only: bool = False) -> None:
        _check_size(size)
        self.size = size
        # Write protected: the command set refuses every command that would change the data.
        self.read_only = read_only

    def read_into(self, offset: int, dest: memoryview) -> None:
        raise NotImplementedError

    def write(self, offset: int, src: memoryview, *, sync: bool) -> None:
        raise NotImplementedError

    def write_zeroes(self, offset: int, length: int, *, sync: bool) -> None:
        pos = 0
        while pos < length:
            take = min(length - pos, _ZERO_CHUNK_SIZE)
            self.write(offset + pos, _ZERO_VIEW[:take], sync=sync)
            pos += take

    def deallocate(self, offset: int, length: int) -> None:
        """Deallocated blocks read back as zeroes (Identify Namespace DLFEAT = 001b)."""
        self.write_zeroes(offset, length, sync=False)

    def flush(self) -> None:
        """Make every completed write durable."""

    def close(self) -> None:
        """Release resources."""

    def describe(self) -> str:
        return f"{self.kind} {self.size} bytes" + (", read-only" if self.read_only else "")

    def discard_if_created(self) -> None:
        """Close after a failed start; a backend that created a file removes it again."""
        self.close()


class NullBackend(Backend):
    kind = "null"

    def read_into(self, offset: int, dest: memoryview) -> None:
        length = len(dest)
        if length <= _ZERO_CHUNK_SIZE:
            dest[:] = _ZERO_VIEW[:length]
            return
        for pos in range(0, length, _ZERO_CHUNK_SIZE):
            take = min(length - pos, _ZERO_CHUNK_SIZE)
            dest[pos : pos + take] = _ZERO_VIEW[:take]

    def write(self, offset: int, src: memoryview, *, sync: bool) -> None:
        pass

    def write_zeroes(self, offset: int, length: int, *, sync: bool) -> None:
        pass

    def deallocate(self, offset: int, length: int) -> None:
        pass


class RamBackend(Backend):
    kind = "ram"

    def __init__(self, size: int, *, read_only: bool = False) -> None:
        super().__init__(size, read_only=read_only)
        try:
            self._map = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        except (OSError, OverflowError) as exc:
            raise ValueError(
                f"ram namespace size={size} bytes cannot be mapped: {getattr(exc, 'strerror', None) or exc}"
            ) from None
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
    """A regular file or block device.

    ``size`` None serves the whole file. An existing file is never resized unless ``grow`` is
    given; a missing one is created only with a ``size``, and removed again by
    :meth:`discard_if_created` when the start it belonged to fails.
    """

    kind = "file"
    volatile_cache = True

    def __init__(
        self,
        path: str | os.PathLike[str],
        size: int | None = None,
        *,
        read_only: bool = False,
        grow: bool = False,
    ) -> None:
        self.path = os.fspath(path)
        self.created = False
        if read_only and grow:
            raise ValueError(f"{self.path}: 'readonly' and 'grow' contradict each other")
        if size is not None:
            _check_size(size)  # before a file is created
        try:
            fd = self._open(size, read_only)
        except OSError as exc:  # a parser of the user's spec answers with ValueError only
            raise ValueError(f"{self.path}: {exc.strerror or exc}") from None
        try:
            self.file_size = os.lseek(fd, 0, os.SEEK_END)
            if size is None:
                if self.file_size == 0:
                    raise ValueError(f"{self.path} is empty: give a size and 'grow' to extend it")
                size = self.file_size
            elif size > self.file_size:
                if not grow:
                    raise ValueError(
                        f"{self.path} is {self.file_size} bytes, size={size} would grow it: "
                        "add ',grow' to let vnvme extend the file, or give a size up to its own"
                    )
                os.ftruncate(fd, size)
                self.file_size = size
        except BaseException as exc:
            os.close(fd)
            self._unlink_created()
            if isinstance(exc, OSError):
                raise ValueError(f"{self.path}: {exc.strerror or exc}") from None
            raise
        super().__init__(size, read_only=read_only)
        self.fd = fd
        self._identity = os.fstat(fd)

    def _open(self, size: int | None, read_only: bool) -> int:
        try:
            st: os.stat_result | None = os.stat(self.path)
        except FileNotFoundError:
            st = None
        return self._create(size, read_only) if st is None else self._open_existing(st, read_only)

    def _create(self, size: int | None, read_only: bool) -> int:
        if read_only:
            raise ValueError(f"{self.path} does not exist: a read-only namespace needs an existing file")
        if size is None:
            raise ValueError(f"{self.path} does not exist: give a size to create it")
        # O_EXCL: what we create (and may remove after a failed start) is ours, never the user's.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        self.created = True
        try:
            os.ftruncate(fd, size)
        except BaseException:
            os.close(fd)
            self._unlink_created()
            raise
        return fd

    def _open_existing(self, st: os.stat_result, read_only: bool) -> int:
        if stat.S_ISDIR(st.st_mode):
            raise ValueError(f"{self.path} is a directory")
        if not read_only and not st.st_mode & 0o222:
            # Root passes every permission check, so the mode bits are the user's only word.
            raise ValueError(
                f"{self.path} is read-only (mode {stat.S_IMODE(st.st_mode):04o}): add ',readonly' "
                "to serve it write protected, or make it writable to serve it read-write"
            )
        try:
            return os.open(self.path, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
        except OSError as exc:
            if read_only or exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            raise ValueError(
                f"{self.path}: cannot open for writing ({exc.strerror}): add ',readonly' to serve "
                "it write protected"
            ) from None

    def _unlink_created(self) -> None:
        if self.created:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            self.created = False

    def discard_if_created(self) -> None:
        """Close, and remove the file if this backend created it (a start that failed)."""
        if not self.created:
            self.close()
            return
        try:
            same = os.path.samestat(os.stat(self.path), self._identity)
        except FileNotFoundError:
            same = False
        self.close()
        if same:  # the path still names the file we made
            self._unlink_created()

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
        text = f"file {self.path} {self.size} bytes"
        if self.size < self.file_size:
            text += f" (the first {self.size} of its {self.file_size} bytes)"
        if self.read_only:
            text += ", read-only"
        return text


def check_namespace(nsid: int, lba_size: int, size: int | None) -> None:
    """What a namespace's NSID, LBA size and size (None: not known yet) must be: checked by
    :class:`Namespace`, and before a backend's file is created or grown."""
    if lba_size not in (512, 4096):
        raise ValueError(f"LBA size must be 512 or 4096, not {lba_size}")
    if not 1 <= nsid < 0xFFFFFFFF:
        raise ValueError(f"invalid NSID {nsid}")
    if size is not None and 0 < size < lba_size:  # 0 and less: the backend's own rule
        raise ValueError("namespace smaller than one LBA")


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
        check_namespace(self.nsid, self.lba_size, self.backend.size)
        self.lba_shift = self.lba_size.bit_length() - 1
        self.nlba = self.backend.size >> self.lba_shift

    def assign_identifiers(self, serial: str) -> None:
        """Stable, unique identifiers derived from the controller serial number and NSID."""
        digest = hashlib.sha256(f"vnvme:{serial}:{self.nsid}".encode()).digest()
        self.nguid = digest[:16]
        self.eui64 = digest[16:24]
        self.uuid = uuid.uuid5(uuid.NAMESPACE_OID, f"vnvme.{serial}.{self.nsid}").bytes

    @property
    def size_bytes(self) -> int:
        return self.nlba << self.lba_shift

    @property
    def write_protected(self) -> bool:
        return self.backend.read_only


def make_backend(
    kind: str,
    *,
    size: int | None = None,
    path: str | None = None,
    read_only: bool = False,
    grow: bool = False,
) -> Backend:
    if grow and kind != "file":
        raise ValueError("'grow' applies to file namespaces only")
    if kind == "null":
        return NullBackend(size if size is not None else 1 << 30, read_only=read_only)
    if kind == "ram":
        return RamBackend(size if size is not None else 64 << 20, read_only=read_only)
    if kind == "file":
        if not path:
            raise ValueError("file backend needs a path")
        return FileBackend(path, size, read_only=read_only, grow=grow)
    raise ValueError(f"unknown backend {kind!r} (null, ram, file)")


# Options that stand alone (``readonly``) or take a yes/no value (``readonly=no``).
_FLAG_OPTIONS: Final = frozenset({"readonly", "grow"})
_VALUE_OPTIONS: Final = frozenset({"size", "lba"})
_YES: Final = frozenset({"", "1", "yes", "on", "true"})
_NO: Final = frozenset({"0", "no", "off", "false"})


def _flag(options: dict[str, str], name: str) -> bool:
    value = options.get(name)
    if value is None:
        return False
    if value.lower() in _YES:
        return True
    if value.lower() in _NO:
        return False
    raise ValueError(f"namespace option {name}={value!r}: expected yes or no")


def parse_namespace_spec(text: str, nsid: int) -> Namespace:
    """``null,size=16G`` / ``ram,size=1G,lba=4096`` / ``file=disk.img[,size=..][,readonly|,grow]``.

    ``readonly``: write protected (a file opened read-only); ``grow``: a ``size`` beyond an
    existing file's extends it (without it that is refused: the user's file keeps its size).
    """
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not parts:
        raise ValueError("empty namespace spec")
    kind, _, path = parts[0].partition("=")
    options: dict[str, str] = {}
    for part in parts[1:]:
        key, sep, value = part.partition("=")
        key = key.strip().lower()
        if not sep and key not in _FLAG_OPTIONS:
            raise ValueError(f"namespace option {part!r} needs a value")
        options[key] = value.strip()
    unknown = set(options) - _FLAG_OPTIONS - _VALUE_OPTIONS
    if unknown:
        raise ValueError(
            f"unknown namespace option(s): {', '.join(sorted(unknown))} "
            f"(known: {', '.join(sorted(_VALUE_OPTIONS | _FLAG_OPTIONS))})"
        )
    size = parse_size(options["size"]) if "size" in options else None
    lba = parse_size(options.get("lba", "512"))
    check_namespace(nsid, lba, size)  # before a file is created or grown
    backend = make_backend(
        kind.strip().lower(),
        size=size,
        path=path or None,
        read_only=_flag(options, "readonly"),
        grow=_flag(options, "grow"),
    )
    try:
        return Namespace(nsid, backend, lba)
    except BaseException:
        backend.discard_if_created()  # closes the descriptor; a file it made is removed
        raise
