"""Controller registers (NVMe 1.3 §3.1): offsets, access rules, bit fields, the doorbell array.

Each register's fields are declared as rows of :class:`Field` (shift, width), so the controller
and the driver decode and build register values from the same table; :data:`REGISTERS` declares
how a host may access each register (width, writable bits, reset value), which the
controller's register file (:mod:`vnvme.controller.registers`) enforces.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Final

from vnvme.spec.dbbuf import cq_slot, slot_queue, sq_slot


@dataclass(frozen=True, slots=True)
class Field:
    """A bit field of a register: ``width`` bits starting at bit ``shift``."""

    name: str
    shift: int
    width: int

    @property
    def mask(self) -> int:
        return ((1 << self.width) - 1) << self.shift

    def get(self, value: int) -> int:
        return (value >> self.shift) & ((1 << self.width) - 1)

    def put(self, value: int, field_value: int) -> int:
        """Return ``value`` with this field replaced by ``field_value`` (truncated to width)."""
        return (value & ~self.mask) | ((field_value << self.shift) & self.mask)


def compose(*pairs: tuple[Field, int]) -> int:
    """Build a register value from (field, value) pairs."""
    value = 0
    for field, field_value in pairs:
        value = field.put(value, field_value)
    return value


class Reg(IntEnum):
    """Register offsets in BAR0 (NVMe 1.3 §3.1, Figure 69)."""

    CAP = 0x00  # Controller Capabilities, 64-bit
    VS = 0x08  # Version
    INTMS = 0x0C  # Interrupt Mask Set
    INTMC = 0x10  # Interrupt Mask Clear
    CC = 0x14  # Controller Configuration
    CSTS = 0x1C  # Controller Status
    NSSR = 0x20  # NVM Subsystem Reset
    AQA = 0x24  # Admin Queue Attributes
    ASQ = 0x28  # Admin Submission Queue Base Address, 64-bit
    ACQ = 0x30  # Admin Completion Queue Base Address, 64-bit
    CMBLOC = 0x38
    CMBSZ = 0x3C


# Size of the register file before the doorbells; reads inside it that hit no register return 0.
REGISTER_FILE_SIZE: Final = 0x1000
DOORBELL_BASE: Final = 0x1000

# "NVMe" in ASCII: the only value whose write to NSSR starts an NVM Subsystem Reset (§3.1.6).
NSSR_MAGIC: Final = 0x4E564D65


class CAP:
    """Controller Capabilities (§3.1.1)."""

    MQES = Field("MQES", 0, 16)  # Maximum Queue Entries Supported, zero-based
    CQR = Field("CQR", 16, 1)  # Contiguous Queues Required
    AMS = Field("AMS", 17, 2)
    TO = Field("TO", 24, 8)  # Timeout, 500 ms units
    DSTRD = Field("DSTRD", 32, 4)  # Doorbell Stride: 2 ^ (2 + DSTRD) bytes
    NSSRS = Field("NSSRS", 36, 1)  # NVM Subsystem Reset Supported
    CSS = Field("CSS", 37, 8)  # Command Sets Supported; bit 0 = NVM command set
    BPS = Field("BPS", 45, 1)
    MPSMIN = Field("MPSMIN", 48, 4)  # page size 2 ^ (12 + MPSMIN)
    MPSMAX = Field("MPSMAX", 52, 4)


class CC:
    """Controller Configuration (§3.1.5)."""

    EN = Field("EN", 0, 1)
    CSS = Field("CSS", 4, 3)
    MPS = Field("MPS", 7, 4)
    AMS = Field("AMS", 11, 3)
    SHN = Field("SHN", 14, 2)
    IOSQES = Field("IOSQES", 16, 4)
    IOCQES = Field("IOCQES", 20, 4)


class CSTS:
    """Controller Status (§3.1.6)."""

    RDY = Field("RDY", 0, 1)
    CFS = Field("CFS", 1, 1)
    SHST = Field("SHST", 2, 2)
    NSSRO = Field("NSSRO", 4, 1)
    PP = Field("PP", 5, 1)


class AQA:
    """Admin Queue Attributes (§3.1.8); both sizes zero-based."""

    ASQS = Field("ASQS", 0, 12)
    ACQS = Field("ACQS", 16, 12)


class ShutdownNotification(IntEnum):
    """CC.SHN values."""

    NONE = 0
    NORMAL = 1
    ABRUPT = 2


class ShutdownStatus(IntEnum):
    """CSTS.SHST values."""

    NORMAL = 0
    OCCURRING = 1
    COMPLETE = 2


def version(major: int, minor: int, tertiary: int = 0) -> int:
    """Encode a VS register value (§3.1.2)."""
    return (major << 16) | (minor << 8) | tertiary


NVME_VERSION_1_3: Final = version(1, 3, 0)


def page_size(mps: int) -> int:
    """Memory page size for an MPS / MPSMIN / MPSMAX value: 2 ^ (12 + mps)."""
    return 1 << (12 + mps)


def doorbell_stride(dstrd: int) -> int:
    """Bytes between two doorbell registers: 4 << CAP.DSTRD (§3.1.10)."""
    return 4 << dstrd


def sq_tail_doorbell(qid: int, dstrd: int) -> int:
    """BAR0 offset of SQ ``qid``'s Tail Doorbell: 1000h + (2y * (4 << DSTRD))."""
    return DOORBELL_BASE + 4 * sq_slot(qid, dstrd)


def cq_head_doorbell(qid: int, dstrd: int) -> int:
    """BAR0 offset of CQ ``qid``'s Head Doorbell: 1000h + ((2y + 1) * (4 << DSTRD))."""
    return DOORBELL_BASE + 4 * cq_slot(qid, dstrd)


def decode_doorbell(offset: int, dstrd: int) -> tuple[int, bool] | None:
    """Map a BAR0 offset at or above 1000h to (qid, is_cq), or None if it is not a doorbell."""
    # Shadow and EventIdx slots are laid out as the doorbells are, 1000h on (§5.7).
    rel = offset - DOORBELL_BASE
    if rel < 0 or rel % doorbell_stride(dstrd):
        return None
    return slot_queue(rel >> 2, dstrd)


def bar0_size(queue_pairs: int, dstrd: int) -> int:
    """Smallest power-of-two BAR0 (>= 16 KiB) that holds registers and every doorbell."""
    end = DOORBELL_BASE + 2 * queue_pairs * (4 << dstrd)
    size = 0x4000
    while size < end:
        size <<= 1
    return size


@dataclass(frozen=True, slots=True)
class Register:
    """How a host may access one register (§3.1, Figure 69)."""

    reg: Reg
    #: Bytes: 4, or 8 for the registers a host may also access as two 32-bit halves.
    width: int
    #: The bits a write takes; 0: read-only, a write is refused.
    writable: int
    #: The value after a controller reset (CAP's comes from the controller's configuration).
    reset: int = 0
    #: §3.1.8-3.1.10: the admin queue attributes are taken at CC.EN 0 -> 1 only; a write
    #: while CC.EN = 1 is ignored.
    only_while_disabled: bool = False


_ADDRESS = 0xFFFF_FFFF_FFFF_F000  # ASQ / ACQ: bits 11:0 reserved

REGISTERS: Final[tuple[Register, ...]] = (
    Register(Reg.CAP, 8, 0),
    Register(Reg.VS, 4, 0, reset=NVME_VERSION_1_3),
    Register(Reg.INTMS, 4, 0xFFFF_FFFF),
    Register(Reg.INTMC, 4, 0xFFFF_FFFF),
    Register(Reg.CC, 4, 0xFFFF_FFFF),
    Register(Reg.CSTS, 4, CSTS.NSSRO.mask),  # NSSRO is RW1C; every other bit read-only
    Register(Reg.NSSR, 4, 0xFFFF_FFFF),  # reads as 0
    Register(Reg.AQA, 4, AQA.ASQS.mask | AQA.ACQS.mask, only_while_disabled=True),
    Register(Reg.ASQ, 8, _ADDRESS, only_while_disabled=True),
    Register(Reg.ACQ, 8, _ADDRESS, only_while_disabled=True),
    Register(Reg.CMBLOC, 4, 0),  # no controller memory buffer
    Register(Reg.CMBSZ, 4, 0),
)

REGISTER_WIDTH: Final[dict[Reg, int]] = {r.reg: r.width for r in REGISTERS}
