#!/usr/bin/env python3
"""The controller core, in process: register writes, doorbells, shadow slots, guest memory
contents and SQEs are all decided by the input.

Input: one mode byte (bit 0: bring the controller up through the driver first, with admin and
I/O queues; bit 1: shadow doorbells; bit 2: the driver's Asynchronous Event Requests; bit 3: the
controller polls), then up to 64 operations. The oracle is tests/test_robustness.py's: no
exception leaves the controller, no internal error (CSTS.CFS from a bug), every command the
driver submits on an untouched controller completes, and afterwards a reset and a fresh probe
give a working controller that reads back what it wrote. Guest memory is a bounds-checked
GuestMemory mapping only the driver's 4 MiB: an access anywhere else raises inside the
controller, which must turn it into a status, so a touch outside the map escapes as a failure.
"""

from __future__ import annotations

from _engine import Input, instrumented, run

with instrumented():
    from test_robustness import (
        _HOST_MEMORY,
        _UNMAPPED,
        _no_internal_errors,
        _recovers,
        _small_rig,
        _submit_all,
    )
    from vnvme.driver.driver import QueuePair
    from vnvme.spec import registers as regs
    from vnvme.spec.commands import SQE, AdminOpcode, Sqe
    from vnvme.spec.registers import Reg

MAX_OPS = 64
REGISTERS = [int(reg) for reg in Reg]
VALUES = [0, 1, 0x460001, 0x460000, 0x460001 | (1 << 14), 0xFFFF_FFFF, 15, 16, 1023, 1024]
# Admin commands after which the driver's own queues may legitimately stop completing.
UNSETTLING = {
    int(AdminOpcode.DELETE_IO_SQ),
    int(AdminOpcode.DELETE_IO_CQ),
    int(AdminOpcode.CREATE_IO_SQ),
    int(AdminOpcode.CREATE_IO_CQ),
    int(AdminOpcode.DOORBELL_BUFFER_CONFIG),
    int(AdminOpcode.ASYNC_EVENT_REQUEST),
}


def _offset(inp: Input) -> int:
    kind = inp.below(4)
    if kind == 0:
        return inp.pick(REGISTERS)
    if kind == 1:
        return inp.below(0x40) * 4
    if kind == 2:
        return regs.DOORBELL_BASE + 4 * inp.below(65)
    return inp.u16() % 0x3000


def _address(inp: Input, base: int) -> int:
    kind = inp.below(6)
    if kind == 0:
        return 0
    if kind == 1:
        return base + inp.u32() % _HOST_MEMORY  # anywhere mapped, any alignment
    if kind == 2:
        return base + (inp.u16() % (_HOST_MEMORY // 4096)) * 4096
    if kind == 3:
        return _UNMAPPED + inp.u32() % (1 << 20)
    if kind == 4:
        return base + _HOST_MEMORY - 8  # straddles the end of the mapping
    return inp.u64()


def _sqe(inp: Input, base: int) -> Sqe:
    fields = list(SQE.unpack(inp.bytes(64).ljust(64, b"\0")))
    if inp.flag():  # data pointers where the memory is, rather than anywhere
        fields[7] = _address(inp, base)
        fields[8] = _address(inp, base)
    if inp.flag():
        fields[3] = inp.pick([0, 1, 2, 3, 0xFFFF_FFFF])
    return Sqe(*fields)


def one_input(data: bytes) -> None:
    inp = Input(data)
    mode = inp.u8()
    r = _small_rig(
        probe=False,
        shadow_doorbells=bool(mode & 2),
        async_events=bool(mode & 4),
        controller_polls=bool(mode & 8),
    )
    try:
        base = r.host_memory.base
        probed = bool(mode & 1)
        if probed:
            r.driver.probe()
        # Untouched: only the driver has written registers, slots and rings so far, so every
        # command it submits must complete (the robustness test's oracle).
        untouched = True
        for _ in range(MAX_OPS):
            if not inp.more():
                break
            op = inp.below(8)
            if op == 0:
                size = inp.pick([1, 2, 4, 8])
                value = inp.pick(VALUES) if inp.flag() else inp.u64()
                r.transport.mmio_write(_offset(inp), size, value & ((1 << (8 * size)) - 1))
                untouched = False
            elif op == 1:
                size = inp.pick([1, 2, 4, 8])
                value = r.transport.mmio_read(_offset(inp), size)
                assert 0 <= value < 1 << (8 * size)
            elif op == 2:
                offset = inp.u32() % _HOST_MEMORY
                chunk = inp.bytes(inp.below(65))[: _HOST_MEMORY - offset]
                r.memory.write(base + offset, chunk)
                untouched = False
            elif op in (3, 4) and probed and r.driver.admin is not None and r.driver.io:
                qid = 0 if op == 3 else 1
                qp: QueuePair = r.driver.admin if qid == 0 else r.driver.io[0]
                sqe = _sqe(inp, base)
                if not qp.can_submit():
                    continue
                if untouched and sqe.opcode not in UNSETTLING:
                    _submit_all(r, qid, [sqe])
                else:
                    qp.submit(sqe)
                    if inp.flag():
                        qp.ring_sq()
                    untouched = untouched and sqe.opcode != AdminOpcode.ASYNC_EVENT_REQUEST
                if qid == 0 and sqe.opcode in UNSETTLING:
                    untouched = False
            elif op == 5 and r.driver.dbbuf_pages is not None:
                shadow, eventidx = r.driver.dbbuf_pages
                page = shadow if inp.flag() else eventidx
                slot = inp.below(1024)
                value = inp.u8() if inp.flag() else inp.u32()
                page.view[slot * 4 : slot * 4 + 4] = value.to_bytes(4, "little")
                untouched = False
            elif op == 6:
                r.transport.device_idle()
                if probed and r.driver.admin is not None and r.driver.io:
                    r.driver.admin.reap()
                    r.driver.io[0].reap()
            elif op == 7:
                r.transport._handle(r.controller.reset())
                untouched = False
        _no_internal_errors(r)
        _recovers(r)
        _no_internal_errors(r)
    finally:
        r.close()


if __name__ == "__main__":
    run(one_input)
