#!/usr/bin/env python3
"""The PRP / SGL walker (src/vnvme/controller/dataptr.py) on guest memory the input fills.

Memory: 16 pages mapped at BASE, a hole of one page, 4 more pages, then nothing. The input
writes qwords and SGL descriptors into it, then asks for ``prp_segments`` or ``sgl_segments``
with PRP1 / PRP2 / length / page size from the input (addresses mostly inside or near the map).

Oracle: the walker returns segments or raises CommandFailed (a status), nothing else; the
segments add up to exactly the transfer length, each is mapped memory or (SGL, a transfer to
the host) a bit bucket; and it reads nothing outside the map (GuestMemory refuses such a
read, which the walker must turn into Data Transfer Error).
"""

from __future__ import annotations

import struct

from _engine import Input, instrumented, run

with instrumented():
    from vnvme.controller.dataptr import BIT_BUCKET, prp_segments, sgl_segments
    from vnvme.controller.errors import CommandFailed
    from vnvme.memory import GuestMemory
    from vnvme.spec.commands import SGL_DESCRIPTOR

PAGE = 4096
BASE = 0x10_0000
LOW_PAGES = 16
HIGH = BASE + (LOW_PAGES + 1) * PAGE
HIGH_PAGES = 4
END = HIGH + HIGH_PAGES * PAGE
LENGTHS = [0, 1, 512, PAGE - 1, PAGE, PAGE + 1, 2 * PAGE, 3 * PAGE + 512, 8 * PAGE, 513 * PAGE, 1 << 20]


def _address(inp: Input) -> int:
    kind = inp.below(8)
    if kind < 4:
        return BASE + inp.u16() % (END - BASE)  # anywhere in the map or its hole
    if kind == 4:
        return BASE + inp.below(LOW_PAGES + 1 + HIGH_PAGES) * PAGE
    if kind == 5:
        return END - inp.below(64)  # straddling the end
    if kind == 6:
        return inp.pick([0, BASE - 8, 1 << 63, (1 << 64) - PAGE, (1 << 64) - 8])
    return inp.u64()


def one_input(data: bytes) -> None:
    inp = Input(data)
    low, high = bytearray(LOW_PAGES * PAGE), bytearray(HIGH_PAGES * PAGE)
    memory = GuestMemory()
    memory.map(BASE, low)
    memory.map(HIGH, high)
    sgl = inp.flag()
    host_is_destination = inp.flag()
    page_size = inp.pick([PAGE, PAGE, PAGE, 8192, 65536])
    length = inp.pick(LENGTHS) if inp.flag() else inp.u32() % (1 << 21)
    prp1, prp2 = _address(inp), _address(inp)
    if sgl and inp.flag():  # SGL1 as a descriptor: length in PRP2[31:0], type in PRP2[63:56]
        prp2 = inp.u32() | (inp.pick([0x00, 0x10, 0x20, 0x30, 0x01, 0x40, 0xF0]) << 56)
    for _ in range(32):  # what the lists and segments in memory hold
        if not inp.more():
            break
        addr = _address(inp) & ~7
        if inp.flag():
            entry = SGL_DESCRIPTOR.pack(
                _address(inp), inp.pick([0, 16, 32, 512, PAGE]) if inp.flag() else inp.u32(), inp.u8()
            )
        else:
            entry = struct.pack("<Q", _address(inp))
        if memory.is_mapped(addr, len(entry)):
            memory.write(addr, entry)
    try:
        if sgl:
            segments = sgl_segments(memory, prp1, prp2, length, host_is_destination=host_is_destination)
        else:
            segments = prp_segments(memory, prp1, prp2, length, page_size)
    except CommandFailed:
        return
    assert sum(size for _, size in segments) == (length if length > 0 else 0), (segments, length)
    for addr, size in segments:
        assert size > 0, segments
        if addr == BIT_BUCKET:
            assert sgl and host_is_destination, segments
        else:
            assert memory.is_mapped(addr, size), (addr, size)


if __name__ == "__main__":
    run(one_input)
