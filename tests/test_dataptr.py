"""Data pointers: PRP entries and lists (NVMe 1.4 §4.3), SGLs (§4.4) and PSDT (§4.2).

Unit tests call dataptr.py / transfer.py on a GuestMemory directly; the end-to-end ones put raw
SQEs on an I/O queue pair and check the completion status and what reached the namespace.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import hypothesis.strategies as st
import pytest
from hypothesis import event, given, settings

from host import Rig, make_rig
from vnvme.controller.config import ControllerConfig
from vnvme.controller.controller import Controller
from vnvme.controller.dataptr import (
    BIT_BUCKET,
    MAX_SGL_DESCRIPTORS,
    Segment,
    prp_segments,
    sgl_segments,
)
from vnvme.controller.errors import CommandFailed
from vnvme.controller.namespace import Namespace, RamBackend
from vnvme.controller.transfer import (
    data_segments,
    read_from_host,
    receive_from_host,
    send_to_host,
    write_to_host,
)
from vnvme.driver.transport import DmaBuffer
from vnvme.memory import GuestMemory
from vnvme.spec.commands import SGL_DESCRIPTOR, AdminOpcode, Cns, NvmOpcode, Psdt, SglType, Sqe
from vnvme.spec.status import DNR, Status, describe

PAGE = 4096
BASE = 0x10_0000  # first mapped guest address in the unit tests
HOLE = 0x80_0000  # never mapped

PRP_OFFSET = Status.PRP_OFFSET_INVALID | DNR
TRANSFER = Status.DATA_TRANSFER_ERROR | DNR
SGL_TYPE = Status.SGL_DESCRIPTOR_TYPE_INVALID | DNR
SGL_SEGMENT = Status.INVALID_SGL_SEGMENT_DESCRIPTOR | DNR
SGL_COUNT = Status.INVALID_SGL_DESCRIPTOR_COUNT | DNR
SGL_LENGTH = Status.DATA_SGL_LENGTH_INVALID | DNR


class Mem:
    """A GuestMemory with ``pages`` pages mapped at BASE and helpers to lay out lists."""

    def __init__(self, pages: int = 64) -> None:
        self.buf = bytearray(pages * PAGE)
        self.memory = GuestMemory()
        self.memory.map(BASE, self.buf)

    @staticmethod
    def page(index: int, offset: int = 0) -> int:
        return BASE + index * PAGE + offset

    def put_qwords(self, addr: int, values: Sequence[int]) -> None:
        struct.pack_into(f"<{len(values)}Q", self.buf, addr - BASE, *values)

    def put_descriptors(self, addr: int, descriptors: Sequence[bytes]) -> None:
        data = b"".join(descriptors)
        self.buf[addr - BASE : addr - BASE + len(data)] = data


@pytest.fixture
def mem() -> Mem:
    return Mem()


def _status(exc: pytest.ExceptionInfo[CommandFailed]) -> int:
    return exc.value.status


def desc(addr: int, length: int, kind: int, subtype: int = 0) -> bytes:
    """One 16-byte SGL descriptor."""
    return SGL_DESCRIPTOR.pack(addr, length, (kind << 4) | subtype)


def sgl1(addr: int, length: int, kind: int, subtype: int = 0) -> tuple[int, int]:
    """PRP1 / PRP2 of an SQE whose DPTR holds this descriptor as SGL1."""
    return addr, length | (((kind << 4) | subtype) << 56)


# Section: PRP


def test_prp1_only_covers_a_transfer_inside_its_page(mem: Mem) -> None:
    assert prp_segments(mem.memory, mem.page(0), 0xDEAD_BEE0, PAGE, PAGE) == [(mem.page(0), PAGE)]
    # With an in-page offset the transfer still fits; PRP2 is not looked at.
    assert prp_segments(mem.memory, mem.page(3, 0x204), 1, PAGE - 0x204, PAGE) == [
        (mem.page(3, 0x204), 0xDFC)
    ]
    assert prp_segments(mem.memory, mem.page(3, 0xFFC), 0, 4, PAGE) == [(mem.page(3, 0xFFC), 4)]


def test_prp1_and_prp2_describe_two_pages(mem: Mem) -> None:
    # Disjoint pages stay two segments: the first runs to the end of PRP1's page.
    assert prp_segments(mem.memory, mem.page(0, 0x800), mem.page(9), PAGE, PAGE) == [
        (mem.page(0, 0x800), 0x800),
        (mem.page(9), 0x800),
    ]
    # Adjacent pages merge into one segment.
    assert prp_segments(mem.memory, mem.page(4), mem.page(5), 2 * PAGE, PAGE) == [(mem.page(4), 2 * PAGE)]


def test_first_entry_offset_must_be_dword_aligned(mem: Mem) -> None:
    for offset in (1, 2, 3, 0x201):
        with pytest.raises(CommandFailed) as exc:
            prp_segments(mem.memory, mem.page(0, offset), 0, 512, PAGE)
        assert _status(exc) == PRP_OFFSET
    assert prp_segments(mem.memory, mem.page(0, 4), 0, 512, PAGE) == [(mem.page(0, 4), 512)]


def test_prp2_data_pointer_with_a_page_offset_is_invalid(mem: Mem) -> None:
    """§4.3: every PRP entry after the first has a memory page offset of 0h."""
    for prp2 in (mem.page(5, 8), mem.page(5, 0x200), mem.page(5, 4)):
        with pytest.raises(CommandFailed) as exc:
            prp_segments(mem.memory, mem.page(0), prp2, 2 * PAGE, PAGE)
        assert _status(exc) == PRP_OFFSET


def test_prp2_as_a_list_pointer(mem: Mem) -> None:
    lst = mem.page(10)
    mem.put_qwords(lst, [mem.page(20), mem.page(21), mem.page(30), mem.page(40)])
    segments = prp_segments(mem.memory, mem.page(2, 0x100), lst, 4 * PAGE, PAGE)
    assert segments == [
        (mem.page(2, 0x100), 0xF00),
        (mem.page(20), 2 * PAGE),
        (mem.page(30), PAGE),
        (mem.page(40), 0x100),
    ]
    assert sum(length for _, length in segments) == 4 * PAGE


def test_prp_list_entry_with_a_page_offset_is_invalid(mem: Mem) -> None:
    lst = mem.page(10)
    mem.put_qwords(lst, [mem.page(20), mem.page(21, 0x10)])
    with pytest.raises(CommandFailed) as exc:
        prp_segments(mem.memory, mem.page(2), lst, 3 * PAGE, PAGE)
    assert _status(exc) == PRP_OFFSET


def test_prp_list_pointer_may_have_an_offset_but_is_qword_aligned(mem: Mem) -> None:
    """§4.3: a PRP List pointer in the command is qword aligned and may start inside a page."""
    lst = mem.page(10, 0x238)
    mem.put_qwords(lst, [mem.page(20), mem.page(22)])
    assert prp_segments(mem.memory, mem.page(2), lst, 3 * PAGE, PAGE) == [
        (mem.page(2), PAGE),
        (mem.page(20), PAGE),
        (mem.page(22), PAGE),
    ]
    with pytest.raises(CommandFailed) as exc:
        prp_segments(mem.memory, mem.page(2), lst + 4, 3 * PAGE, PAGE)
    assert _status(exc) == PRP_OFFSET


def test_list_starting_near_a_page_end_chains_on_that_pages_last_slot(mem: Mem) -> None:
    """A list at offset 0xFF0 has two slots in its page: one data entry, then the chain."""
    lst = mem.page(10, PAGE - 16)
    mem.put_qwords(lst, [mem.page(20), mem.page(11)])
    mem.put_qwords(mem.page(11), [mem.page(21), mem.page(40)])
    segments = prp_segments(mem.memory, mem.page(2), lst, 4 * PAGE, PAGE)
    assert segments == [(mem.page(2), PAGE), (mem.page(20), 2 * PAGE), (mem.page(40), PAGE)]


@pytest.fixture
def big() -> Mem:
    return Mem(pages=1100)


def test_prp_list_of_exactly_one_page_does_not_chain(big: Mem) -> None:
    """512 entries fill the list page: the last slot is data, not a pointer."""
    lst = big.page(1000)
    big.put_qwords(lst, [big.page(i) for i in range(1, 513)])
    big.put_qwords(big.page(1001), [HOLE])  # would be followed if slot 511 were taken as a chain
    assert prp_segments(big.memory, big.page(0), lst, 513 * PAGE, PAGE) == [(big.page(0), 513 * PAGE)]


def test_prp_list_chains_through_its_last_entry(big: Mem) -> None:
    """513 list entries: slots 0-510 are data, slot 511 points at the next list page."""
    first, second = big.page(1000), big.page(1001)
    big.put_qwords(first, [big.page(i) for i in range(1, 512)] + [second])
    big.put_qwords(second, [big.page(512), big.page(600)])
    segments = prp_segments(big.memory, big.page(0), first, 514 * PAGE, PAGE)
    assert segments == [(big.page(0), 513 * PAGE), (big.page(600), PAGE)]


def test_chained_list_pointer_must_be_page_aligned(big: Mem) -> None:
    first = big.page(1000)
    big.put_qwords(first, [big.page(i) for i in range(1, 512)] + [big.page(1001, 8)])
    with pytest.raises(CommandFailed) as exc:
        prp_segments(big.memory, big.page(0), first, 514 * PAGE, PAGE)
    assert _status(exc) == PRP_OFFSET


def test_chained_list_outside_memory_is_a_data_transfer_error(big: Mem) -> None:
    first = big.page(1000)
    big.put_qwords(first, [big.page(i) for i in range(1, 512)] + [HOLE])
    with pytest.raises(CommandFailed) as exc:
        prp_segments(big.memory, big.page(0), first, 514 * PAGE, PAGE)
    assert _status(exc) == TRANSFER


@pytest.mark.parametrize(
    ("prp1", "prp2", "length"),
    [
        (HOLE, 0, 512),  # PRP1 unmapped
        (BASE + 63 * PAGE + 0x800, 0, 0x801),  # runs off the end of the region
        (BASE + 63 * PAGE + 0x800, HOLE, PAGE),  # PRP2 data page unmapped
        (BASE - PAGE, BASE, 2 * PAGE),  # PRP1 just below the region
        (BASE + 64 * PAGE, 0, 8),  # just past the region
    ],
)
def test_data_pointer_outside_mapped_memory_is_a_data_transfer_error(
    mem: Mem, prp1: int, prp2: int, length: int
) -> None:
    with pytest.raises(CommandFailed) as exc:
        prp_segments(mem.memory, prp1, prp2, length, PAGE)
    assert _status(exc) == TRANSFER


def test_prp_list_entry_outside_memory_is_a_data_transfer_error(mem: Mem) -> None:
    lst = mem.page(10)
    mem.put_qwords(lst, [mem.page(20), HOLE])
    with pytest.raises(CommandFailed) as exc:
        prp_segments(mem.memory, mem.page(2), lst, 3 * PAGE, PAGE)
    assert _status(exc) == TRANSFER


def test_prp_list_itself_outside_memory_is_a_data_transfer_error(mem: Mem) -> None:
    for lst in (HOLE, BASE + 64 * PAGE - 8):  # unmapped; straddling the region's end
        with pytest.raises(CommandFailed) as exc:
            prp_segments(mem.memory, mem.page(2), lst, 4 * PAGE, PAGE)
        assert _status(exc) == TRANSFER


def test_zero_length_transfers_use_no_pointer(mem: Mem) -> None:
    assert prp_segments(mem.memory, HOLE + 2, HOLE + 3, 0, PAGE) == []
    assert sgl_segments(mem.memory, HOLE, 0xFF << 56, 0, host_is_destination=True) == []


def test_larger_memory_page_size_from_cc_mps(mem: Mem) -> None:
    """CC.MPS = 1: 8 KiB pages; offsets and list slots follow the configured size."""
    page = 2 * PAGE
    assert prp_segments(mem.memory, mem.page(2, 0x1000), mem.page(8), page, page) == [
        (mem.page(2, 0x1000), 0x1000),
        (mem.page(8), 0x1000),
    ]
    with pytest.raises(CommandFailed) as exc:
        prp_segments(mem.memory, mem.page(2), mem.page(9), 2 * page, page)  # 4 KiB aligned only
    assert _status(exc) == PRP_OFFSET


# Section: SGL


def test_sgl1_data_block_has_no_alignment_requirement(mem: Mem) -> None:
    prp1, prp2 = sgl1(mem.page(1, 3), 1000, SglType.DATA_BLOCK)
    assert sgl_segments(mem.memory, prp1, prp2, 1000, host_is_destination=False) == [(mem.page(1, 3), 1000)]


def test_sgl_segment_and_last_segment_with_a_bit_bucket(mem: Mem) -> None:
    seg, last = mem.page(10), mem.page(11, 0x40)
    mem.put_descriptors(
        seg,
        [
            desc(mem.page(20), 512, SglType.DATA_BLOCK),
            desc(mem.page(20, 512), 512, SglType.DATA_BLOCK),  # contiguous: merges
            desc(last, 3 * 16, SglType.LAST_SEGMENT),
        ],
    )
    mem.put_descriptors(
        last,
        [
            desc(0, 1024, SglType.BIT_BUCKET),
            desc(mem.page(30, 7), 0, SglType.DATA_BLOCK),  # empty: skipped
            desc(mem.page(30, 7), 2048, SglType.DATA_BLOCK),
        ],
    )
    prp1, prp2 = sgl1(seg, 3 * 16, SglType.SEGMENT)
    assert sgl_segments(mem.memory, prp1, prp2, 4096, host_is_destination=True) == [
        (mem.page(20), 1024),
        (BIT_BUCKET, 1024),
        (mem.page(30, 7), 2048),
    ]


def test_sgl1_last_segment(mem: Mem) -> None:
    last = mem.page(10)
    mem.put_descriptors(last, [desc(mem.page(2), 100, SglType.DATA_BLOCK), desc(mem.page(4), 28, 0)])
    prp1, prp2 = sgl1(last, 32, SglType.LAST_SEGMENT)
    assert sgl_segments(mem.memory, prp1, prp2, 128, host_is_destination=False) == [
        (mem.page(2), 100),
        (mem.page(4), 28),
    ]


def test_bit_bucket_is_only_for_data_the_controller_writes(mem: Mem) -> None:
    prp1, prp2 = sgl1(0, 512, SglType.BIT_BUCKET)
    assert sgl_segments(mem.memory, prp1, prp2, 512, host_is_destination=True) == [(BIT_BUCKET, 512)]
    with pytest.raises(CommandFailed) as exc:
        sgl_segments(mem.memory, prp1, prp2, 512, host_is_destination=False)
    assert _status(exc) == SGL_TYPE


@pytest.mark.parametrize(
    ("kind", "subtype"),
    [
        (SglType.DATA_BLOCK, 1),  # Offset subtype: fabrics only
        (SglType.DATA_BLOCK, 0xA),
        (SglType.BIT_BUCKET, 1),
        (SglType.SEGMENT, 1),
        (SglType.LAST_SEGMENT, 2),
        (0x4, 0),  # Keyed SGL Data Block: not on PCIe
        (0x5, 0),  # Transport SGL Data Block
        (0x9, 0),  # reserved
        (0xF, 0),  # vendor specific
    ],
)
def test_invalid_descriptor_types_and_subtypes(mem: Mem, kind: int, subtype: int) -> None:
    prp1, prp2 = sgl1(mem.page(1), 512, kind, subtype)
    with pytest.raises(CommandFailed) as exc:
        sgl_segments(mem.memory, prp1, prp2, 512, host_is_destination=True)
    assert _status(exc) == SGL_TYPE
    # The same descriptor inside a segment.
    mem.put_descriptors(mem.page(10), [desc(mem.page(1), 512, kind, subtype)])
    prp1, prp2 = sgl1(mem.page(10), 16, SglType.LAST_SEGMENT)
    with pytest.raises(CommandFailed) as exc:
        sgl_segments(mem.memory, prp1, prp2, 512, host_is_destination=True)
    assert _status(exc) == SGL_TYPE


def test_sgl_shorter_than_the_transfer(mem: Mem) -> None:
    prp1, prp2 = sgl1(mem.page(1), 511, SglType.DATA_BLOCK)
    with pytest.raises(CommandFailed) as exc:
        sgl_segments(mem.memory, prp1, prp2, 512, host_is_destination=False)
    assert _status(exc) == SGL_LENGTH
    mem.put_descriptors(mem.page(10), [desc(mem.page(1), 256, 0), desc(mem.page(2), 255, 0)])
    prp1, prp2 = sgl1(mem.page(10), 32, SglType.LAST_SEGMENT)
    with pytest.raises(CommandFailed) as exc:
        sgl_segments(mem.memory, prp1, prp2, 512, host_is_destination=False)
    assert _status(exc) == SGL_LENGTH


def test_sgl_longer_than_the_transfer(mem: Mem) -> None:
    """Identify SGLS bit 18 is 0: the SGL length must equal the transfer length (status 0Fh)."""
    prp1, prp2 = sgl1(mem.page(1), 513, SglType.DATA_BLOCK)
    with pytest.raises(CommandFailed) as exc:
        sgl_segments(mem.memory, prp1, prp2, 512, host_is_destination=False)
    assert _status(exc) == SGL_LENGTH
    # Exact data, then one more descriptor with bytes in it.
    mem.put_descriptors(mem.page(10), [desc(mem.page(1), 512, 0), desc(mem.page(2), 8, 0)])
    prp1, prp2 = sgl1(mem.page(10), 32, SglType.LAST_SEGMENT)
    with pytest.raises(CommandFailed) as exc:
        sgl_segments(mem.memory, prp1, prp2, 512, host_is_destination=False)
    assert _status(exc) == SGL_LENGTH
    # Trailing empty descriptors are fine.
    mem.put_descriptors(mem.page(10), [desc(mem.page(1), 512, 0), desc(HOLE, 0, 0)])
    assert sgl_segments(mem.memory, prp1, prp2, 512, host_is_destination=False) == [(mem.page(1), 512)]


def test_segment_descriptor_rules(mem: Mem) -> None:
    seg, nxt = mem.page(10), mem.page(11)
    # A Segment descriptor that is not the last descriptor of its segment.
    mem.put_descriptors(seg, [desc(nxt, 16, SglType.SEGMENT), desc(mem.page(1), 512, 0)])
    mem.put_descriptors(nxt, [desc(mem.page(2), 512, 0)])
    prp1, prp2 = sgl1(seg, 32, SglType.SEGMENT)
    with pytest.raises(CommandFailed) as exc:
        sgl_segments(mem.memory, prp1, prp2, 1024, host_is_destination=False)
    assert _status(exc) == SGL_SEGMENT
    # A Segment descriptor inside the last segment.
    mem.put_descriptors(seg, [desc(mem.page(1), 256, 0), desc(nxt, 16, SglType.SEGMENT)])
    prp1, prp2 = sgl1(seg, 32, SglType.LAST_SEGMENT)
    with pytest.raises(CommandFailed) as exc:
        sgl_segments(mem.memory, prp1, prp2, 512, host_is_destination=False)
    assert _status(exc) == SGL_SEGMENT
    # Segment lengths: zero, or not a whole number of descriptors.
    for length in (0, 8, 24):
        prp1, prp2 = sgl1(seg, length, SglType.SEGMENT)
        with pytest.raises(CommandFailed) as exc:
            sgl_segments(mem.memory, prp1, prp2, 512, host_is_destination=False)
        assert _status(exc) == SGL_SEGMENT


def test_sgl_segment_outside_memory_is_a_data_transfer_error(mem: Mem) -> None:
    prp1, prp2 = sgl1(HOLE, 32, SglType.LAST_SEGMENT)
    with pytest.raises(CommandFailed) as exc:
        sgl_segments(mem.memory, prp1, prp2, 512, host_is_destination=False)
    assert _status(exc) == TRANSFER


def test_sgl_data_block_outside_memory_is_a_data_transfer_error(mem: Mem) -> None:
    for addr in (HOLE, BASE + 64 * PAGE - 100, 2**64 - 16):
        prp1, prp2 = sgl1(addr, 512, SglType.DATA_BLOCK)
        with pytest.raises(CommandFailed) as exc:
            sgl_segments(mem.memory, prp1, prp2, 512, host_is_destination=True)
        assert _status(exc) == TRANSFER


def test_sgl_that_loops_on_itself_is_cut_off(mem: Mem) -> None:
    seg = mem.page(10)
    mem.put_descriptors(seg, [desc(mem.page(1), 0, 0), desc(seg, 32, SglType.SEGMENT)])
    prp1, prp2 = sgl1(seg, 32, SglType.SEGMENT)
    with pytest.raises(CommandFailed) as exc:
        sgl_segments(mem.memory, prp1, prp2, 512, host_is_destination=False)
    assert _status(exc) == SGL_COUNT
    # One segment with more descriptors than the limit is refused before it is read.
    prp1, prp2 = sgl1(seg, 16 * MAX_SGL_DESCRIPTORS, SglType.LAST_SEGMENT)
    with pytest.raises(CommandFailed) as exc:
        sgl_segments(mem.memory, prp1, prp2, 512, host_is_destination=False)
    assert _status(exc) == SGL_COUNT


# Section: transfer.py


@pytest.fixture
def ctrl() -> Iterator[Controller]:
    memory = GuestMemory()
    memory.map(BASE, bytearray(64 * PAGE))
    controller = Controller(memory)
    yield controller
    controller.close()


def _fields(psdt: int, prp1: int, prp2: int) -> tuple[int, ...]:
    return tuple(Sqe(NvmOpcode.READ, psdt << 6, 7, 1, 0, 0, 0, prp1, prp2))


def test_psdt_selects_prp_or_sgl(ctrl: Controller) -> None:
    assert data_segments(ctrl, _fields(Psdt.PRP, BASE, 0), 512, to_host=True, sgl_allowed=True) == [
        (BASE, 512)
    ]
    prp1, prp2 = sgl1(BASE + 3, 512, SglType.DATA_BLOCK)
    for psdt in (Psdt.SGL_MPTR_CONTIGUOUS, Psdt.SGL_MPTR_SGL):
        assert data_segments(ctrl, _fields(psdt, prp1, prp2), 512, to_host=True, sgl_allowed=True) == [
            (BASE + 3, 512)
        ]


def test_psdt_reserved_value_is_invalid_field(ctrl: Controller) -> None:
    with pytest.raises(CommandFailed) as exc:
        data_segments(ctrl, _fields(3, BASE, 0), 512, to_host=True, sgl_allowed=True)
    assert _status(exc) == Status.INVALID_FIELD | DNR


def test_sgl_where_only_prps_are_allowed_is_invalid_field(ctrl: Controller) -> None:
    """§4.2: admin commands use PRPs; PSDT must be 00b."""
    prp1, prp2 = sgl1(BASE, 512, SglType.DATA_BLOCK)
    with pytest.raises(CommandFailed) as exc:
        data_segments(
            ctrl, _fields(Psdt.SGL_MPTR_CONTIGUOUS, prp1, prp2), 512, to_host=True, sgl_allowed=False
        )
    assert _status(exc) == Status.INVALID_FIELD | DNR


def test_sgl_when_the_controller_does_not_advertise_sgls() -> None:
    memory = GuestMemory()
    memory.map(BASE, bytearray(4 * PAGE))
    controller = Controller(memory, config=ControllerConfig(sgls=False))
    prp1, prp2 = sgl1(BASE, 512, SglType.DATA_BLOCK)
    with pytest.raises(CommandFailed) as exc:
        data_segments(controller, _fields(Psdt.SGL_MPTR_SGL, prp1, prp2), 512, to_host=True, sgl_allowed=True)
    assert _status(exc) == Status.INVALID_FIELD | DNR
    controller.close()


def test_write_to_host_skips_bit_buckets_and_read_from_host_gathers(ctrl: Controller) -> None:
    memory = ctrl.memory
    segments: list[Segment] = [(BASE + 10, 4), (BIT_BUCKET, 3), (BASE + PAGE, 5)]
    write_to_host(memory, segments, memoryview(b"ABCDxyzEFGHI"))
    assert memory.read(BASE + 8, 8) == b"\0\0ABCD\0\0"
    assert memory.read(BASE + PAGE, 6) == b"EFGHI\0"
    assert read_from_host(memory, [(BASE + 10, 4), (BASE + PAGE, 5)], 9) == bytearray(b"ABCDEFGHI")


def test_send_to_host_pads_with_zeroes_and_receive_reads_back(ctrl: Controller) -> None:
    ctrl.memory.fill(BASE, 2 * PAGE, 0xEE)
    fields = _fields(Psdt.PRP, BASE + PAGE - 8, BASE + PAGE)
    send_to_host(ctrl, fields, b"0123", 16)
    assert ctrl.memory.read(BASE + PAGE - 8, 18) == b"0123" + bytes(12) + b"\xee\xee"
    assert receive_from_host(ctrl, fields, 6) == bytearray(b"0123\0\0")
    send_to_host(ctrl, _fields(Psdt.PRP, HOLE + 1, 0), b"", 0)  # nothing to send: no pointer use


# Section: property


addresses = st.one_of(
    st.builds(
        lambda page, offset: BASE + page * PAGE + offset,
        st.integers(-2, 40),
        st.sampled_from([0, 0, 0, 4, 8, 0x200, 0x800, 0xFF0, 0xFF8, 0xFFC, 1, 3]),
    ),
    st.sampled_from([0, HOLE, 2**64 - PAGE, 2**63]),
)

PRP_STATUSES = {PRP_OFFSET, TRANSFER}
SGL_STATUSES = {SGL_TYPE, SGL_SEGMENT, SGL_COUNT, SGL_LENGTH, TRANSFER}


def _two_region_memory(fill: bytes) -> GuestMemory:
    """Pages 0-15 and 24-31 mapped (a hole between), every byte a repetition of ``fill``."""
    memory = GuestMemory()
    for first, count in ((0, 16), (24, 8)):
        size = count * PAGE
        memory.map(BASE + first * PAGE, bytearray((fill * (size // len(fill) + 1))[:size]))
    return memory


def _check_segments(memory: GuestMemory, segments: list[Segment], length: int) -> None:
    assert sum(seg_len for _, seg_len in segments) == length
    for addr, seg_len in segments:
        assert seg_len > 0
        assert addr == BIT_BUCKET or memory.is_mapped(addr, seg_len)


@settings(max_examples=300)
@given(
    prp1=addresses,
    prp2=addresses,
    length=st.integers(1, 40 * PAGE),
    entries=st.lists(addresses, min_size=1, max_size=24),
    page_size=st.sampled_from([PAGE, 2 * PAGE]),
)
def test_any_prp_layout_is_segments_in_memory_or_a_prp_status(
    prp1: int, prp2: int, length: int, entries: list[int], page_size: int
) -> None:
    """Whatever the host puts in PRP1, PRP2 and any list pages (here: memory tiled with a few
    candidate entries), the result is mapped segments summing to the length, or a status."""
    memory = _two_region_memory(struct.pack(f"<{len(entries)}Q", *entries))
    try:
        segments = prp_segments(memory, prp1, prp2, length, page_size)
    except CommandFailed as failure:
        event(describe(failure.status))
        assert failure.status in PRP_STATUSES
    else:
        event("segments")
        _check_segments(memory, segments, length)
        assert segments[0][0] == prp1


descriptors = st.builds(
    lambda addr, length, ident: SGL_DESCRIPTOR.pack(addr & (2**64 - 1), length, ident),
    addresses,
    st.one_of(st.sampled_from([0, 1, 16, 32, 48, 512, PAGE, 2 * PAGE]), st.integers(0, 3 * PAGE)),
    st.one_of(
        st.sampled_from([0x00, 0x00, 0x10, 0x20, 0x30]),
        st.integers(0, 0xFF),
    ),
)


@settings(max_examples=300)
@given(
    first=descriptors,
    length=st.integers(1, 12 * PAGE),
    table=st.lists(descriptors, min_size=1, max_size=12),
    to_host=st.booleans(),
)
def test_any_sgl_layout_is_segments_in_memory_or_an_sgl_status(
    first: bytes, length: int, table: list[bytes], to_host: bool
) -> None:
    memory = _two_region_memory(b"".join(table))
    addr, desc_len, ident = SGL_DESCRIPTOR.unpack(first)
    try:
        segments = sgl_segments(memory, addr, desc_len | (ident << 56), length, host_is_destination=to_host)
    except CommandFailed as failure:
        event(describe(failure.status))
        assert failure.status in SGL_STATUSES
    else:
        event("segments")
        _check_segments(memory, segments, length)
        assert to_host or all(a != BIT_BUCKET for a, _ in segments)


# Constructed layouts: valid by construction, so the exact segments are known; then maybe one
# field broken at random, after which only the property can be checked.

DATA_PAGES = [*range(0, 11), *range(24, 30)]  # 4 KiB pages for data; 12-15 hold lists / segments
TABLE_BASE = BASE + 12 * PAGE


def _merge(segments: list[Segment], addr: int, length: int) -> None:
    """The model's merging rule: contiguous data extends the previous data segment."""
    if segments and segments[-1][0] != BIT_BUCKET and sum(segments[-1]) == addr:
        segments[-1] = (segments[-1][0], segments[-1][1] + length)
    else:
        segments.append((addr, length))


@dataclass
class PrpLayout:
    page_size: int
    length: int
    prp1: int
    prp2: int
    qwords: list[tuple[int, int]]  # (guest address, value) stored in list pages
    expected: list[Segment]


@st.composite
def prp_layouts(draw: st.DrawFn) -> PrpLayout:
    page_size = draw(st.sampled_from([PAGE, 2 * PAGE]))
    ratio = page_size // PAGE
    pages = [p for p in range(32 // ratio) if all(p * ratio + i in DATA_PAGES for i in range(ratio))]
    length = draw(st.one_of(st.integers(1, 40 * PAGE), st.integers(3 * PAGE, 40 * PAGE)))
    offset = 4 * draw(st.integers(0, page_size // 4 - 1))
    prp1 = BASE + draw(st.sampled_from(pages)) * page_size + offset
    first = min(length, page_size - offset)
    expected: list[Segment] = [(prp1, first)]
    remaining = length - first
    data: list[int] = []
    while remaining > 0:
        addr = BASE + draw(st.sampled_from(pages)) * page_size
        _merge(expected, addr, min(remaining, page_size))
        data.append(addr)
        remaining -= page_size
    qwords: list[tuple[int, int]] = []
    if not data:
        prp2 = draw(addresses)  # not used
    elif len(data) == 1:
        prp2 = data[0]
    else:
        slots = page_size // 8  # near the end of its page, a list must chain early
        in_first_page = draw(st.one_of(st.integers(1, slots), st.integers(1, len(data))))
        start = 8 * (slots - in_first_page)
        prp2 = pos = TABLE_BASE + start
        slots, page = (page_size - start) // 8, 0
        while len(data) > slots:  # fill the page, its last slot chaining to the next one
            qwords += [(pos + 8 * i, addr) for i, addr in enumerate(data[: slots - 1])]
            data = data[slots - 1 :]
            page += 1
            qwords.append((pos + 8 * (slots - 1), TABLE_BASE + page * page_size))
            pos, slots = TABLE_BASE + page * page_size, page_size // 8
        qwords += [(pos + 8 * i, addr) for i, addr in enumerate(data)]
    return PrpLayout(page_size, length, prp1, prp2, qwords, expected)


prp_mutations = st.one_of(
    st.none(), st.tuples(st.sampled_from(["prp1", "prp2", "qword"]), st.integers(0, 1000), addresses)
)


@settings(max_examples=300)
@given(layout=prp_layouts(), mutation=prp_mutations)
def test_constructed_prp_layouts_resolve_exactly_or_fail_with_a_prp_status(
    layout: PrpLayout, mutation: tuple[str, int, int] | None
) -> None:
    prp1, prp2, qwords = layout.prp1, layout.prp2, list(layout.qwords)
    if mutation is not None:
        what, index, value = mutation
        if what == "prp1":
            prp1 = value
        elif what == "prp2":
            prp2 = value
        elif qwords:
            where, _ = qwords[index % len(qwords)]
            qwords[index % len(qwords)] = (where, value)
    memory = _two_region_memory(b"\0")
    for where, value in qwords:
        memory.write(where, struct.pack("<Q", value))
    try:
        segments = prp_segments(memory, prp1, prp2, layout.length, layout.page_size)
    except CommandFailed as failure:
        event(f"mutated: {describe(failure.status)}")
        assert mutation is not None, failure.reason
        assert failure.status in PRP_STATUSES
    else:
        event("valid" if mutation is None else "mutated: still segments")
        _check_segments(memory, segments, layout.length)
        if mutation is None:
            assert segments == layout.expected


@dataclass
class SglLayout:
    length: int
    to_host: bool
    sgl1: tuple[int, int, int]  # address, length, identifier
    table: list[tuple[int, tuple[int, int, int]]]  # (guest address, descriptor) in segments
    expected: list[Segment]


@st.composite
def sgl_layouts(draw: st.DrawFn) -> SglLayout:
    to_host = draw(st.booleans())
    kinds = [SglType.DATA_BLOCK, SglType.BIT_BUCKET] if to_host else [SglType.DATA_BLOCK]
    chunks: list[tuple[int, int, int]] = []  # descriptors: address, length, identifier
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(kinds))
        size = draw(st.one_of(st.just(0), st.integers(1, 3000)))
        if chunks and chunks[-1][2] == 0 and draw(st.booleans()):
            addr = chunks[-1][0] + chunks[-1][1]  # contiguous with the previous block
        else:
            addr = BASE + draw(st.sampled_from(DATA_PAGES)) * PAGE + draw(st.integers(0, PAGE - 1))
        chunks.append((0 if kind == SglType.BIT_BUCKET else addr, size, kind << 4))
    if sum(size for _, size, _ in chunks) == 0:
        chunks[0] = (BASE, 1, SglType.DATA_BLOCK << 4)
    expected: list[Segment] = []
    for addr, size, ident in chunks:
        if size and ident == SglType.BIT_BUCKET << 4:
            expected.append((BIT_BUCKET, size))
        elif size:
            _merge(expected, addr, size)
    length = sum(size for _, size, _ in chunks)
    count = len(chunks)
    nseg = draw(st.integers(0 if count == 1 else 1, min(count, 4)))
    if nseg == 0:
        return SglLayout(length, to_host, chunks[0], [], expected)
    cuts: list[int] = []
    if nseg > 1:
        cuts = sorted(
            draw(st.lists(st.integers(1, count - 1), min_size=nseg - 1, max_size=nseg - 1, unique=True))
        )
    groups = [chunks[a:b] for a, b in zip([0, *cuts], [*cuts, count], strict=True)]
    places = [TABLE_BASE + i * PAGE + 16 * draw(st.integers(0, 64)) for i in range(nseg)]

    def pointer(i: int) -> tuple[int, int, int]:
        entries = len(groups[i]) + (i < nseg - 1)
        last = i == nseg - 1 and draw(st.booleans())  # the final one may also be a plain Segment
        return places[i], 16 * entries, (SglType.LAST_SEGMENT if last else SglType.SEGMENT) << 4

    table: list[tuple[int, tuple[int, int, int]]] = []
    for i, group in enumerate(groups):
        entries = list(group) + ([pointer(i + 1)] if i < nseg - 1 else [])
        table += [(places[i] + 16 * k, entry) for k, entry in enumerate(entries)]
    return SglLayout(length, to_host, pointer(0), table, expected)


sgl_mutations = st.one_of(
    st.none(),
    st.tuples(
        st.integers(0, 1000),
        st.sampled_from(["addr", "len", "ident", "total"]),
        st.integers(0, 5000),
        addresses,
    ),
)


@settings(max_examples=300)
@given(layout=sgl_layouts(), mutation=sgl_mutations)
def test_constructed_sgl_layouts_resolve_exactly_or_fail_with_an_sgl_status(
    layout: SglLayout, mutation: tuple[int, str, int, int] | None
) -> None:
    length, descs = layout.length, [layout.sgl1] + [d for _, d in layout.table]
    if mutation is not None:
        index, what, number, addr = mutation
        index %= len(descs)
        a, n, ident = descs[index]
        if what == "addr":
            descs[index] = (addr & (2**64 - 1), n, ident)
        elif what == "len":
            descs[index] = (a, number, ident)
        elif what == "ident":
            descs[index] = (a, n, number & 0xFF)
        else:
            length = max(1, length + number % 33 - 16)
    memory = _two_region_memory(b"\0")
    for (where, _), (a, n, ident) in zip(layout.table, descs[1:], strict=True):
        memory.write(where, SGL_DESCRIPTOR.pack(a, n, ident))
    a, n, ident = descs[0]
    try:
        segments = sgl_segments(memory, a, n | (ident << 56), length, host_is_destination=layout.to_host)
    except CommandFailed as failure:
        event(f"mutated: {describe(failure.status)}")
        assert mutation is not None, failure.reason
        assert failure.status in SGL_STATUSES
    else:
        event("valid" if mutation is None else "mutated: still segments")
        _check_segments(memory, segments, length)
        assert layout.to_host or all(a != BIT_BUCKET for a, _ in segments)
        if mutation is None:
            assert segments == layout.expected


# Section: end to end, raw SQEs on an I/O queue


@pytest.fixture
def ram_rig() -> Iterator[Rig]:
    r = make_rig(namespaces=[Namespace(1, RamBackend(4 << 20), 512)], trace=())
    try:
        yield r
    finally:
        r.close()


def _raw(rig: Rig, opcode: int, slba: int, nlb: int, prp1: int, prp2: int, psdt: int = Psdt.PRP) -> int:
    qp = rig.driver.queue(1)
    sqe = Sqe(opcode, psdt << 6, 0, 1, 0, 0, 0, prp1, prp2, slba & 0xFFFFFFFF, slba >> 32, nlb - 1)
    return rig.driver.io_command(qp, sqe, check=False).status


def _alloc(rig: Rig, size: int, fill: int = 0) -> DmaBuffer:
    buf = rig.host_memory.alloc(size)
    buf.view[:] = bytes([fill]) * size
    return buf


def test_sgl_read_scatters_and_discards_into_bit_buckets(ram_rig: Rig) -> None:
    data = bytes(range(256)) * 8  # 4 LBAs
    ram_rig.driver.write(1, 10, data)
    table = _alloc(ram_rig, PAGE)
    a, b = _alloc(ram_rig, PAGE, 0xEE), _alloc(ram_rig, PAGE, 0xEE)
    last = table.addr + 0x100
    table.view[:48] = (
        desc(a.addr + 1, 700, SglType.DATA_BLOCK)
        + desc(0, 300, SglType.BIT_BUCKET)
        + desc(last, 32, SglType.LAST_SEGMENT)
    )
    table.view[0x100:0x120] = desc(b.addr, 1000, SglType.DATA_BLOCK) + desc(b.addr + 2000, 48, 0)
    prp1, prp2 = sgl1(table.addr, 48, SglType.SEGMENT)
    assert _raw(ram_rig, NvmOpcode.READ, 10, 4, prp1, prp2, Psdt.SGL_MPTR_CONTIGUOUS) == Status.SUCCESS
    assert bytes(a.view[:702]) == b"\xee" + data[:700] + b"\xee"
    assert bytes(b.view[:1001]) == data[1000:2000] + b"\xee"
    assert bytes(b.view[2000:2049]) == data[2000:] + b"\xee"


def test_sgl_write_gathers(ram_rig: Rig) -> None:
    src = _alloc(ram_rig, 2 * PAGE)
    src.view[:] = bytes(i * 7 & 0xFF for i in range(2 * PAGE))
    table = _alloc(ram_rig, PAGE)
    table.view[:32] = desc(src.addr + PAGE + 5, 24, 0) + desc(src.addr + 3, 1000, 0)
    prp1, prp2 = sgl1(table.addr, 32, SglType.LAST_SEGMENT)
    assert _raw(ram_rig, NvmOpcode.WRITE, 3, 2, prp1, prp2, Psdt.SGL_MPTR_SGL) == Status.SUCCESS
    expected = bytes(src.view[PAGE + 5 : PAGE + 29]) + bytes(src.view[3:1003])
    assert ram_rig.driver.read(1, 3, 2) == expected


def test_bad_data_pointers_through_the_controller(ram_rig: Rig) -> None:
    """A 12 KiB Write (24 LBAs: PRP1 + a two-entry list) with each pointer broken in turn."""
    ram_rig.driver.write(1, 0, b"\x5a" * 4096)
    before = ram_rig.controller.statistics().error_completions
    buf = _alloc(ram_rig, 4 * PAGE, 0x11)
    lst = _alloc(ram_rig, PAGE)
    struct.pack_into("<2Q", lst.view, 0, buf.addr + PAGE, buf.addr + 2 * PAGE + 0x40)
    cases = [
        (buf.addr + 2, 0, Psdt.PRP, PRP_OFFSET),  # PRP1 not dword aligned
        (buf.addr, buf.addr + PAGE + 8, Psdt.PRP, PRP_OFFSET),  # PRP2 entry with an offset
        (buf.addr, lst.addr, Psdt.PRP, PRP_OFFSET),  # list entry with an offset (3 pages)
        (0x7_0000_0000, 0, Psdt.PRP, TRANSFER),  # PRP1 outside host memory
        (buf.addr, 0x7_0000_0000, Psdt.PRP, TRANSFER),  # PRP list outside host memory
        (buf.addr, 0, 3, Status.INVALID_FIELD | DNR),  # PSDT 11b is reserved
        (*sgl1(buf.addr, 4096, SglType.DATA_BLOCK), Psdt.SGL_MPTR_CONTIGUOUS, SGL_LENGTH),
        (*sgl1(0x7_0000_0000, 12 * 1024, SglType.DATA_BLOCK), Psdt.SGL_MPTR_CONTIGUOUS, TRANSFER),
        (*sgl1(buf.addr, 12 * 1024, 0x4), Psdt.SGL_MPTR_CONTIGUOUS, SGL_TYPE),
        (*sgl1(0, 12 * 1024, SglType.BIT_BUCKET), Psdt.SGL_MPTR_CONTIGUOUS, SGL_TYPE),  # on a write
    ]
    for prp1, prp2, psdt, status in cases:
        assert _raw(ram_rig, NvmOpcode.WRITE, 0, 24, prp1, prp2, psdt) == status, (prp1, prp2, psdt)
    # No failed write left anything behind.
    assert ram_rig.driver.read(1, 0, 24) == b"\x5a" * 4096 + bytes(16 * 512)
    assert ram_rig.controller.statistics().error_completions - before == len(cases)


def test_sgls_not_advertised_means_invalid_field_for_io() -> None:
    r = make_rig(namespaces=[Namespace(1, RamBackend(1 << 20), 512)], config=ControllerConfig(sgls=False))
    try:
        assert r.driver.controller_info["sgls"] == 0
        buf = _alloc(r, PAGE)
        prp1, prp2 = sgl1(buf.addr, 512, SglType.DATA_BLOCK)
        assert (
            _raw(r, NvmOpcode.READ, 0, 1, prp1, prp2, Psdt.SGL_MPTR_CONTIGUOUS) == Status.INVALID_FIELD | DNR
        )
        assert _raw(r, NvmOpcode.READ, 0, 1, buf.addr, 0) == Status.SUCCESS
    finally:
        r.close()


def test_admin_command_with_an_sgl_is_invalid_field(ram_rig: Rig) -> None:
    buf = _alloc(ram_rig, PAGE, 0x77)
    prp1, prp2 = sgl1(buf.addr, PAGE, SglType.DATA_BLOCK)
    cqe = ram_rig.driver.admin_command(
        AdminOpcode.IDENTIFY,
        prp1=prp1,
        prp2=prp2,
        cdw10=Cns.CONTROLLER,
        flags=Psdt.SGL_MPTR_CONTIGUOUS << 6,
        check=False,
    )
    assert cqe.status == Status.INVALID_FIELD | DNR
    assert bytes(buf.view) == b"\x77" * PAGE
