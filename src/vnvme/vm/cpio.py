"""A writer for the cpio "newc" format, the one Linux unpacks as an initramfs.

Linux accepts several archives one after the other, each compressed or not: the guest boots a
cached, compressed base archive followed by a small uncompressed one with the run's scenario.
"""

from __future__ import annotations

from typing import Protocol

_MAGIC = b"070701"
_DIR = 0o040000
_FILE = 0o100000
_SYMLINK = 0o120000


class Sink(Protocol):
    def write(self, data: bytes, /) -> object: ...


class CpioWriter:
    """Writes entries to ``out``; :meth:`close` writes the trailer (it does not close ``out``)."""

    def __init__(self, out: Sink) -> None:
        self._out = out
        self._ino = 1
        self._seen: set[str] = set()
        self._closed = False

    def _entry(self, name: str, mode: int, data: bytes) -> None:
        if self._closed:
            raise ValueError("archive already closed")
        name = name.strip("/")
        if not name or name in self._seen:
            raise ValueError(f"bad or repeated entry name {name!r}")
        self._seen.add(name)
        encoded = name.encode() + b"\0"
        fields = (self._ino, mode, 0, 0, 2 if mode & _DIR else 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0)
        self._ino += 1
        header = _MAGIC + b"".join(b"%08X" % value for value in fields)
        self._write_padded(header + encoded)
        self._write_padded(data)

    def _write_padded(self, chunk: bytes) -> None:
        self._out.write(chunk)
        if len(chunk) % 4:
            self._out.write(b"\0" * (4 - len(chunk) % 4))

    def directory(self, name: str, mode: int = 0o755) -> None:
        """A directory; its parents are created first if missing."""
        parts = name.strip("/").split("/")
        for depth in range(1, len(parts)):
            parent = "/".join(parts[:depth])
            if parent not in self._seen:
                self._entry(parent, _DIR | 0o755, b"")
        self._entry(name, _DIR | mode, b"")

    def _parents(self, name: str) -> None:
        parent = name.strip("/").rpartition("/")[0]
        if parent and parent not in self._seen:
            self.directory(parent)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._parents(name)
        self._entry(name, _FILE | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._parents(name)
        self._entry(name, _SYMLINK | 0o777, target.encode())

    def close(self) -> None:
        if not self._closed:
            self._entry("TRAILER!!!", 0, b"")
            self._closed = True
