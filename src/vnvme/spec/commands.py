"""Submission and completion queue entries, opcodes and command dword fields.

SQE (NVMe 1.3 §4.2, 64 bytes)::

    CDW0 (OPC u8, FUSE/PSDT u8, CID u16) | NSID u32 | CDW2 u32 | CDW3 u32 | MPTR u64
    | DPTR: PRP1 u64, PRP2 u64 | CDW10..CDW15 (6 x u32)

CQE (§4.6, 16 bytes)::

    DW0 u32 | DW1 u32 | SQHD u16 | SQID u16 | CID u16 | Status Field u16 (bit 0 = phase tag)
"""

from __future__ import annotations

import struct
from enum import IntEnum
from typing import Final, NamedTuple

from vnvme.spec.registers import Field

SQE: Final = struct.Struct("<BBHIIIQQQ6I")
CQE: Final = struct.Struct("<IIHHHH")
SQE_SIZE: Final = 64
CQE_SIZE: Final = 16
# CC.IOSQES / CC.IOCQES and Identify SQES / CQES are log2 of these sizes.
SQE_SIZE_LOG2: Final = 6
CQE_SIZE_LOG2: Final = 4

if SQE.size != SQE_SIZE or CQE.size != CQE_SIZE:  # pragma: no cover - import-time size check
    raise AssertionError(f"SQE {SQE.size} / CQE {CQE.size}: spec says 64 / 16")


class Sqe(NamedTuple):
    """A decoded submission queue entry (driver side and tests; the controller unpacks inline)."""

    opcode: int
    flags: int
    cid: int
    nsid: int
    cdw2: int
    cdw3: int
    mptr: int
    prp1: int
    prp2: int
    cdw10: int = 0
    cdw11: int = 0
    cdw12: int = 0
    cdw13: int = 0
    cdw14: int = 0
    cdw15: int = 0

    def pack(self) -> bytes:
        return SQE.pack(*self)


class Cqe(NamedTuple):
    """A decoded completion queue entry; ``status`` is without the phase tag."""

    dw0: int
    dw1: int
    sqhd: int
    sqid: int
    cid: int
    status: int
    phase: int


def unpack_cqe(data: bytes | bytearray | memoryview, offset: int = 0) -> Cqe:
    dw0, dw1, sqhd, sqid, cid, sf = CQE.unpack_from(data, offset)
    return Cqe(dw0, dw1, sqhd, sqid, cid, sf >> 1, sf & 1)


# CDW0 flags byte: FUSE bits 1:0, PSDT bits 7:6 (§4.2, Figure 104)
FLAGS_FUSE: Final = Field("FUSE", 0, 2)
FLAGS_PSDT: Final = Field("PSDT", 6, 2)


class Psdt(IntEnum):
    """PRP or SGL for Data Transfer."""

    PRP = 0
    SGL_MPTR_CONTIGUOUS = 1
    SGL_MPTR_SGL = 2


class AdminOpcode(IntEnum):
    """Admin command set opcodes (§5, Figure 41)."""

    DELETE_IO_SQ = 0x00
    CREATE_IO_SQ = 0x01
    GET_LOG_PAGE = 0x02
    DELETE_IO_CQ = 0x04
    CREATE_IO_CQ = 0x05
    IDENTIFY = 0x06
    ABORT = 0x08
    SET_FEATURES = 0x09
    GET_FEATURES = 0x0A
    ASYNC_EVENT_REQUEST = 0x0C
    NAMESPACE_MANAGEMENT = 0x0D
    FIRMWARE_COMMIT = 0x10
    FIRMWARE_IMAGE_DOWNLOAD = 0x11
    DEVICE_SELF_TEST = 0x14
    NAMESPACE_ATTACHMENT = 0x15
    KEEP_ALIVE = 0x18
    DIRECTIVE_SEND = 0x19
    DIRECTIVE_RECEIVE = 0x1A
    VIRTUALIZATION_MANAGEMENT = 0x1C
    NVME_MI_SEND = 0x1D
    NVME_MI_RECEIVE = 0x1E
    DOORBELL_BUFFER_CONFIG = 0x7C
    FORMAT_NVM = 0x80
    SECURITY_SEND = 0x81
    SECURITY_RECEIVE = 0x82
    SANITIZE = 0x84


class NvmOpcode(IntEnum):
    """NVM command set opcodes (§6, Figure 188)."""

    FLUSH = 0x00
    WRITE = 0x01
    READ = 0x02
    WRITE_UNCORRECTABLE = 0x04
    COMPARE = 0x05
    WRITE_ZEROES = 0x08
    DATASET_MANAGEMENT = 0x09
    RESERVATION_REGISTER = 0x0D
    RESERVATION_REPORT = 0x0E
    RESERVATION_ACQUIRE = 0x11
    RESERVATION_RELEASE = 0x15


def opcode_name(opcode: int, admin: bool) -> str:
    table: type[IntEnum] = AdminOpcode if admin else NvmOpcode
    try:
        return table(opcode).name.lower()
    except ValueError:
        return f"opcode_{opcode:#04x}"


class Cns(IntEnum):
    """Identify Controller or Namespace Structure (CDW10.CNS, §5.15)."""

    NAMESPACE = 0x00
    CONTROLLER = 0x01
    ACTIVE_NAMESPACE_LIST = 0x02
    NAMESPACE_ID_DESCRIPTORS = 0x03


class FeatureId(IntEnum):
    """Feature Identifiers (§5.21.1, Figure 173)."""

    ARBITRATION = 0x01
    POWER_MANAGEMENT = 0x02
    LBA_RANGE_TYPE = 0x03
    TEMPERATURE_THRESHOLD = 0x04
    ERROR_RECOVERY = 0x05
    VOLATILE_WRITE_CACHE = 0x06
    NUMBER_OF_QUEUES = 0x07
    INTERRUPT_COALESCING = 0x08
    INTERRUPT_VECTOR_CONFIGURATION = 0x09
    WRITE_ATOMICITY_NORMAL = 0x0A
    ASYNC_EVENT_CONFIGURATION = 0x0B
    AUTONOMOUS_POWER_STATE_TRANSITION = 0x0C
    TIMESTAMP = 0x0E
    KEEP_ALIVE_TIMER = 0x0F
    # NVMe 1.4: not offered by vnvme (Identify Controller NWPC = 0); a readonly namespace is
    # write protected by its backing store, reported in NSATTR, not by this feature.
    NAMESPACE_WRITE_PROTECTION_CONFIG = 0x84


class FeatureSelect(IntEnum):
    """Get Features CDW10.SEL."""

    CURRENT = 0
    DEFAULT = 1
    SAVED = 2
    SUPPORTED_CAPABILITIES = 3


class LogPageId(IntEnum):
    """Log page identifiers (§5.14.1, Figure 94)."""

    ERROR_INFORMATION = 0x01
    SMART_HEALTH = 0x02
    FIRMWARE_SLOT = 0x03
    CHANGED_NAMESPACE_LIST = 0x04
    COMMANDS_SUPPORTED_AND_EFFECTS = 0x05


class AsyncEventType(IntEnum):
    """Asynchronous Event Type (completion DW0 bits 2:0, §5.2.1)."""

    ERROR_STATUS = 0
    SMART_HEALTH_STATUS = 1
    NOTICE = 2
    IO_COMMAND_SET_SPECIFIC = 6
    VENDOR_SPECIFIC = 7


class AsyncEventErrorInfo(IntEnum):
    """Asynchronous Event Information for Error Status events (Figure 46)."""

    INVALID_DOORBELL_REGISTER = 0x00  # write to a doorbell of a queue that does not exist
    INVALID_DOORBELL_WRITE_VALUE = 0x01
    DIAGNOSTIC_FAILURE = 0x02
    PERSISTENT_INTERNAL_ERROR = 0x03
    TRANSIENT_INTERNAL_ERROR = 0x04
    FIRMWARE_IMAGE_LOAD_ERROR = 0x05


class AsyncEventSmartInfo(IntEnum):
    RELIABILITY = 0x00
    TEMPERATURE_THRESHOLD = 0x01
    SPARE_BELOW_THRESHOLD = 0x02


def async_event_dw0(event_type: int, info: int, log_page: int) -> int:
    """Completion DW0 of an Asynchronous Event Request."""
    return (event_type & 0x7) | ((info & 0xFF) << 8) | ((log_page & 0xFF) << 16)


# Command dword fields (names after the spec's figure for each command).
class CreateQueue:
    """Create I/O Completion / Submission Queue (§5.3, §5.4)."""

    QID = Field("QID", 0, 16)  # CDW10
    QSIZE = Field("QSIZE", 16, 16)  # CDW10, zero-based
    PC = Field("PC", 0, 1)  # CDW11: Physically Contiguous
    IEN = Field("IEN", 1, 1)  # CDW11 (CQ): Interrupts Enabled
    IV = Field("IV", 16, 16)  # CDW11 (CQ): Interrupt Vector
    QPRIO = Field("QPRIO", 1, 2)  # CDW11 (SQ)
    CQID = Field("CQID", 16, 16)  # CDW11 (SQ)


class DeleteQueue:
    QID = Field("QID", 0, 16)  # CDW10


class IdentifyFields:
    CNS = Field("CNS", 0, 8)  # CDW10
    CNTID = Field("CNTID", 16, 16)


class GetLogPage:
    """Get Log Page (§5.14): NUMD = NUMDU:NUMDL, zero-based dwords; offset = LPOU:LPOL."""

    LID = Field("LID", 0, 8)  # CDW10
    LSP = Field("LSP", 8, 4)
    RAE = Field("RAE", 15, 1)
    NUMDL = Field("NUMDL", 16, 16)
    NUMDU = Field("NUMDU", 0, 16)  # CDW11


class FeatureFields:
    FID = Field("FID", 0, 8)  # CDW10
    SEL = Field("SEL", 8, 3)  # CDW10, Get Features
    SV = Field("SV", 31, 1)  # CDW10, Set Features


class AbortFields:
    SQID = Field("SQID", 0, 16)  # CDW10
    CID = Field("CID", 16, 16)


class RwFields:
    """Read / Write / Compare / Write Zeroes CDW12 (§6.9, §6.15)."""

    NLB = Field("NLB", 0, 16)  # zero-based
    DEAC = Field("DEAC", 25, 1)  # Write Zeroes only
    PRINFO = Field("PRINFO", 26, 4)
    FUA = Field("FUA", 30, 1)
    LR = Field("LR", 31, 1)


class DsmFields:
    """Dataset Management (§6.7): CDW10.NR zero-based ranges; CDW11 attributes."""

    NR = Field("NR", 0, 8)
    IDR = Field("IDR", 0, 1)
    IDW = Field("IDW", 1, 1)
    AD = Field("AD", 2, 1)


DSM_RANGE: Final = struct.Struct("<IIQ")  # context attributes, length in LBAs, starting LBA
if DSM_RANGE.size != 16:  # pragma: no cover
    raise AssertionError("DSM range must be 16 bytes")

# SGL descriptor (§4.4): address u64, length u32, 3 reserved bytes, identifier byte.
SGL_DESCRIPTOR: Final = struct.Struct("<QI3xB")
if SGL_DESCRIPTOR.size != 16:  # pragma: no cover
    raise AssertionError("SGL descriptor must be 16 bytes")


class SglType(IntEnum):
    """SGL Descriptor Type, identifier bits 7:4 (Figure 108)."""

    DATA_BLOCK = 0x0
    BIT_BUCKET = 0x1
    SEGMENT = 0x2
    LAST_SEGMENT = 0x3


# Broadcast / special namespace identifiers.
NSID_BROADCAST: Final = 0xFFFFFFFF
