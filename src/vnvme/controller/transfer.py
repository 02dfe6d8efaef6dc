"""Moving command data between guest memory and the controller, through PRPs or SGLs."""

from __future__ import annotations

from typing import TYPE_CHECKING

from vnvme.controller.dataptr import BIT_BUCKET, Segment, prp_segments, sgl_segments
from vnvme.controller.errors import CommandFailed
from vnvme.memory import GuestMemory
from vnvme.spec.commands import FLAGS_PSDT, Psdt
from vnvme.spec.status import DNR, Status

if TYPE_CHECKING:
    from vnvme.controller.context import IoContext

# SQE tuple indices (SQE Struct order).
OPC, FLAGS, CID, NSID, CDW2, CDW3, MPTR, PRP1, PRP2 = range(9)
CDW10, CDW11, CDW12, CDW13, CDW14, CDW15 = range(9, 15)


def data_segments(
    ctrl: IoContext, fields: tuple[int, ...], length: int, *, to_host: bool, sgl_allowed: bool
) -> list[Segment]:
    """Segments of the command's data buffer; ``to_host`` when the controller writes it."""
    psdt = FLAGS_PSDT.get(fields[FLAGS])
    if psdt == Psdt.PRP:
        return prp_segments(ctrl.memory, fields[PRP1], fields[PRP2], length, ctrl.page_size)
    if not (sgl_allowed and ctrl.config.sgls) or psdt not in (
        Psdt.SGL_MPTR_CONTIGUOUS,
        Psdt.SGL_MPTR_SGL,
    ):
        # §4.2: admin commands over PCIe use PRPs only; PSDT 11b is reserved.
        raise CommandFailed(Status.INVALID_FIELD | DNR, f"PSDT {psdt} not supported here")
    return sgl_segments(ctrl.memory, fields[PRP1], fields[PRP2], length, host_is_destination=to_host)


def write_to_host(memory: GuestMemory, segments: list[Segment], data: memoryview) -> None:
    pos = 0
    for addr, length in segments:
        if addr != BIT_BUCKET:
            memory.write(addr, data[pos : pos + length])
        pos += length


def read_from_host(memory: GuestMemory, segments: list[Segment], length: int) -> bytearray:
    buf = bytearray(length)
    view = memoryview(buf)
    pos = 0
    for addr, seg_len in segments:
        memory.read_into(addr, view[pos : pos + seg_len])
        pos += seg_len
    return buf


def send_to_host(ctrl: IoContext, fields: tuple[int, ...], data: bytes | bytearray, length: int) -> None:
    """Admin data out: ``length`` bytes (zero padded past ``data``) through PRP1 / PRP2."""
    if length == 0:
        return
    if len(data) < length:
        data = bytes(data) + bytes(length - len(data))
    segments = data_segments(ctrl, fields, length, to_host=True, sgl_allowed=False)
    write_to_host(ctrl.memory, segments, memoryview(data)[:length])


def receive_from_host(ctrl: IoContext, fields: tuple[int, ...], length: int) -> bytearray:
    segments = data_segments(ctrl, fields, length, to_host=False, sgl_allowed=False)
    return read_from_host(ctrl.memory, segments, length)
