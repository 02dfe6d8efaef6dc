"""The emulated PCI Express configuration space: header, capabilities, BAR sizing, masks."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vnvme.vfio_user.pci import (
    CONFIG_SPACE_SIZE,
    MSIX_CAP_OFFSET,
    PCIE_CAP_OFFSET,
    PM_CAP_OFFSET,
    Bar,
    CapId,
    ConfigReg,
    DeviceStatus,
    MsixConfig,
    MsixReg,
    PciConfig,
    PcieReg,
    PmReg,
    Status,
)

VENDOR, DEVICE, SUBVENDOR, SUBSYS, REV = 0x1B36, 0x0010, 0x1AF4, 0x1100, 0x02
NVME_CLASS = 0x010802

# BAR0: 64-bit 16 KiB (registers + MSI-X PBA); BAR2: 32-bit 4 KiB prefetchable (MSI-X table);
# BAR4: 64-bit prefetchable 8 GiB (wider than the low dword); BAR3 unused.
BARS = (
    Bar(0, 0x4000, is_64bit=True),
    Bar(2, 0x1000, prefetchable=True),
    Bar(4, 1 << 33, is_64bit=True, prefetchable=True),
)
MSIX = MsixConfig(vectors=65, table_bir=2, table_offset=0x0, pba_bir=0, pba_offset=0x3000)


def make(interrupt_pin: int = 1) -> PciConfig:
    return PciConfig(
        vendor_id=VENDOR,
        device_id=DEVICE,
        subsystem_vendor_id=SUBVENDOR,
        subsystem_id=SUBSYS,
        revision=REV,
        class_code=NVME_CLASS,
        bars=BARS,
        msix=MSIX,
        interrupt_pin=interrupt_pin,
    )


def capabilities(cfg: PciConfig) -> list[tuple[int, int]]:
    """Walk the capability list as an OS does: (offset, ID) pairs, guarding against loops."""
    found: list[tuple[int, int]] = []
    pointer = cfg.read(ConfigReg.CAPABILITIES_POINTER, 1)
    while pointer:
        assert 0x40 <= pointer <= 0xFC and pointer % 4 == 0, f"bad capability pointer {pointer:#x}"
        assert len(found) < 48, "capability list does not terminate"
        found.append((pointer, cfg.read(pointer, 1)))
        pointer = cfg.read(pointer + 1, 1)
    return found


def snapshot(cfg: PciConfig) -> bytes:
    return b"".join(cfg.read(o, 4).to_bytes(4, "little") for o in range(0, CONFIG_SPACE_SIZE, 4))


# -- identity and header ---------------------------------------------------------------------


def test_identity_fields() -> None:
    cfg = make()
    assert cfg.read(ConfigReg.VENDOR_ID, 2) == VENDOR
    assert cfg.read(ConfigReg.DEVICE_ID, 2) == DEVICE
    assert cfg.read(0x00, 4) == DEVICE << 16 | VENDOR
    assert cfg.read(ConfigReg.SUBSYSTEM_VENDOR_ID, 2) == SUBVENDOR
    assert cfg.read(ConfigReg.SUBSYSTEM_ID, 2) == SUBSYS
    assert cfg.read(ConfigReg.REVISION_ID, 1) == REV
    assert cfg.read(ConfigReg.HEADER_TYPE, 1) == 0x00
    assert cfg.read(ConfigReg.BIST, 1) == 0
    assert cfg.read(ConfigReg.LATENCY_TIMER, 1) == 0


def test_class_code_bytes() -> None:
    cfg = make()
    # 0x09 programming interface, 0x0A sub-class, 0x0B base class.
    assert [cfg.read(o, 1) for o in (0x09, 0x0A, 0x0B)] == [0x02, 0x08, 0x01]
    assert cfg.read(0x08, 4) == NVME_CLASS << 8 | REV


def test_status_advertises_capability_list() -> None:
    cfg = make()
    assert cfg.read(ConfigReg.STATUS, 2) == Status.CAPABILITIES_LIST
    assert cfg.read(ConfigReg.CAPABILITIES_POINTER, 1) == PM_CAP_OFFSET


def test_interrupt_line_writable_pin_read_only() -> None:
    cfg = make(interrupt_pin=1)
    assert cfg.read(ConfigReg.INTERRUPT_PIN, 1) == 1
    cfg.write(ConfigReg.INTERRUPT_LINE, 2, 0xFF0B)
    assert cfg.read(ConfigReg.INTERRUPT_LINE, 1) == 0x0B
    assert cfg.interrupt_line == 0x0B
    assert cfg.read(ConfigReg.INTERRUPT_PIN, 1) == 1
    assert make(interrupt_pin=0).read(ConfigReg.INTERRUPT_PIN, 1) == 0


def test_read_only_header_ignores_all_ones() -> None:
    cfg = make()
    before = snapshot(cfg)
    for offset in range(0, 0x40, 4):
        cfg.write(offset, 4, 0xFFFFFFFF)
    after = snapshot(cfg)
    writable = {0x04, 0x05, 0x0C, 0x3C} | set(range(0x10, 0x28))  # Command, CLS, Int Line, BARs
    for offset in set(range(0x40)) - writable:
        assert after[offset] == before[offset], f"read-only byte {offset:#x} changed"
    assert cfg.read(ConfigReg.STATUS, 2) == Status.CAPABILITIES_LIST
    assert cfg.read(ConfigReg.CACHE_LINE_SIZE, 1) == 0xFF


# -- capabilities ----------------------------------------------------------------------------


def test_capability_walk_finds_pm_msix_pcie_and_terminates() -> None:
    assert capabilities(make()) == [
        (PM_CAP_OFFSET, CapId.POWER_MANAGEMENT),
        (MSIX_CAP_OFFSET, CapId.MSIX),
        (PCIE_CAP_OFFSET, CapId.PCI_EXPRESS),
    ]


def test_capability_structures_do_not_overlap() -> None:
    ends = {PM_CAP_OFFSET: PM_CAP_OFFSET + 8, MSIX_CAP_OFFSET: MSIX_CAP_OFFSET + 12}
    assert ends[PM_CAP_OFFSET] <= MSIX_CAP_OFFSET
    assert ends[MSIX_CAP_OFFSET] <= PCIE_CAP_OFFSET
    assert PCIE_CAP_OFFSET + 0x3C <= 0x100


def test_power_management_capability() -> None:
    cfg = make()
    pmc = cfg.read(PM_CAP_OFFSET + PmReg.PMC, 2)
    assert pmc & 0b111 == 3  # version 3 (PCI PM 1.2)
    assert pmc & (0b11 << 9) == 0  # no D1 / D2
    assert pmc >> 11 == 0  # no PME
    pmcsr = PM_CAP_OFFSET + PmReg.PMCSR
    assert cfg.read(pmcsr, 2) == 1 << 3  # D0, No_Soft_Reset
    assert cfg.power_state == 0


def test_power_state_d3hot_recorded_d1_d2_discarded() -> None:
    cfg = make()
    pmcsr = PM_CAP_OFFSET + PmReg.PMCSR
    cfg.write(ConfigReg.COMMAND, 2, 0x0006)
    cfg.write(pmcsr, 2, 3)
    assert cfg.read(pmcsr, 2) == 1 << 3 | 3 and cfg.power_state == 3
    assert cfg.memory_enabled and cfg.bus_master  # D0 behaviour throughout
    cfg.write(pmcsr, 2, 1)  # D1 unsupported: the write is discarded
    assert cfg.power_state == 3
    cfg.write(pmcsr, 1, 0)
    assert cfg.power_state == 0
    cfg.write(pmcsr, 1, 2)  # D2 unsupported
    assert cfg.power_state == 0
    cfg.write(pmcsr, 2, 0xFFFF)  # PowerState 11b; PME and No_Soft_Reset bits read-only
    assert cfg.read(pmcsr, 2) == 1 << 3 | 3


def test_msix_capability_decoding() -> None:
    cfg = make()
    control = cfg.read(MSIX_CAP_OFFSET + MsixReg.MESSAGE_CONTROL, 2)
    assert control & 0x7FF == MSIX.vectors - 1
    assert control >> 14 == 0
    table = cfg.read(MSIX_CAP_OFFSET + MsixReg.TABLE, 4)
    assert (table & 0x7, table & ~0x7) == (2, 0x0)
    pba = cfg.read(MSIX_CAP_OFFSET + MsixReg.PBA, 4)
    assert (pba & 0x7, pba & ~0x7) == (0, 0x3000)


def test_msix_control_writable_bits_only() -> None:
    cfg = make()
    base = MSIX_CAP_OFFSET
    cfg.write(base, 4, 0xFFFFFFFF)  # ID, next, Message Control in one dword
    assert cfg.read(base, 2) == (PCIE_CAP_OFFSET << 8) | CapId.MSIX
    assert cfg.read(base + MsixReg.MESSAGE_CONTROL, 2) == 0xC000 | (MSIX.vectors - 1)
    assert cfg.msix_enabled and cfg.msix_function_masked
    cfg.write(base + MsixReg.MESSAGE_CONTROL + 1, 1, 0x80)  # byte write: enable, unmask
    assert cfg.msix_enabled and not cfg.msix_function_masked
    cfg.write(base + MsixReg.MESSAGE_CONTROL, 2, 0x4000)
    assert not cfg.msix_enabled and cfg.msix_function_masked
    for reg in (MsixReg.TABLE, MsixReg.PBA):
        before = cfg.read(base + reg, 4)
        cfg.write(base + reg, 4, 0xFFFFFFFF)
        assert cfg.read(base + reg, 4) == before


def test_pci_express_capability() -> None:
    cfg = make()
    base = PCIE_CAP_OFFSET
    caps = cfg.read(base + PcieReg.CAPABILITIES, 2)
    assert caps & 0xF == 2  # capability version 2
    assert (caps >> 4) & 0xF == 0  # PCI Express Endpoint
    devcap = cfg.read(base + PcieReg.DEVCAP, 4)
    assert devcap & 0b111 == 0  # MPS supported: 128 B
    assert devcap & (1 << 15)  # Role-Based Error Reporting
    assert not devcap & (1 << 28)  # no FLR
    lnkcap = cfg.read(base + PcieReg.LNKCAP, 4)
    lnksta = cfg.read(base + PcieReg.LNKSTA, 2)
    speed, width = lnkcap & 0xF, (lnkcap >> 4) & 0x3F
    assert speed >= 1 and width in (1, 2, 4, 8, 16)
    assert (lnksta & 0xF, (lnksta >> 4) & 0x3F) == (speed, width)
    lnkcap2 = cfg.read(base + PcieReg.LNKCAP2, 4)
    assert lnkcap2 & (1 << speed)  # the max speed is in the Supported Link Speeds Vector
    devcap2 = cfg.read(base + PcieReg.DEVCAP2, 4)
    assert devcap2 & (1 << 4)  # Completion Timeout Disable supported
    # Device Control defaults: Relaxed Ordering, No Snoop, MRRS 512 B.
    assert cfg.read(base + PcieReg.DEVCTL, 2) == (1 << 4) | (1 << 11) | (0b010 << 12)


def test_pcie_control_registers_write_masks() -> None:
    cfg = make()
    base = PCIE_CAP_OFFSET
    cfg.write(base + PcieReg.DEVCTL, 2, 0xFFFF)
    # MPS (7:5), Phantom (9), Aux Power (10) and Initiate FLR (15) are hardwired 0.
    assert cfg.read(base + PcieReg.DEVCTL, 2) == 0x79FF & ~(0b111 << 5)
    cfg.write(base + PcieReg.DEVCTL2, 2, 0xFFFF)
    assert cfg.read(base + PcieReg.DEVCTL2, 2) == 1 << 4
    cfg.write(base + PcieReg.LNKCTL, 2, 0xFFFF)
    assert cfg.read(base + PcieReg.LNKCTL, 2) == 0x00CB
    for reg, size in (
        (PcieReg.CAPABILITIES, 2),
        (PcieReg.DEVCAP, 4),
        (PcieReg.LNKCAP, 4),
        (PcieReg.LNKSTA, 2),
        (PcieReg.DEVCAP2, 4),
        (PcieReg.LNKCAP2, 4),
        (PcieReg.LNKCTL2, 2),
    ):
        before = cfg.read(base + reg, size)
        cfg.write(base + reg, size, (1 << (8 * size)) - 1)
        assert cfg.read(base + reg, size) == before, reg.name


def test_extended_space_reads_zero() -> None:
    cfg = make()
    assert cfg.read(0x100, 4) == 0  # empty extended capability header: ID 0, version 0, next 0
    for offset in range(0x100, CONFIG_SPACE_SIZE, 4):
        cfg.write(offset, 4, 0xFFFFFFFF)
    assert all(cfg.read(o, 4) == 0 for o in range(0x100, CONFIG_SPACE_SIZE, 4))
    assert cfg.read(CONFIG_SPACE_SIZE - 1, 1) == 0


# -- BARs ------------------------------------------------------------------------------------


def bar_reg(index: int) -> int:
    return ConfigReg.BAR0 + 4 * index


def test_bar_type_bits_at_power_on() -> None:
    cfg = make()
    assert cfg.read(bar_reg(0), 4) == 0b0100  # memory, 64-bit, not prefetchable
    assert cfg.read(bar_reg(2), 4) == 0b1000  # memory, 32-bit, prefetchable
    assert cfg.read(bar_reg(4), 4) == 0b1100  # memory, 64-bit, prefetchable
    assert [cfg.read(bar_reg(i), 4) for i in (1, 3, 5)] == [0, 0, 0]
    assert [cfg.bar_address(i) for i in (0, 2, 4)] == [0, 0, 0]


def test_bar_sizing_32bit() -> None:
    cfg = make()
    cfg.write(bar_reg(2), 4, 0xFFFFFFFF)
    assert cfg.read(bar_reg(2), 4) == 0xFFFFF008
    size_mask = cfg.read(bar_reg(2), 4) & ~0xF
    assert (~size_mask & 0xFFFFFFFF) + 1 == 0x1000
    cfg.write(bar_reg(2), 4, 0xFEBF1000)
    assert cfg.read(bar_reg(2), 4) == 0xFEBF1008
    assert cfg.bar_address(2) == 0xFEBF1000
    cfg.write(bar_reg(2), 4, 0xFEBF1234)  # low bits below the size cannot be set
    assert cfg.bar_address(2) == 0xFEBF1000


def test_bar_sizing_64bit() -> None:
    cfg = make()
    lo, hi = bar_reg(0), bar_reg(0) + 4
    cfg.write(lo, 4, 0xFFFFFFFF)
    cfg.write(hi, 4, 0xFFFFFFFF)
    assert cfg.read(lo, 4) == 0xFFFFC004
    assert cfg.read(hi, 4) == 0xFFFFFFFF
    size = ((cfg.read(hi, 4) << 32 | cfg.read(lo, 4)) & ~0xF) ^ ((1 << 64) - 1)
    assert size + 1 == 0x4000
    cfg.write(lo, 4, 0xFE800000)
    cfg.write(hi, 4, 0x00000001)
    assert cfg.read(lo, 4) == 0xFE800004
    assert cfg.bar_address(0) == 0x1_FE80_0000


def test_bar_sizing_64bit_larger_than_4g() -> None:
    cfg = make()
    lo, hi = bar_reg(4), bar_reg(4) + 4
    cfg.write(lo, 4, 0xFFFFFFFF)
    cfg.write(hi, 4, 0xFFFFFFFF)
    assert cfg.read(lo, 4) == 0x0000000C  # no writable address bits in the low dword
    assert cfg.read(hi, 4) == 0xFFFFFFFE  # 8 GiB
    cfg.write(hi, 4, 0x0000000B)  # 0xB_0000_0000 is not 8 GiB aligned
    assert cfg.bar_address(4) == 0xA_0000_0000


def test_unused_bars_and_rom_ignore_writes() -> None:
    cfg = make()
    for offset in (bar_reg(3), ConfigReg.EXPANSION_ROM, ConfigReg.CARDBUS_CIS):
        cfg.write(offset, 4, 0xFFFFFFFF)
        assert cfg.read(offset, 4) == 0
    cfg.write(ConfigReg.EXPANSION_ROM, 4, 0xFEC00001)  # ROM enable + address: still nothing
    assert cfg.read(ConfigReg.EXPANSION_ROM, 4) == 0


def test_bar_address_of_non_bar_index() -> None:
    cfg = make()
    for index in (1, 3, 5, 6, -1):
        with pytest.raises(ValueError):
            cfg.bar_address(index)


# -- Command / Status ------------------------------------------------------------------------


def test_command_bits() -> None:
    cfg = make()
    assert not (cfg.memory_enabled or cfg.bus_master or cfg.intx_disabled)
    cfg.write(ConfigReg.COMMAND, 2, 0xFFFF)
    # MSE, BME, Parity Error Response, SERR# Enable, Interrupt Disable; no I/O space.
    assert cfg.read(ConfigReg.COMMAND, 2) == 0x0546
    assert cfg.memory_enabled and cfg.bus_master and cfg.intx_disabled
    cfg.write(ConfigReg.COMMAND, 1, 0x02)  # low byte only: BME off, INTx Disable kept
    assert cfg.memory_enabled and not cfg.bus_master and cfg.intx_disabled
    cfg.write(ConfigReg.COMMAND, 2, 0x0004)
    assert not cfg.memory_enabled and cfg.bus_master and not cfg.intx_disabled


def test_command_write_leaves_status_alone() -> None:
    cfg = make()
    cfg.set_status(Status.RECEIVED_MASTER_ABORT)
    cfg.write(ConfigReg.COMMAND, 4, 0x00000006)  # dword write: zeroes in the Status half
    assert cfg.read(ConfigReg.STATUS, 2) == Status.CAPABILITIES_LIST | Status.RECEIVED_MASTER_ABORT


def test_status_rw1c() -> None:
    cfg = make()
    errors = Status.DETECTED_PARITY_ERROR | Status.SIGNALED_TARGET_ABORT | Status.MASTER_DATA_PARITY_ERROR
    cfg.write(ConfigReg.STATUS, 2, errors)  # writing 1 cannot set an RW1C bit
    assert cfg.read(ConfigReg.STATUS, 2) == Status.CAPABILITIES_LIST
    cfg.set_status(errors)
    assert cfg.read(ConfigReg.STATUS, 2) == Status.CAPABILITIES_LIST | errors
    cfg.write(ConfigReg.STATUS, 2, 0)  # writing 0 changes nothing
    assert cfg.read(ConfigReg.STATUS, 2) == Status.CAPABILITIES_LIST | errors
    cfg.write(ConfigReg.STATUS, 2, Status.SIGNALED_TARGET_ABORT | Status.CAPABILITIES_LIST)
    remaining = Status.DETECTED_PARITY_ERROR | Status.MASTER_DATA_PARITY_ERROR
    assert cfg.read(ConfigReg.STATUS, 2) == Status.CAPABILITIES_LIST | remaining
    cfg.write(ConfigReg.STATUS, 2, 0xFFFF)
    assert cfg.read(ConfigReg.STATUS, 2) == Status.CAPABILITIES_LIST
    with pytest.raises(ValueError):
        cfg.set_status(Status.CAPABILITIES_LIST)


def test_device_status_rw1c() -> None:
    cfg = make()
    devsta = PCIE_CAP_OFFSET + PcieReg.DEVSTA
    cfg.set_device_status(DeviceStatus.UNSUPPORTED_REQUEST | DeviceStatus.CORRECTABLE_ERROR)
    assert cfg.read(devsta, 2) == 0b1001
    cfg.write(devsta, 2, DeviceStatus.CORRECTABLE_ERROR)
    assert cfg.read(devsta, 2) == DeviceStatus.UNSUPPORTED_REQUEST
    cfg.write(devsta, 2, 0xFFFF)
    assert cfg.read(devsta, 2) == 0
    # Device Control shares the dword: a dword write to it does not touch Device Status.
    cfg.set_device_status(DeviceStatus.FATAL_ERROR)
    cfg.write(PCIE_CAP_OFFSET + PcieReg.DEVCTL, 4, 0x0000_2810)
    assert cfg.read(devsta, 2) == DeviceStatus.FATAL_ERROR


# -- accesses --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("offset", "size"),
    [(0, 0), (0, 3), (0, 8), (-1, 1), (-2, 4), (4096, 1), (4095, 2), (4094, 4), (4093, 4)],
)
def test_bad_accesses_raise(offset: int, size: int) -> None:
    cfg = make()
    with pytest.raises(ValueError):
        cfg.read(offset, size)
    with pytest.raises(ValueError):
        cfg.write(offset, size, 0)


def test_value_must_fit_the_access() -> None:
    cfg = make()
    for size, value in ((1, 0x100), (2, 0x10000), (4, 1 << 32), (4, -1)):
        with pytest.raises(ValueError):
            cfg.write(ConfigReg.INTERRUPT_LINE, size, value)


def test_unaligned_accesses_inside_the_space() -> None:
    cfg = make()
    assert cfg.read(0x01, 2) == (DEVICE & 0xFF) << 8 | VENDOR >> 8
    assert cfg.read(0x0A, 4) == cfg.read(0x0A, 2) | cfg.read(0x0C, 2) << 16
    cfg.write(0x03, 2, 0xFFFF)  # straddles Device ID and the Command low byte
    assert cfg.read(ConfigReg.DEVICE_ID, 2) == DEVICE
    assert cfg.read(ConfigReg.COMMAND, 2) == 0x0046
    assert cfg.read(CONFIG_SPACE_SIZE - 4, 4) == 0


# -- reset -----------------------------------------------------------------------------------


def test_reset_restores_power_on_values() -> None:
    cfg = make()
    power_on = snapshot(cfg)
    cfg.write(ConfigReg.COMMAND, 2, 0xFFFF)
    cfg.write(ConfigReg.INTERRUPT_LINE, 1, 0x0A)
    cfg.write(ConfigReg.CACHE_LINE_SIZE, 1, 0x10)
    cfg.write(bar_reg(0), 4, 0xFE800000)
    cfg.write(bar_reg(0) + 4, 4, 0x1)
    cfg.write(bar_reg(2), 4, 0xFFFFFFFF)
    cfg.write(MSIX_CAP_OFFSET + MsixReg.MESSAGE_CONTROL, 2, 0xC000)
    cfg.write(PM_CAP_OFFSET + PmReg.PMCSR, 2, 3)
    cfg.write(PCIE_CAP_OFFSET + PcieReg.DEVCTL, 2, 0xFFFF)
    cfg.set_status(Status.RECEIVED_TARGET_ABORT)
    cfg.set_device_status(DeviceStatus.FATAL_ERROR)
    assert snapshot(cfg) != power_on
    cfg.reset()
    assert snapshot(cfg) == power_on
    assert cfg.read(ConfigReg.COMMAND, 2) == 0
    assert not (cfg.memory_enabled or cfg.bus_master or cfg.msix_enabled or cfg.msix_function_masked)
    assert [cfg.bar_address(i) for i in (0, 2, 4)] == [0, 0, 0]
    assert cfg.power_state == 0


# -- construction ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("index", "size", "is_64bit"),
    [(6, 0x1000, False), (5, 0x1000, True), (-1, 0x1000, False), (0, 8, False), (0, 0x1800, False)]
    + [(0, 1 << 32, False), (0, 1 << 64, True)],
)
def test_invalid_bars_rejected(index: int, size: int, is_64bit: bool) -> None:
    with pytest.raises(ValueError):
        Bar(index, size, is_64bit=is_64bit)


def test_bar_extremes_accepted() -> None:
    assert Bar(5, 16).size == 16
    assert Bar(0, 1 << 31).size == 1 << 31
    assert Bar(4, 1 << 63, is_64bit=True).slots == range(4, 6)


def _build(bars: tuple[Bar, ...] = BARS, msix: MsixConfig = MSIX, **identity: int) -> PciConfig:
    ids = {
        "vendor_id": VENDOR,
        "device_id": DEVICE,
        "subsystem_vendor_id": SUBVENDOR,
        "subsystem_id": SUBSYS,
        "revision": REV,
        "class_code": NVME_CLASS,
    } | identity
    return PciConfig(bars=bars, msix=msix, **ids)


def test_invalid_configurations_rejected() -> None:
    with pytest.raises(ValueError, match="slot 1"):
        _build(bars=(Bar(0, 0x4000, is_64bit=True), Bar(1, 0x1000)))
    with pytest.raises(ValueError, match="BIR 3"):
        _build(msix=MsixConfig(4, table_bir=3, table_offset=0, pba_bir=0, pba_offset=0x3000))
    with pytest.raises(ValueError, match="BIR 1"):  # the upper half of a 64-bit BAR
        _build(msix=MsixConfig(4, table_bir=0, table_offset=0, pba_bir=1, pba_offset=0))
    with pytest.raises(ValueError, match="overflows"):
        _build(msix=MsixConfig(65, table_bir=2, table_offset=0xC00, pba_bir=0, pba_offset=0x3000))
    with pytest.raises(ValueError, match="overlap"):
        _build(msix=MsixConfig(65, table_bir=0, table_offset=0x2000, pba_bir=0, pba_offset=0x2400))
    with pytest.raises(ValueError):
        _build(vendor_id=0x10000)
    with pytest.raises(ValueError):
        _build(subsystem_id=-1)
    with pytest.raises(ValueError):
        _build(revision=0x100)
    with pytest.raises(ValueError):
        _build(class_code=1 << 24)
    with pytest.raises(ValueError):
        make(interrupt_pin=5)
    for bad in (
        {"vectors": 0},
        {"vectors": 2049},
        {"table_offset": 0x1004},
        {"pba_offset": -8},
    ):
        fields = {"vectors": 4, "table_bir": 0, "table_offset": 0, "pba_bir": 0, "pba_offset": 0x800} | bad
        with pytest.raises(ValueError):
            MsixConfig(**fields)


# -- property --------------------------------------------------------------------------------

_SIZES = st.sampled_from([1, 2, 4])


@st.composite
def _accesses(draw: st.DrawFn) -> tuple[int, int, int]:
    size = draw(_SIZES)
    # Mostly the interesting first 256 bytes, sometimes anywhere.
    limit = draw(st.sampled_from([0x100, CONFIG_SPACE_SIZE])) - size
    offset = draw(st.integers(0, limit))
    value = draw(st.one_of(st.just((1 << (8 * size)) - 1), st.integers(0, (1 << (8 * size)) - 1)))
    return offset, size, value


def _read_only_bytes() -> list[int]:
    """Identity, class code, header type, the capability pointer and each capability's ID and
    next pointer, the MSI-X Table/PBA registers and the BAR type bits."""
    offsets = [0x00, 0x01, 0x02, 0x03, 0x08, 0x09, 0x0A, 0x0B, 0x0E, 0x2C, 0x2D, 0x2E, 0x2F, 0x34, 0x3D]
    for cap in (PM_CAP_OFFSET, MSIX_CAP_OFFSET, PCIE_CAP_OFFSET):
        offsets += [cap, cap + 1]
    offsets += range(MSIX_CAP_OFFSET + MsixReg.TABLE, MSIX_CAP_OFFSET + MsixReg.PBA + 4)
    return offsets


@given(st.lists(_accesses(), max_size=40))
def test_random_writes_never_raise_nor_touch_read_only_bytes(writes: list[tuple[int, int, int]]) -> None:
    cfg = make()
    ro = _read_only_bytes()
    before = [cfg.read(o, 1) for o in ro]
    bar_types = [cfg.read(bar_reg(i), 1) & 0xF for i in range(6)]
    for offset, size, value in writes:
        cfg.write(offset, size, value)
        assert 0 <= cfg.read(offset, size) < 1 << (8 * size)
    assert [cfg.read(o, 1) for o in ro] == before
    assert [cfg.read(bar_reg(i), 1) & 0xF for i in range(6)] == bar_types
    assert capabilities(cfg) == [(PM_CAP_OFFSET, 0x01), (MSIX_CAP_OFFSET, 0x11), (PCIE_CAP_OFFSET, 0x10)]
    assert cfg.read(MSIX_CAP_OFFSET + MsixReg.MESSAGE_CONTROL, 2) & 0x7FF == MSIX.vectors - 1
    assert cfg.read(ConfigReg.STATUS, 2) & Status.CAPABILITIES_LIST
    assert cfg.power_state in (0, 3)
    for bar in BARS:  # programmed addresses stay size-aligned
        assert cfg.bar_address(bar.index) % bar.size == 0
    assert all(cfg.read(o, 4) == 0 for o in range(0x100, CONFIG_SPACE_SIZE, 4))
