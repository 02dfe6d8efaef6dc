"""Declared byte layouts of spec data structures (Identify, log pages, descriptors).

A :class:`Layout` is a table of fields, each at a byte offset with a ``struct`` format; it packs
from and unpacks to dicts, and refuses at import time a table whose fields overlap or overrun
the structure's size (the spirit of QEMU's ``_nvme_check_size``).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

FieldValue = int | bytes


@dataclass(frozen=True, slots=True)
class LayoutField:
    name: str
    offset: int
    fmt: str  # one struct code ("B", "H", "I", "Q") or "<n>s" for byte strings; "u128" for 16 bytes

    @property
    def size(self) -> int:
        if self.fmt == "u128":
            return 16
        return struct.calcsize("<" + self.fmt)


class Layout:
    """A fixed-size little-endian structure described field by field."""

    def __init__(self, name: str, size: int, fields: list[tuple[str, int, str]]) -> None:
        self.name = name
        self.size = size
        self.fields: dict[str, LayoutField] = {}
        covered = bytearray(size)
        for field_name, offset, fmt in fields:
            field = LayoutField(field_name, offset, fmt)
            if field_name in self.fields:
                raise AssertionError(f"{name}: duplicate field {field_name}")
            end = offset + field.size
            if end > size:
                raise AssertionError(f"{name}.{field_name} ends at {end}, past size {size}")
            if any(covered[offset:end]):
                raise AssertionError(f"{name}.{field_name} overlaps another field")
            covered[offset:end] = b"\x01" * field.size
            self.fields[field_name] = field

    def pack(self, values: Mapping[str, FieldValue]) -> bytearray:
        """Build the structure; fields not given are zero. Byte strings are padded with zeroes."""
        buf = bytearray(self.size)
        for key, value in values.items():
            field = self.fields[key]
            if field.fmt == "u128":
                assert isinstance(value, int)
                buf[field.offset : field.offset + 16] = min(value, (1 << 128) - 1).to_bytes(16, "little")
            elif field.fmt.endswith("s"):
                assert isinstance(value, bytes | bytearray)
                data = bytes(value)[: field.size]
                buf[field.offset : field.offset + len(data)] = data
            else:
                struct.pack_into("<" + field.fmt, buf, field.offset, value)
        return buf

    def unpack(self, data: bytes | bytearray | memoryview) -> dict[str, Any]:
        """Decode every declared field of ``data`` (at least ``size`` bytes)."""
        if len(data) < self.size:
            raise ValueError(f"{self.name}: need {self.size} bytes, got {len(data)}")
        out: dict[str, Any] = {}
        for field in self.fields.values():
            if field.fmt == "u128":
                out[field.name] = int.from_bytes(data[field.offset : field.offset + 16], "little")
            elif field.fmt.endswith("s"):
                out[field.name] = bytes(data[field.offset : field.offset + field.size])
            else:
                out[field.name] = struct.unpack_from("<" + field.fmt, data, field.offset)[0]
        return out


def ascii_field(text: str, length: int) -> bytes:
    """An ASCII string field, space padded as Identify requires for SN, MN and FR."""
    raw = text.encode("ascii", "replace")[:length]
    return raw + b" " * (length - len(raw))
