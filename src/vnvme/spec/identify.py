"""Identify data structures (NVMe 1.3 §5.15): Controller, Namespace, Active Namespace List,
Namespace Identification Descriptors. Each is 4096 bytes."""

from __future__ import annotations

from enum import IntEnum, IntFlag
from typing import Final

from vnvme.spec.layout import Layout

IDENTIFY_SIZE: Final = 4096

IDENTIFY_CONTROLLER: Final = Layout(
    "IdentifyController",
    IDENTIFY_SIZE,
    [
        ("vid", 0, "H"),
        ("ssvid", 2, "H"),
        ("sn", 4, "20s"),
        ("mn", 24, "40s"),
        ("fr", 64, "8s"),
        ("rab", 72, "B"),
        ("ieee", 73, "3s"),
        ("cmic", 76, "B"),
        ("mdts", 77, "B"),
        ("cntlid", 78, "H"),
        ("ver", 80, "I"),
        ("rtd3r", 84, "I"),
        ("rtd3e", 88, "I"),
        ("oaes", 92, "I"),
        ("ctratt", 96, "I"),
        ("fguid", 112, "16s"),
        ("oacs", 256, "H"),
        ("acl", 258, "B"),
        ("aerl", 259, "B"),
        ("frmw", 260, "B"),
        ("lpa", 261, "B"),
        ("elpe", 262, "B"),
        ("npss", 263, "B"),
        ("avscc", 264, "B"),
        ("apsta", 265, "B"),
        ("wctemp", 266, "H"),
        ("cctemp", 268, "H"),
        ("mtfa", 270, "H"),
        ("hmpre", 272, "I"),
        ("hmmin", 276, "I"),
        ("tnvmcap", 280, "u128"),
        ("unvmcap", 296, "u128"),
        ("rpmbs", 312, "I"),
        ("edstt", 316, "H"),
        ("dsto", 318, "B"),
        ("fwug", 319, "B"),
        ("kas", 320, "H"),
        ("hctma", 322, "H"),
        ("mntmt", 324, "H"),
        ("mxtmt", 326, "H"),
        ("sanicap", 328, "I"),
        ("sqes", 512, "B"),
        ("cqes", 513, "B"),
        ("maxcmd", 514, "H"),
        ("nn", 516, "I"),
        ("oncs", 520, "H"),
        ("fuses", 522, "H"),
        ("fna", 524, "B"),
        ("vwc", 525, "B"),
        ("awun", 526, "H"),
        ("awupf", 528, "H"),
        ("nvscc", 530, "B"),
        ("nwpc", 531, "B"),
        ("acwu", 532, "H"),
        ("sgls", 536, "I"),
        ("mnan", 540, "I"),
        ("subnqn", 768, "256s"),
        # Power State Descriptor 0 (Figure 113): MP in centiwatts, ENLAT / EXLAT in us.
        ("psd0_mp", 2048, "H"),
        ("psd0_flags", 2051, "B"),
        ("psd0_enlat", 2052, "I"),
        ("psd0_exlat", 2056, "I"),
        ("psd0_rrt", 2060, "B"),
        ("psd0_rrl", 2061, "B"),
        ("psd0_rwt", 2062, "B"),
        ("psd0_rwl", 2063, "B"),
    ],
)


class Oacs(IntFlag):
    """Optional Admin Command Support (Identify Controller bytes 257:256)."""

    SECURITY = 1 << 0
    FORMAT_NVM = 1 << 1
    FIRMWARE = 1 << 2
    NAMESPACE_MANAGEMENT = 1 << 3
    DEVICE_SELF_TEST = 1 << 4
    DIRECTIVES = 1 << 5
    NVME_MI = 1 << 6
    VIRTUALIZATION_MANAGEMENT = 1 << 7
    DOORBELL_BUFFER_CONFIG = 1 << 8


class Oncs(IntFlag):
    """Optional NVM Command Support (bytes 521:520)."""

    COMPARE = 1 << 0
    WRITE_UNCORRECTABLE = 1 << 1
    DATASET_MANAGEMENT = 1 << 2
    WRITE_ZEROES = 1 << 3
    SAVE_SELECT = 1 << 4  # Save field in Set Features, Select field in Get Features
    RESERVATIONS = 1 << 5
    TIMESTAMP = 1 << 6


class Lpa(IntFlag):
    """Log Page Attributes."""

    SMART_PER_NAMESPACE = 1 << 0
    COMMANDS_EFFECTS = 1 << 1
    EXTENDED_DATA = 1 << 2


IDENTIFY_NAMESPACE: Final = Layout(
    "IdentifyNamespace",
    IDENTIFY_SIZE,
    [
        ("nsze", 0, "Q"),
        ("ncap", 8, "Q"),
        ("nuse", 16, "Q"),
        ("nsfeat", 24, "B"),
        ("nlbaf", 25, "B"),  # zero-based number of LBA formats
        ("flbas", 26, "B"),
        ("mc", 27, "B"),
        ("dpc", 28, "B"),
        ("dps", 29, "B"),
        ("nmic", 30, "B"),
        ("rescap", 31, "B"),
        ("fpi", 32, "B"),
        ("dlfeat", 33, "B"),
        ("nawun", 34, "H"),
        ("nawupf", 36, "H"),
        ("nacwu", 38, "H"),
        ("nabsn", 40, "H"),
        ("nabo", 42, "H"),
        ("nabspf", 44, "H"),
        ("noiob", 46, "H"),
        ("nvmcap", 48, "u128"),
        ("nsattr", 99, "B"),  # NVMe 1.4 (reserved in 1.3, so a 1.3 host ignores it)
        ("nguid", 104, "16s"),
        ("eui64", 120, "8s"),
        # LBA Format 0 (Figure 116): MS u16, LBADS u8 (log2 of the LBA size), RP bits 1:0.
        ("lbaf0_ms", 128, "H"),
        ("lbaf0_lbads", 130, "B"),
        ("lbaf0_rp", 131, "B"),
    ],
)

# NSATTR bit 0: the namespace is write protected (NVMe 1.4 §8.20; Linux marks the disk read-only).
NSATTR_WRITE_PROTECTED: Final = 0x01

# Deallocated logical blocks read as zeroes (DLFEAT bits 2:0 = 001b).
DLFEAT_READ_ZEROES: Final = 0x01
# Write Zeroes supports the Deallocate bit (DLFEAT bit 3).
DLFEAT_WRITE_ZEROES_DEALLOCATE: Final = 0x08

# Active Namespace ID list (CNS 02h): up to 1024 NSIDs, ascending, zero-terminated.
ACTIVE_NAMESPACE_LIST_ENTRIES: Final = IDENTIFY_SIZE // 4


class NamespaceIdType(IntEnum):
    """Namespace Identifier Type (NIDT), Figure 116A."""

    EUI64 = 1
    NGUID = 2
    UUID = 3


NAMESPACE_ID_LENGTH: Final[dict[NamespaceIdType, int]] = {
    NamespaceIdType.EUI64: 8,
    NamespaceIdType.NGUID: 16,
    NamespaceIdType.UUID: 16,
}

# Descriptor header: NIDT u8, NIDL u8, two reserved bytes, then NIDL bytes of identifier.
NAMESPACE_ID_DESCRIPTOR_HEADER: Final = 4


def pack_namespace_id_descriptors(ids: list[tuple[NamespaceIdType, bytes]]) -> bytearray:
    """CNS 03h data: a list of descriptors, terminated by a zero NIDL (or the end of 4 KiB)."""
    buf = bytearray(IDENTIFY_SIZE)
    pos = 0
    for nidt, nid in ids:
        if len(nid) != NAMESPACE_ID_LENGTH[nidt]:
            raise ValueError(f"{nidt.name} identifier must be {NAMESPACE_ID_LENGTH[nidt]} bytes")
        buf[pos] = nidt
        buf[pos + 1] = len(nid)
        buf[pos + 4 : pos + 4 + len(nid)] = nid
        pos += NAMESPACE_ID_DESCRIPTOR_HEADER + len(nid)
    return buf


def unpack_namespace_id_descriptors(
    data: bytes | bytearray | memoryview,
) -> list[tuple[int, bytes]]:
    out: list[tuple[int, bytes]] = []
    pos = 0
    while pos + NAMESPACE_ID_DESCRIPTOR_HEADER <= len(data):
        nidt, nidl = data[pos], data[pos + 1]
        if nidl == 0:
            break
        start = pos + NAMESPACE_ID_DESCRIPTOR_HEADER
        out.append((nidt, bytes(data[start : start + nidl])))
        pos = start + nidl
    return out


def lba_size_log2(lba_size: int) -> int:
    """LBADS for a power-of-two LBA size of at least 512 bytes."""
    if lba_size < 512 or lba_size & (lba_size - 1):
        raise ValueError(f"LBA size must be a power of two >= 512, not {lba_size}")
    return lba_size.bit_length() - 1


def _check_sizes() -> None:
    for layout in (IDENTIFY_CONTROLLER, IDENTIFY_NAMESPACE):
        if layout.size != IDENTIFY_SIZE:  # pragma: no cover
            raise AssertionError(f"{layout.name} must be {IDENTIFY_SIZE} bytes")


_check_sizes()
