"""Data pointers: PRP entries and lists (NVMe 1.3 §4.3) and SGLs (§4.4), resolved to segments.

A segment is ``(guest address, length)``; an address of :data:`BIT_BUCKET` means "discard"
(an SGL Bit Bucket descriptor, valid only where the controller writes to the host). Every
malformed pointer becomes a :class:`CommandFailed` with the spec's status.
"""

from __future__ import annotations

import struct
from collections import deque
from typing import Final

from vnvme.controller.errors import CommandFailed
from vnvme.memory import GuestMemory, GuestMemoryError
from vnvme.spec.commands import SGL_DESCRIPTOR, SglType
from vnvme.spec.status import DNR, Status

BIT_BUCKET: Final = -1
Segment = tuple[int, int]

_PRP_OFFSET: Final = Status.PRP_OFFSET_INVALID | DNR
_TRANSFER: Final = Status.DATA_TRANSFER_ERROR | DNR
# An SGL longer than this many descriptors is refused rather than walked.
MAX_SGL_DESCRIPTORS: Final = 4096


def prp_segments(memory: GuestMemory, prp1: int, prp2: int, length: int, page_size: int) -> list[Segment]:
    """Resolve PRP1 / PRP2 for a transfer of ``length`` bytes; every segment is mapped memory."""
    if length <= 0:
        return []  # no data transferred: PRP1 / PRP2 are not used (§4.3)
    mask = page_size - 1
    # §4.3: the offset of the first PRP entry is dword aligned.
    if prp1 & 0x3:
        raise CommandFailed(_PRP_OFFSET, f"PRP1 {prp1:#x} is not dword aligned")
    first = min(length, page_size - (prp1 & mask))
    segments: list[Segment] = [(prp1, first)]
    remaining = length - first
    if remaining == 0:
        return _check_mapped(memory, segments)
    if remaining <= page_size:
        # PRP2 is a data pointer: every entry after the first has offset 0.
        if prp2 & mask:
            raise CommandFailed(_PRP_OFFSET, f"PRP2 {prp2:#x} has a page offset")
        _append(segments, prp2, remaining)
        return _check_mapped(memory, segments)
    # PRP2 points at a PRP list; it is qword aligned and may start inside a page.
    if prp2 & 0x7:
        raise CommandFailed(_PRP_OFFSET, f"PRP list pointer {prp2:#x} is not qword aligned")
    list_addr = prp2
    while remaining > 0:
        slots = (page_size - (list_addr & mask)) >> 3
        needed = -(-remaining // page_size)
        chained = needed > slots
        count = slots if chained else needed
        try:
            raw = memory.read(list_addr, count * 8)
        except GuestMemoryError as exc:
            raise CommandFailed(_TRANSFER, f"PRP list at {list_addr:#x}: {exc}") from None
        entries = struct.unpack(f"<{count}Q", raw)
        data_entries = entries[:-1] if chained else entries
        for entry in data_entries:
            if entry & mask:
                raise CommandFailed(_PRP_OFFSET, f"PRP list entry {entry:#x} has a page offset")
            take = min(remaining, page_size)
            _append(segments, entry, take)
            remaining -= take
        if chained:
            # The last entry of a full list page points at the next list page.
            list_addr = entries[-1]
            if list_addr & mask:
                raise CommandFailed(_PRP_OFFSET, f"chained PRP list {list_addr:#x} not page aligned")
    return _check_mapped(memory, segments)


def _check_mapped(memory: GuestMemory, segments: list[Segment]) -> list[Segment]:
    """Data Transfer Error for a data pointer into memory the host never mapped, before any
    byte moves (a Write must not store a partial buffer; a Read must not half-complete)."""
    region_at = memory._region_at  # the per-command fast path: one region lookup, no views
    for addr, length in segments:
        if addr == BIT_BUCKET:
            continue
        region = region_at(addr)
        if region is not None and addr + length <= region.gpa + region.size:
            continue
        if not memory.is_mapped(addr, length):  # may still span adjacent regions
            raise CommandFailed(_TRANSFER, f"data buffer [{addr:#x}, +{length:#x}) is not mapped")
    return segments


def _append(segments: list[Segment], addr: int, length: int) -> None:
    """Append, merging with the previous segment when the two are contiguous."""
    last_addr, last_len = segments[-1]
    if last_addr != BIT_BUCKET and last_addr + last_len == addr:
        segments[-1] = (last_addr, last_len + length)
    else:
        segments.append((addr, length))


def _take_data(
    segments: list[Segment], addr: int, desc_len: int, ident: int, host_is_destination: bool
) -> int:
    """A Data Block or Bit Bucket descriptor (length already checked): its bytes appended to
    ``segments``; returns how many."""
    kind = ident >> 4
    if ident & 0xF:
        raise CommandFailed(Status.SGL_DESCRIPTOR_TYPE_INVALID | DNR, f"descriptor subtype {ident & 0xF}")
    if kind == SglType.BIT_BUCKET and not host_is_destination:
        raise CommandFailed(
            Status.SGL_DESCRIPTOR_TYPE_INVALID | DNR, "bit bucket in a host-to-controller SGL"
        )
    if desc_len == 0:
        return 0
    if kind == SglType.BIT_BUCKET:
        segments.append((BIT_BUCKET, desc_len))
    elif segments:
        _append(segments, addr, desc_len)
    else:
        segments.append((addr, desc_len))
    return desc_len


def _read_segment(memory: GuestMemory, addr: int, desc_len: int, seen: int) -> list[tuple[int, int, int]]:
    """A Segment or Last Segment descriptor: the descriptors of the segment it points at."""
    if desc_len == 0 or desc_len % 16 or addr & 0x3:
        raise CommandFailed(
            Status.INVALID_SGL_SEGMENT_DESCRIPTOR | DNR, f"segment length {desc_len} at {addr:#x}"
        )
    count = desc_len // 16
    if seen + count > MAX_SGL_DESCRIPTORS:
        raise CommandFailed(Status.INVALID_SGL_DESCRIPTOR_COUNT | DNR, "SGL too long")
    try:
        raw = memory.read(addr, desc_len)
    except GuestMemoryError as exc:
        raise CommandFailed(_TRANSFER, f"SGL segment at {addr:#x}: {exc}") from None
    return [SGL_DESCRIPTOR.unpack_from(raw, 16 * i) for i in range(count)]


def sgl_segments(
    memory: GuestMemory, prp1: int, prp2: int, length: int, *, host_is_destination: bool
) -> list[Segment]:
    """Resolve the SGL whose first descriptor (SGL1) sits in the SQE's DPTR field.

    The whole SGL is walked: Identify SGLS bit 18 is 0, so the descriptors must add up to
    exactly ``length`` bytes; more or fewer is Data SGL Length Invalid (§4.4, status 0Fh).
    """
    if length <= 0:
        return []
    segments: list[Segment] = []
    remaining = length
    seen = 0
    # SGL1 occupies DPTR: address = PRP1, length = PRP2[31:0], identifier = PRP2[63:56].
    pending: deque[tuple[int, int, int]] = deque([(prp1, prp2 & 0xFFFFFFFF, (prp2 >> 56) & 0xFF)])
    last_segment_seen = False
    while pending:
        addr, desc_len, ident = pending.popleft()
        seen += 1
        if seen > MAX_SGL_DESCRIPTORS:
            raise CommandFailed(Status.INVALID_SGL_DESCRIPTOR_COUNT | DNR, "SGL too long")
        kind = ident >> 4
        if kind in (SglType.DATA_BLOCK, SglType.BIT_BUCKET):
            if desc_len > remaining:
                raise CommandFailed(
                    Status.DATA_SGL_LENGTH_INVALID | DNR, f"SGL describes more than {length} bytes"
                )
            remaining -= _take_data(segments, addr, desc_len, ident, host_is_destination)
            continue
        if kind not in (SglType.SEGMENT, SglType.LAST_SEGMENT) or ident & 0xF:
            raise CommandFailed(Status.SGL_DESCRIPTOR_TYPE_INVALID | DNR, f"descriptor type {ident:#x}")
        if last_segment_seen or pending:
            where = "after last segment" if last_segment_seen else "not last in segment"
            raise CommandFailed(Status.INVALID_SGL_SEGMENT_DESCRIPTOR | DNR, f"segment descriptor {where}")
        pending.extend(_read_segment(memory, addr, desc_len, seen))
        last_segment_seen = kind == SglType.LAST_SEGMENT
    if remaining > 0:
        raise CommandFailed(
            Status.DATA_SGL_LENGTH_INVALID | DNR, f"SGL describes {length - remaining} of {length} bytes"
        )
    return _check_mapped(memory, segments)
