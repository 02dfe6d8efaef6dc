"""The configuration space of an emulated PCI Express function (Type 0 header, 4 KiB).

Layout (PCIe Base Specification r4.0 §7.5.1; capability offsets are this module's choice)::

    0x000  Type 0 header: identity, Command/Status, six BARs, Interrupt Line/Pin
    0x040  Power Management capability (ID 01h)   -> 0x50
    0x050  MSI-X capability (ID 11h)              -> 0x60
    0x060  PCI Express capability (ID 10h, v2)    -> end (next = 0)
    0x100  extended capability header 0: no extended capabilities; the rest reads 0

Every byte has a write mask (which bits a write may change) and an RW1C mask (which bits a
written 1 clears). Read-only fields keep their value whatever is written, and BAR sizing falls
out of the masks: a BAR's low address bits below its size are simply not writable, so writing
all ones reads back the size mask with the read-only type bits, exactly as on hardware.

The module knows nothing about NVMe or vfio-user: a device model builds a :class:`PciConfig`,
forwards config reads and writes to it, and consults its properties (memory decode enabled,
bus mastering, MSI-X enable, BAR addresses).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import Final

CONFIG_SPACE_SIZE: Final = 4096
#: First byte of PCIe extended configuration space (PCIe r4.0 §7.6).
EXTENDED_CONFIG_START: Final = 0x100

# Where this module places its capabilities (each inside the 0x40..0xFF device-specific area).
PM_CAP_OFFSET: Final = 0x40
MSIX_CAP_OFFSET: Final = 0x50
PCIE_CAP_OFFSET: Final = 0x60

BAR_COUNT: Final = 6
#: Smallest memory BAR: the low 4 bits of a memory BAR are type bits (PCI 3.0 §6.2.5.1).
MIN_BAR_SIZE: Final = 16
MAX_MSIX_VECTORS: Final = 2048


class ConfigReg(IntEnum):
    """Type 0 header register offsets (PCIe r4.0 §7.5.1.1, §7.5.1.2)."""

    VENDOR_ID = 0x00
    DEVICE_ID = 0x02
    COMMAND = 0x04
    STATUS = 0x06
    REVISION_ID = 0x08
    CLASS_CODE = 0x09  # 3 bytes: programming interface, sub-class, base class
    CACHE_LINE_SIZE = 0x0C
    LATENCY_TIMER = 0x0D
    HEADER_TYPE = 0x0E
    BIST = 0x0F
    BAR0 = 0x10  # BARn at 0x10 + 4 * n
    CARDBUS_CIS = 0x28
    SUBSYSTEM_VENDOR_ID = 0x2C
    SUBSYSTEM_ID = 0x2E
    EXPANSION_ROM = 0x30
    CAPABILITIES_POINTER = 0x34
    INTERRUPT_LINE = 0x3C
    INTERRUPT_PIN = 0x3D
    MIN_GNT = 0x3E
    MAX_LAT = 0x3F


class Command(IntFlag):
    """Command register bits this function implements; the rest are hardwired to 0."""

    MEMORY_SPACE = 0x002
    BUS_MASTER = 0x004
    # PCIe r4.0 §7.5.1.1.3: these two are RW for every PCIe function, though they only gate
    # error reporting, which this model never generates on its own.
    PARITY_ERROR_RESPONSE = 0x040
    SERR_ENABLE = 0x100
    INTX_DISABLE = 0x400


class Status(IntFlag):
    """Status register bits (PCIe r4.0 §7.5.1.1.4)."""

    INTERRUPT = 1 << 3
    CAPABILITIES_LIST = 1 << 4
    MASTER_DATA_PARITY_ERROR = 1 << 8
    SIGNALED_TARGET_ABORT = 1 << 11
    RECEIVED_TARGET_ABORT = 1 << 12
    RECEIVED_MASTER_ABORT = 1 << 13
    SIGNALED_SYSTEM_ERROR = 1 << 14
    DETECTED_PARITY_ERROR = 1 << 15


#: The Status bits software clears by writing 1 (RW1C).
STATUS_RW1C: Final = (
    Status.MASTER_DATA_PARITY_ERROR
    | Status.SIGNALED_TARGET_ABORT
    | Status.RECEIVED_TARGET_ABORT
    | Status.RECEIVED_MASTER_ABORT
    | Status.SIGNALED_SYSTEM_ERROR
    | Status.DETECTED_PARITY_ERROR
)


class CapId(IntEnum):
    """Capability IDs (PCI Code and ID Assignment Specification)."""

    POWER_MANAGEMENT = 0x01
    PCI_EXPRESS = 0x10
    MSIX = 0x11


class PmReg(IntEnum):
    """Power Management capability registers, relative to the capability (PCI PM 1.2 §3.2)."""

    PMC = 0x02
    PMCSR = 0x04


class MsixReg(IntEnum):
    """MSI-X capability registers, relative to the capability (PCIe r4.0 §7.7.2)."""

    MESSAGE_CONTROL = 0x02
    TABLE = 0x04  # Table Offset / Table BIR
    PBA = 0x08  # PBA Offset / PBA BIR


MSIX_CONTROL_TABLE_SIZE: Final = 0x07FF  # N - 1, read-only
MSIX_CONTROL_FUNCTION_MASK: Final = 1 << 14
MSIX_CONTROL_ENABLE: Final = 1 << 15
#: The BIR occupies the low 3 bits of the Table and PBA registers; offsets are QWORD aligned.
MSIX_BIR_MASK: Final = 0x7


class PcieReg(IntEnum):
    """PCI Express capability registers, relative to the capability (PCIe r4.0 §7.5.3)."""

    CAPABILITIES = 0x02
    DEVCAP = 0x04
    DEVCTL = 0x08
    DEVSTA = 0x0A
    LNKCAP = 0x0C
    LNKCTL = 0x10
    LNKSTA = 0x12
    DEVCAP2 = 0x24
    DEVCTL2 = 0x28
    DEVSTA2 = 0x2A
    LNKCAP2 = 0x2C
    LNKCTL2 = 0x30
    LNKSTA2 = 0x32


#: Length of a version 2 PCI Express capability, up to and including Slot Status 2.
PCIE_CAP_V2_SIZE: Final = 0x3C


class DeviceStatus(IntFlag):
    """PCI Express Device Status bits that are RW1C (PCIe r4.0 §7.5.3.5)."""

    CORRECTABLE_ERROR = 0x1  # bit 0
    NON_FATAL_ERROR = 0x2
    FATAL_ERROR = 0x4
    UNSUPPORTED_REQUEST = 0x8


#: Every Device Status bit declared above is RW1C.
DEVSTA_RW1C: Final = DeviceStatus(sum(DeviceStatus))

# Memory BAR low bits (PCI 3.0 §6.2.5.1): bit 0 = 0 (memory), bits 2:1 = locatable type, bit 3.
_BAR_TYPE_64BIT: Final = 0b10 << 1
_BAR_PREFETCHABLE: Final = 1 << 3
_BAR_TYPE_BITS: Final = 0xF

# The PCIe link is virtual; advertise something plausible: 8.0 GT/s, x4.
_LINK_SPEED_8GT: Final = 3  # an index into the Supported Link Speeds Vector (LNKCAP2 bits 7:1)
_LINK_WIDTH: Final = 4
_SUPPORTED_LINK_SPEEDS: Final = 0b111 << 1  # 2.5, 5.0 and 8.0 GT/s


@dataclass(frozen=True, slots=True)
class Bar:
    """A memory BAR. A 64-bit BAR also takes slot ``index + 1`` for its upper dword."""

    index: int
    size: int
    is_64bit: bool = False
    prefetchable: bool = False

    def __post_init__(self) -> None:
        last = BAR_COUNT - 2 if self.is_64bit else BAR_COUNT - 1
        if not 0 <= self.index <= last:
            raise ValueError(f"BAR index {self.index} out of range 0..{last}")
        # A 32-bit BAR cannot describe 4 GiB: its size mask would be all zeroes.
        limit = 1 << (63 if self.is_64bit else 31)
        if self.size < MIN_BAR_SIZE or self.size > limit or self.size & (self.size - 1):
            raise ValueError(f"BAR size {self.size:#x} is not a power of two in {MIN_BAR_SIZE}..{limit:#x}")

    @property
    def slots(self) -> range:
        return range(self.index, self.index + (2 if self.is_64bit else 1))


@dataclass(frozen=True, slots=True)
class MsixConfig:
    """Where the MSI-X Table and Pending Bit Array live: a BAR index (BIR) and an offset in it."""

    vectors: int
    table_bir: int
    table_offset: int
    pba_bir: int
    pba_offset: int

    def __post_init__(self) -> None:
        if not 1 <= self.vectors <= MAX_MSIX_VECTORS:
            raise ValueError(f"MSI-X vector count {self.vectors} out of range 1..{MAX_MSIX_VECTORS}")
        for name, offset in (("table", self.table_offset), ("PBA", self.pba_offset)):
            # The low 3 bits of the register hold the BIR (PCIe r4.0 §7.7.2.4, §7.7.2.5).
            if offset < 0 or offset & MSIX_BIR_MASK or offset > 0xFFFFFFFF:
                raise ValueError(f"MSI-X {name} offset {offset:#x} is not a QWORD-aligned 32-bit value")

    @property
    def table_size(self) -> int:
        """Bytes of the MSI-X Table: 16 per vector."""
        return 16 * self.vectors

    @property
    def pba_size(self) -> int:
        """Bytes of the PBA: one bit per vector, in whole QWORDs."""
        return 8 * ((self.vectors + 63) // 64)


def _check_u(name: str, value: int, bits: int) -> None:
    if not 0 <= value < 1 << bits:
        raise ValueError(f"{name} {value:#x} does not fit in {bits} bits")


class PciConfig:
    """A PCI Express endpoint's 4 KiB configuration space with PM, MSI-X and PCIe capabilities.

    Accesses are 1, 2 or 4 bytes, little-endian, at any offset that keeps the access inside
    the 4 KiB space; anything else raises :class:`ValueError`.
    """

    def __init__(
        self,
        *,
        vendor_id: int,
        device_id: int,
        subsystem_vendor_id: int,
        subsystem_id: int,
        revision: int,
        class_code: int,
        bars: Sequence[Bar],
        msix: MsixConfig,
        interrupt_pin: int = 0,
    ) -> None:
        # (name, register, bytes, value): read-only identity fields of the header.
        identity = (
            ("vendor ID", ConfigReg.VENDOR_ID, 2, vendor_id),
            ("device ID", ConfigReg.DEVICE_ID, 2, device_id),
            ("subsystem vendor ID", ConfigReg.SUBSYSTEM_VENDOR_ID, 2, subsystem_vendor_id),
            ("subsystem ID", ConfigReg.SUBSYSTEM_ID, 2, subsystem_id),
            ("revision", ConfigReg.REVISION_ID, 1, revision),
            ("class code", ConfigReg.CLASS_CODE, 3, class_code),
        )
        for name, _, size, value in identity:
            _check_u(name, value, 8 * size)
        if not 0 <= interrupt_pin <= 4:
            raise ValueError(f"interrupt pin {interrupt_pin} out of range 0 (none), 1..4 (INTA..INTD)")

        by_slot: dict[int, Bar] = {}
        for bar in bars:
            for slot in bar.slots:
                if slot in by_slot:
                    raise ValueError(f"BAR slot {slot} used by two BARs")
                by_slot[slot] = bar
        self.bars: tuple[Bar, ...] = tuple(sorted(bars, key=lambda b: b.index))
        self._bars: dict[int, Bar] = {b.index: b for b in self.bars}
        self._check_msix(msix)
        self.msix: MsixConfig = msix

        self._image = bytearray(CONFIG_SPACE_SIZE)
        self._wmask = bytearray(CONFIG_SPACE_SIZE)
        self._w1c = bytearray(CONFIG_SPACE_SIZE)

        self._build_header(identity, interrupt_pin)
        self._build_pm(PM_CAP_OFFSET, next_cap=MSIX_CAP_OFFSET)
        self._build_msix(MSIX_CAP_OFFSET, next_cap=PCIE_CAP_OFFSET)
        self._build_pcie(PCIE_CAP_OFFSET, next_cap=0)
        # Extended space: a header of all zeroes at 0x100 says "no extended capabilities"
        # (PCIe r4.0 §7.6.3), and the image is already zero there.

        self._power_on = bytes(self._image)
        #: Called after every write and reset: a device model caches what it tests per access.
        self.on_change: Callable[[], None] | None = None
        self._cfg = bytearray(self._power_on)

    # -- construction --------------------------------------------------------------------

    def _check_msix(self, msix: MsixConfig) -> None:
        regions: list[tuple[int, int, int]] = []
        for name, bir, offset, size in (
            ("table", msix.table_bir, msix.table_offset, msix.table_size),
            ("PBA", msix.pba_bir, msix.pba_offset, msix.pba_size),
        ):
            bar = self._bars.get(bir)
            if bar is None:
                raise ValueError(f"MSI-X {name} BIR {bir} does not name a BAR")
            if offset + size > bar.size:
                raise ValueError(f"MSI-X {name} ({size:#x} bytes at {offset:#x}) overflows BAR{bir}")
            regions.append((bir, offset, offset + size))
        (bir_t, start_t, end_t), (bir_p, start_p, end_p) = regions
        if bir_t == bir_p and start_t < end_p and start_p < end_t:
            raise ValueError("MSI-X table and PBA overlap")

    def _set(self, offset: int, size: int, value: int, wmask: int = 0, w1c: int = 0) -> None:
        """Set a register's power-on value and its write / RW1C masks."""
        self._image[offset : offset + size] = value.to_bytes(size, "little")
        self._wmask[offset : offset + size] = wmask.to_bytes(size, "little")
        self._w1c[offset : offset + size] = w1c.to_bytes(size, "little")

    def _build_header(self, identity: Sequence[tuple[str, int, int, int]], interrupt_pin: int) -> None:
        for _, offset, size, value in identity:
            self._set(offset, size, value)
        command_wmask = (
            Command.MEMORY_SPACE
            | Command.BUS_MASTER
            | Command.PARITY_ERROR_RESPONSE
            | Command.SERR_ENABLE
            | Command.INTX_DISABLE
        )
        # No I/O BARs, so I/O Space Enable stays hardwired to 0.
        self._set(ConfigReg.COMMAND, 2, 0, wmask=command_wmask)
        self._set(ConfigReg.STATUS, 2, Status.CAPABILITIES_LIST, w1c=STATUS_RW1C)
        # RW for software's benefit, no effect on a PCIe function (PCIe r4.0 §7.5.1.1.7).
        self._set(ConfigReg.CACHE_LINE_SIZE, 1, 0, wmask=0xFF)
        # Latency Timer, BIST: hardwired 0. Header Type 0, single function.
        self._set(ConfigReg.HEADER_TYPE, 1, 0x00)
        for bar in self.bars:
            self._build_bar(bar)
        # Expansion ROM BAR: not implemented, so it reads 0 and no bit is writable, which
        # sizing software reads as "no ROM" (PCI 3.0 §6.2.5.2).
        self._set(ConfigReg.CAPABILITIES_POINTER, 1, PM_CAP_OFFSET)
        self._set(ConfigReg.INTERRUPT_LINE, 1, 0, wmask=0xFF)
        self._set(ConfigReg.INTERRUPT_PIN, 1, interrupt_pin)

    def _build_bar(self, bar: Bar) -> None:
        # Address bits below the size are not writable: that is all BAR sizing needs.
        address_mask = ~(bar.size - 1) & ((1 << 64) - 1)
        low = _BAR_TYPE_64BIT if bar.is_64bit else 0
        if bar.prefetchable:
            low |= _BAR_PREFETCHABLE
        offset = ConfigReg.BAR0 + 4 * bar.index
        self._set(offset, 4, low, wmask=address_mask & 0xFFFFFFFF & ~_BAR_TYPE_BITS)
        if bar.is_64bit:
            self._set(offset + 4, 4, 0, wmask=address_mask >> 32)

    def _build_pm(self, base: int, next_cap: int) -> None:
        self._set(base, 1, CapId.POWER_MANAGEMENT)
        self._set(base + 1, 1, next_cap)
        # PMC: version 011b (PCI PM 1.2), no D1/D2, no PME generation, no aux current.
        self._set(base + PmReg.PMC, 2, 0b011)
        # PMCSR: PowerState (bits 1:0) writable; No_Soft_Reset (bit 3) = 1 promises that
        # D3hot -> D0 keeps all state, which is true here: the function never really leaves D0
        # (see write()). PME_En / PME_Status hardwired 0 since PMC advertises no PME support.
        self._set(base + PmReg.PMCSR, 2, 1 << 3, wmask=0b11)

    def _build_msix(self, base: int, next_cap: int) -> None:
        msix = self.msix
        self._set(base, 1, CapId.MSIX)
        self._set(base + 1, 1, next_cap)
        self._set(
            base + MsixReg.MESSAGE_CONTROL,
            2,
            msix.vectors - 1,
            wmask=MSIX_CONTROL_FUNCTION_MASK | MSIX_CONTROL_ENABLE,
        )
        self._set(base + MsixReg.TABLE, 4, msix.table_offset | msix.table_bir)
        self._set(base + MsixReg.PBA, 4, msix.pba_offset | msix.pba_bir)

    def _build_pcie(self, base: int, next_cap: int) -> None:
        self._set(base, 1, CapId.PCI_EXPRESS)
        self._set(base + 1, 1, next_cap)
        # Capability version 2, Device/Port Type 0000b = PCI Express Endpoint, no slot.
        self._set(base + PcieReg.CAPABILITIES, 2, 0x0002)
        # Device Capabilities: Max_Payload_Size Supported 128 B (000b), Extended Tag (8-bit
        # tags) supported, L0s/L1 acceptable latency "no limit", Role-Based Error Reporting
        # (required since PCIe 1.1), no FLR.
        devcap = (1 << 5) | (0b111 << 6) | (0b111 << 9) | (1 << 15)
        self._set(base + PcieReg.DEVCAP, 4, devcap)
        # Device Control: error reporting enables (bits 3:0), Relaxed Ordering (4), Extended
        # Tag (8), No Snoop (11) and Max_Read_Request_Size (14:12) are RW. Max_Payload_Size
        # may be hardwired to 000b when only 128 B is supported (PCIe r4.0 §7.5.3.4); Phantom
        # Functions, Aux Power PM and Initiate FLR are hardwired 0 as none is supported.
        # Defaults per spec: Relaxed Ordering and No Snoop 1b, MRRS 010b (512 B).
        devctl = (1 << 4) | (1 << 11) | (0b010 << 12)
        devctl_wmask = 0x000F | (1 << 4) | (1 << 8) | (1 << 11) | (0b111 << 12)
        self._set(base + PcieReg.DEVCTL, 2, devctl, wmask=devctl_wmask)
        self._set(base + PcieReg.DEVSTA, 2, 0, w1c=DEVSTA_RW1C)
        # Link Capabilities: speed, width, no ASPM, ASPM Optionality Compliance (bit 22, set
        # by every component built to PCIe 3.0 or later), port number 0.
        lnkcap = _LINK_SPEED_8GT | (_LINK_WIDTH << 4) | (1 << 22)
        self._set(base + PcieReg.LNKCAP, 4, lnkcap)
        # Link Control: ASPM Control (1:0), Read Completion Boundary (3), Common Clock (6) and
        # Extended Synch (7) are RW; the rest is reserved for endpoints or hardwired because
        # the matching capability bit is 0.
        self._set(base + PcieReg.LNKCTL, 2, 0, wmask=0b11 | (1 << 3) | (1 << 6) | (1 << 7))
        # Link Status: trained at full speed and width, Slot Clock Configuration set.
        self._set(base + PcieReg.LNKSTA, 2, _LINK_SPEED_8GT | (_LINK_WIDTH << 4) | (1 << 12))
        # Device Capabilities 2: only Completion Timeout Disable Supported (bit 4); so in
        # Device Control 2 only Completion Timeout Disable is RW, the Completion Timeout Value
        # is hardwired to 0000b (default range) as no ranges are programmable.
        self._set(base + PcieReg.DEVCAP2, 4, 1 << 4)
        self._set(base + PcieReg.DEVCTL2, 2, 0, wmask=1 << 4)
        # Link Capabilities 2: Supported Link Speeds Vector, which Max Link Speed indexes.
        self._set(base + PcieReg.LNKCAP2, 4, _SUPPORTED_LINK_SPEEDS)
        # Link Control 2: Target Link Speed at the maximum. The link is virtual and never
        # retrains, so it is read-only here.
        self._set(base + PcieReg.LNKCTL2, 2, _LINK_SPEED_8GT)
        # Slot and Root registers, Device/Link/Slot Status 2: zero (not applicable).

    # -- accesses ------------------------------------------------------------------------

    @staticmethod
    def _check_access(offset: int, size: int) -> None:
        if size not in (1, 2, 4):
            raise ValueError(f"config access size {size} is not 1, 2 or 4")
        if offset < 0 or offset + size > CONFIG_SPACE_SIZE:
            raise ValueError(
                f"config access of {size} bytes at {offset:#x} is outside 0..{CONFIG_SPACE_SIZE:#x}"
            )

    def read(self, offset: int, size: int) -> int:
        """Read ``size`` (1, 2 or 4) bytes at ``offset``, little-endian."""
        self._check_access(offset, size)
        return int.from_bytes(self._cfg[offset : offset + size], "little")

    def write(self, offset: int, size: int, value: int) -> None:
        """Write ``size`` (1, 2 or 4) bytes at ``offset``: only writable bits change, and a 1
        written to an RW1C bit clears it."""
        self._check_access(offset, size)
        if not 0 <= value < 1 << (8 * size):
            raise ValueError(f"value {value:#x} does not fit in {size} bytes")
        pmcsr = PM_CAP_OFFSET + PmReg.PMCSR
        old_power_state = self._cfg[pmcsr] & 0b11
        cfg, wmask, w1c = self._cfg, self._wmask, self._w1c
        for i, byte in enumerate(value.to_bytes(size, "little")):
            at = offset + i
            kept = cfg[at] & ~wmask[at]
            cfg[at] = (kept | (byte & wmask[at])) & ~(byte & w1c[at]) & 0xFF
        # PowerState: D1 and D2 are not supported, and a write of an unsupported state
        # "completes normally ... the data is discarded and no state change occurs" (PCI PM
        # 1.2 §3.2.4). D3hot is recorded so software reads back what it set, but the function
        # keeps D0 behaviour: it still decodes memory and may master; see power_state.
        if offset <= pmcsr < offset + size and cfg[pmcsr] & 0b11 in (1, 2):
            cfg[pmcsr] = (cfg[pmcsr] & ~0b11) | old_power_state
        if self.on_change is not None:
            self.on_change()

    def enter_d0(self) -> None:
        """PMCSR PowerState back to D0, every other register as it is (what Linux's vfio-pci does
        before a function reset whose config space it then restores)."""
        self._cfg[PM_CAP_OFFSET + PmReg.PMCSR] &= ~0b11

    def reset(self) -> None:
        """Return every register to its power-on value (a conventional reset)."""
        self._cfg[:] = self._power_on
        if self.on_change is not None:
            self.on_change()

    # -- state the device model uses -----------------------------------------------------

    def _word(self, offset: int) -> int:
        return int.from_bytes(self._cfg[offset : offset + 2], "little")

    @property
    def command(self) -> Command:
        return Command(self._word(ConfigReg.COMMAND))

    @property
    def memory_enabled(self) -> bool:
        """Command.Memory Space Enable: the function decodes its memory BARs."""
        return bool(self.command & Command.MEMORY_SPACE)

    @property
    def bus_master(self) -> bool:
        """Command.Bus Master Enable: the function may issue DMA and MSI-X writes."""
        return bool(self.command & Command.BUS_MASTER)

    @property
    def intx_disabled(self) -> bool:
        """Command.Interrupt Disable: the function must not assert INTx."""
        return bool(self.command & Command.INTX_DISABLE)

    @property
    def msix_enabled(self) -> bool:
        return bool(self._word(MSIX_CAP_OFFSET + MsixReg.MESSAGE_CONTROL) & MSIX_CONTROL_ENABLE)

    @property
    def msix_function_masked(self) -> bool:
        """MSI-X Function Mask: every vector is masked regardless of its own mask bit."""
        return bool(self._word(MSIX_CAP_OFFSET + MsixReg.MESSAGE_CONTROL) & MSIX_CONTROL_FUNCTION_MASK)

    @property
    def power_state(self) -> int:
        """PMCSR PowerState as last written (0 = D0, 3 = D3hot). Informational only: the
        function behaves as in D0 in every state."""
        return self._cfg[PM_CAP_OFFSET + PmReg.PMCSR] & 0b11

    @property
    def interrupt_line(self) -> int:
        return self._cfg[ConfigReg.INTERRUPT_LINE]

    def bar_address(self, index: int) -> int:
        """The address programmed into the BAR at ``index`` (type bits stripped), 64-bit for
        a 64-bit BAR. Raises ``ValueError`` when no BAR starts at ``index``."""
        bar = self._bars.get(index)
        if bar is None:
            raise ValueError(f"no BAR at index {index}")
        offset = ConfigReg.BAR0 + 4 * index
        value = int.from_bytes(self._cfg[offset : offset + (8 if bar.is_64bit else 4)], "little")
        return value & ~_BAR_TYPE_BITS

    def set_status(self, bits: Status) -> None:
        """Latch RW1C error bits in the Status register (the device saw an error); software
        clears them by writing 1."""
        if bits & ~STATUS_RW1C:
            raise ValueError(f"{bits!r} are not RW1C Status bits")
        self._set_bits(ConfigReg.STATUS, bits)

    def set_device_status(self, bits: DeviceStatus) -> None:
        """Latch RW1C error bits in the PCI Express Device Status register."""
        if bits & ~DEVSTA_RW1C:
            raise ValueError(f"{bits!r} are not RW1C Device Status bits")
        self._set_bits(PCIE_CAP_OFFSET + PcieReg.DEVSTA, bits)

    def _set_bits(self, offset: int, bits: int) -> None:
        value = self._word(offset) | bits
        self._cfg[offset : offset + 2] = value.to_bytes(2, "little")
