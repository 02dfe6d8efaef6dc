"""Controller registers (NVMe 1.4 §3.1) as a host sees them through BAR0: CAP and VS, access
widths, CC.EN / CSTS.RDY, bad enable values (CSTS.CFS), shutdown, NVM Subsystem Reset,
INTMS / INTMC, read-only registers and doorbell writes the controller must refuse.

Guest mistakes are never exceptions: every access below returns, and the refusals are visible
as statuses, asynchronous events and ``pci_nvme_err_*`` trace events.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from host import Rig, make_rig
from vnvme.controller.config import ControllerConfig
from vnvme.controller.namespace import Namespace, NullBackend, RamBackend
from vnvme.driver.transport import PAGE_SIZE, DmaBuffer
from vnvme.effects import Effect, RaiseInterrupt, TraceEvent
from vnvme.spec import registers as regs
from vnvme.spec.commands import (
    CQE_SIZE,
    SQE,
    SQE_SIZE,
    AdminOpcode,
    AsyncEventErrorInfo,
    AsyncEventType,
    Cns,
    Cqe,
    LogPageId,
    NvmOpcode,
    Sqe,
    async_event_dw0,
    unpack_cqe,
)
from vnvme.spec.identify import IDENTIFY_CONTROLLER
from vnvme.spec.registers import (
    AQA,
    CAP,
    CC,
    CSTS,
    NSSR_MAGIC,
    Field,
    Reg,
    ShutdownNotification,
    ShutdownStatus,
    compose,
    cq_head_doorbell,
    sq_tail_doorbell,
)
from vnvme.spec.status import DNR, Status

_UNMAPPED = 0x10_0000_0000
_GOOD_CC: dict[str, int] = {"EN": 1, "IOSQES": 6, "IOCQES": 4}
_CC_FIELDS: dict[str, Field] = {
    f.name: f for f in (CC.EN, CC.CSS, CC.MPS, CC.AMS, CC.SHN, CC.IOSQES, CC.IOCQES)
}


def _cc(**fields: int) -> int:
    values = {**_GOOD_CC, **fields}
    return compose(*((_CC_FIELDS[name], value) for name, value in values.items()))


def _errors(rig: Rig, name: str = "pci_nvme_err_mmio") -> list[tuple[int | str, ...]]:
    return [e.args for e in rig.trace.named(name)]


def _traces(effects: list[Effect], name: str) -> list[tuple[int | str, ...]]:
    return [e.args for e in effects if isinstance(e, TraceEvent) and e.name == name]


class RawHost:
    """A host with no driver: programs AQA / ASQ / ACQ and CC itself and runs the admin queue by
    hand, through the in-process transport (so the controller runs after every write)."""

    def __init__(self, rig: Rig, depth: int = 8, *, align: int = 1 << 16) -> None:
        self.rig = rig
        self.depth = depth
        self.sq, self.sq_skip = self._alloc(depth * SQE_SIZE, align)
        self.cq, self.cq_skip = self._alloc(depth * CQE_SIZE, align)
        self.sq_addr, self.cq_addr = self.sq.addr + self.sq_skip, self.cq.addr + self.cq_skip
        self.tail = self.head = 0
        self.phase = 1
        self.dstrd = CAP.DSTRD.get(self.read(Reg.CAP, 8))

    def _alloc(self, size: int, align: int) -> tuple[DmaBuffer, int]:
        """Queue memory aligned for any memory page size a test may pick (CC.MPS)."""
        buf = self.rig.host_memory.alloc(size + align)
        return buf, -buf.addr % align

    def read(self, offset: int, size: int = 4) -> int:
        return self.rig.transport.mmio_read(offset, size)

    def write(self, offset: int, value: int, size: int = 4) -> None:
        self.rig.transport.mmio_write(offset, size, value)

    def program(self, *, aqa: int | None = None, asq: int | None = None, acq: int | None = None) -> None:
        entries = self.depth - 1
        self.write(Reg.AQA, compose((AQA.ASQS, entries), (AQA.ACQS, entries)) if aqa is None else aqa)
        self.write(Reg.ASQ, self.sq_addr if asq is None else asq, 8)
        self.write(Reg.ACQ, self.cq_addr if acq is None else acq, 8)

    def enable(self, **cc_fields: int) -> int:
        """Write CC (EN = 1 and the given fields); the in-process controller is done at once."""
        self.write(Reg.CC, _cc(**cc_fields))
        return self.read(Reg.CSTS)

    def command(self, sqe: Sqe) -> Cqe:
        SQE.pack_into(self.sq.view, self.sq_skip + self.tail * SQE_SIZE, *sqe)
        self.tail = (self.tail + 1) % self.depth
        self.write(sq_tail_doorbell(0, self.dstrd), self.tail)
        cqe = unpack_cqe(self.cq.view, self.cq_skip + self.head * CQE_SIZE)
        assert cqe.phase == self.phase, "no completion"
        self.head = (self.head + 1) % self.depth
        if self.head == 0:
            self.phase ^= 1
        self.write(cq_head_doorbell(0, self.dstrd), self.head)
        return cqe

    def identify_controller(self) -> dict[str, int]:
        buf = self.rig.host_memory.alloc(PAGE_SIZE)
        try:
            cqe = self.command(Sqe(AdminOpcode.IDENTIFY, 0, 7, 0, 0, 0, 0, buf.addr, 0, Cns.CONTROLLER))
            assert cqe.status == Status.SUCCESS
            return IDENTIFY_CONTROLLER.unpack(bytes(buf.view))
        finally:
            self.rig.host_memory.free(buf)


@pytest.fixture
def bare() -> Iterator[Rig]:
    """A controller nobody has enabled yet."""
    r = make_rig(probe=False)
    try:
        yield r
    finally:
        r.close()


# Section: CAP and VS


@pytest.mark.parametrize(
    "config",
    [
        ControllerConfig(),
        ControllerConfig(
            max_queue_entries=256, timeout_500ms=7, dstrd=2, mps_min=1, mps_max=3, nssr_supported=False
        ),
        ControllerConfig(max_queue_entries=65536, timeout_500ms=255, dstrd=0, mps_min=0, mps_max=0),
    ],
    ids=["default", "custom", "extremes"],
)
def test_cap_fields_match_the_configuration(config: ControllerConfig) -> None:
    r = make_rig(config=config, probe=False)
    try:
        cap = r.transport.mmio_read(Reg.CAP, 8)
        assert CAP.MQES.get(cap) == config.max_queue_entries - 1  # zero-based
        assert CAP.CQR.get(cap) == 1  # physically contiguous queues required
        assert CAP.AMS.get(cap) == 0  # round robin only
        assert CAP.TO.get(cap) == config.timeout_500ms
        assert CAP.DSTRD.get(cap) == config.dstrd
        assert CAP.NSSRS.get(cap) == int(config.nssr_supported)
        assert CAP.CSS.get(cap) == 0x01  # NVM command set only
        assert CAP.BPS.get(cap) == 0
        assert CAP.MPSMIN.get(cap) == config.mps_min
        assert CAP.MPSMAX.get(cap) == config.mps_max
        assert cap >> 56 == 0  # CMBS, PMRS and the rest: reserved / not supported
    finally:
        r.close()


def test_driver_follows_a_nondefault_cap() -> None:
    """A doorbell stride of 16 bytes and a smaller MQES: the driver sizes and rings accordingly."""
    r = make_rig(config=ControllerConfig(dstrd=2, max_queue_entries=128, mps_min=0))
    try:
        assert r.driver.dstrd == 2
        qp = r.driver.queue(1)
        assert qp.depth == 128
        assert qp.sq_db == 0x1000 + 2 * 1 * 16 and qp.cq_db == 0x1000 + 3 * 16
        r.driver.write(1, 0, b"\x42" * 512)
        assert r.driver.read(1, 0, 1) == b"\x42" * 512
    finally:
        r.close()


def test_version_is_1_3(bare: Rig) -> None:
    vs = bare.transport.mmio_read(Reg.VS, 4)
    assert vs == regs.version(1, 3, 0) == regs.NVME_VERSION_1_3 == 0x00010300
    host = RawHost(bare)
    host.program()
    assert CSTS.RDY.get(host.enable())
    assert host.identify_controller()["ver"] == vs


# Section: access widths


def test_64_bit_registers_read_whole_or_in_halves(rig: Rig) -> None:
    read = rig.transport.mmio_read
    assert rig.driver.admin is not None
    for reg, expected in (
        (Reg.CAP, rig.controller.cap),
        (Reg.ASQ, rig.driver.admin.sq_mem.addr),
        (Reg.ACQ, rig.driver.admin.cq_mem.addr),
    ):
        assert expected >> 32, "the upper dword is in use"
        assert read(reg, 8) == expected
        assert read(reg, 4) == expected & 0xFFFFFFFF
        assert read(reg + 4, 4) == expected >> 32
    # Narrower aligned reads pick bytes out of the dword, little-endian.
    assert [read(Reg.VS + i, 1) for i in range(4)] == [0x00, 0x03, 0x01, 0x00]
    assert read(Reg.VS, 2) == 0x0300 and read(Reg.VS + 2, 2) == 0x0001
    assert _errors(rig) == []


@pytest.mark.parametrize(
    ("offset", "size"),
    [
        (Reg.CAP, 3),
        (Reg.CAP, 16),
        (Reg.CAP, 0),
        (Reg.CAP + 2, 4),
        (Reg.ASQ + 4, 8),
        (Reg.VS + 1, 2),
        (-4, 4),
        (-8, 8),
    ],
)
def test_illegal_read_width_or_alignment_reads_zero(rig: Rig, offset: int, size: int) -> None:
    reads = rig.controller.statistics().register_reads
    assert rig.transport.mmio_read(offset, size) == 0
    assert _errors(rig) == [(offset, size, 0, "unsupported read width or alignment")]
    assert rig.controller.statistics().register_reads == reads  # not counted as a register read


@pytest.mark.parametrize("offset", [0x40, 0x3C, 0xF00, 0xFFC, 0x1000, 0x1004, 0x2000, 1 << 40])
def test_reserved_registers_and_doorbells_read_as_zero(rig: Rig, offset: int) -> None:
    assert rig.transport.mmio_read(offset, 4) == 0
    assert _errors(rig) == []


def test_64_bit_admin_queue_registers_write_whole_or_in_halves(bare: Rig) -> None:
    host = RawHost(bare)
    host.write(Reg.ASQ, 0x1_2345_6000, 8)
    assert host.read(Reg.ASQ, 8) == 0x1_2345_6000
    # Bits 11:0 of ASQ / ACQ are reserved: the controller keeps them zero.
    host.write(Reg.ACQ, 0x9876_5FFF)
    host.write(Reg.ACQ + 4, 0x2)
    assert host.read(Reg.ACQ, 8) == 0x2_9876_5000
    host.write(Reg.AQA, 0xFFFF_FFFF)
    assert host.read(Reg.AQA) == AQA.ASQS.mask | AQA.ACQS.mask  # reserved bits stay zero
    assert _errors(bare) == []


@pytest.mark.parametrize(
    ("offset", "size", "reason"),
    [
        (Reg.CC, 2, "unsupported write width or alignment"),
        (Reg.CC, 1, "unsupported write width or alignment"),
        (Reg.CC, 8, "unsupported write width or alignment"),  # not 8-byte aligned
        (Reg.CC + 2, 4, "unsupported write width or alignment"),
        (Reg.VS, 8, "64-bit write to a 32-bit register"),
        (Reg.NSSR, 8, "64-bit write to a 32-bit register"),
        (-4, 4, "unsupported write width or alignment"),
        (0x1000, 8, "doorbell writes are 32-bit"),
        (0x1000, 2, "doorbell writes are 32-bit"),
    ],
)
def test_illegal_write_width_or_alignment_is_ignored(rig: Rig, offset: int, size: int, reason: str) -> None:
    """Each of these would do something if taken: enable / reset, NVM Subsystem Reset, a tail."""
    value = NSSR_MAGIC if offset == Reg.NSSR else (0 if offset >= 0x1000 else 0xFFFF_FFFF)
    csts, cc = rig.controller.csts, rig.controller.cc
    writes = rig.controller.statistics().register_writes
    rig.transport.mmio_write(offset, size, value)
    assert _errors(rig) == [(offset, size, value, reason)]
    assert (rig.controller.csts, rig.controller.cc) == (csts, cc)
    assert rig.controller.statistics().register_writes == writes
    assert not rig.controller.fatal
    rig.driver.write(1, 0, b"\x11" * 512)  # still up


@pytest.mark.parametrize("size", [0, 1, 2, 3, 4, 5, 8, 16])
@pytest.mark.parametrize("offset", [-1, 0, 3, Reg.CC, Reg.NSSR, 0xFFF, 0x1000, 0x1003, 0x3FFC, 1 << 33])
def test_no_access_raises(offset: int, size: int) -> None:
    r = make_rig(trace=("pci_nvme_err_*",))
    try:
        r.controller.mmio_read(offset, size)
        r.controller.mmio_write(offset, size, 0)
        r.controller.mmio_write(offset, size, 1 << 70)
        assert not r.controller.fatal
        assert r.controller.statistics().internal_errors == 0
    finally:
        r.close()


# Section: CC.EN, CSTS.RDY and CSTS.CFS


def test_enable_and_disable_move_csts_rdy(bare: Rig) -> None:
    host = RawHost(bare)
    assert host.read(Reg.CSTS) == 0 and host.read(Reg.CC) == 0
    host.program()
    csts = host.enable()
    assert csts == compose((CSTS.RDY, 1))
    assert bare.trace.named("pci_nvme_mmio_start_success")
    assert bare.controller.sqs[0] is not None and bare.controller.sqs[0].size == host.depth
    for _ in range(2 * host.depth):  # the admin queue wraps: phase tags work both ways
        host.identify_controller()
    host.write(Reg.CC, CC.EN.put(host.read(Reg.CC), 0))
    assert host.read(Reg.CSTS) == 0
    assert bare.trace.named("pci_nvme_mmio_stopped")
    assert bare.controller.sqs[0] is None and bare.controller.cqs[0] is None
    # Enable again from scratch: a new admin queue, head and tail back at zero.
    host = RawHost(bare)
    host.program()
    assert CSTS.RDY.get(host.enable())
    host.identify_controller()


def test_enable_through_the_driver(rig: Rig) -> None:
    assert CSTS.RDY.get(rig.driver.read_reg(Reg.CSTS)) == 1
    rig.driver.disable()
    assert rig.driver.read_reg(Reg.CSTS) == 0
    rig.driver.probe()
    assert rig.driver.read_reg(Reg.CSTS) == compose((CSTS.RDY, 1))


# (id, controller config, AQA / ASQ / ACQ overrides, CC fields, words in the failure reason)
_BAD_ENABLES: list[tuple[str, ControllerConfig, dict[str, int], dict[str, int], str]] = [
    ("mps-above-max", ControllerConfig(mps_max=2), {}, {"MPS": 3}, "CC.MPS 3"),
    ("mps-below-min", ControllerConfig(mps_min=1, mps_max=2), {}, {"MPS": 0}, "CC.MPS 0"),
    ("css-1", ControllerConfig(), {}, {"CSS": 1}, "CC.CSS 1"),
    ("css-admin-only", ControllerConfig(), {}, {"CSS": 7}, "CC.CSS 7"),
    ("ams-wrr", ControllerConfig(), {}, {"AMS": 1}, "CC.AMS 1"),
    ("ams-vendor", ControllerConfig(), {}, {"AMS": 7}, "CC.AMS 7"),
    ("asqs-1", ControllerConfig(), {"aqa": compose((AQA.ASQS, 0), (AQA.ACQS, 7))}, {}, "at least 2"),
    ("acqs-1", ControllerConfig(), {"aqa": compose((AQA.ASQS, 7), (AQA.ACQS, 0))}, {}, "at least 2"),
    ("asq-unaligned-8k", ControllerConfig(), {"asq": 0x1_0000_1000}, {"MPS": 1}, "not aligned"),
    ("acq-unaligned-8k", ControllerConfig(), {"acq": 0x1_0000_3000}, {"MPS": 1}, "not aligned"),
    ("asq-unmapped", ControllerConfig(), {"asq": _UNMAPPED}, {}, "admin queue memory"),
    ("acq-unmapped", ControllerConfig(), {"acq": _UNMAPPED}, {}, "admin queue memory"),
]


@pytest.mark.parametrize(
    ("config", "program", "cc_fields", "reason"),
    [case[1:] for case in _BAD_ENABLES],
    ids=[case[0] for case in _BAD_ENABLES],
)
def test_bad_enable_sets_cfs_and_a_reset_clears_it(
    config: ControllerConfig, program: dict[str, int], cc_fields: dict[str, int], reason: str
) -> None:
    r = make_rig(config=config, probe=False)
    try:
        host = RawHost(r)
        host.program(**program)
        csts = host.enable(**cc_fields)
        assert csts == compose((CSTS.CFS, 1))  # fatal at once, never ready
        assert r.controller.fatal
        [fail] = _errors(r, "pci_nvme_err_startfail")
        assert reason in str(fail[0])
        assert len(r.transport.fatal_reasons) == 1 and reason in r.transport.fatal_reasons[0]
        assert r.controller.sqs[0] is None
        # A doorbell now is refused (not ready), not taken as a command.
        host.write(sq_tail_doorbell(0, 0), 1)
        assert _errors(r)[-1] == (0x1000, 4, 1, "doorbell write while not ready")
        # CC.EN = 0 is the way out (§9.5); then a correct enable works.
        host.write(Reg.CC, 0)
        assert host.read(Reg.CSTS) == 0 and not r.controller.fatal
        host = RawHost(r)
        host.program()
        mps = config.mps_min
        assert host.enable(MPS=mps) == compose((CSTS.RDY, 1))
        host.identify_controller()
    finally:
        r.close()


@pytest.mark.parametrize(("iosqes", "iocqes"), [(0, 0), (6, 0), (6, 5), (0, 4), (7, 4)])
def test_io_entry_sizes_are_not_needed_to_enable(bare: Rig, iosqes: int, iocqes: int) -> None:
    """CC.IOSQES / IOCQES matter only for I/O queues (§7.6.1): the controller becomes ready and
    admin commands work; I/O queue creation with a wrong size is Invalid Field."""
    host = RawHost(bare)
    host.program()
    assert host.enable(IOSQES=iosqes, IOCQES=iocqes) == compose((CSTS.RDY, 1))
    host.identify_controller()
    cq_mem = bare.host_memory.alloc(16 * CQE_SIZE)
    sq_mem = bare.host_memory.alloc(16 * SQE_SIZE)
    create_cq = Sqe(AdminOpcode.CREATE_IO_CQ, 0, 1, 0, 0, 0, 0, cq_mem.addr, 0, (15 << 16) | 1, 0b11)
    create_sq = Sqe(AdminOpcode.CREATE_IO_SQ, 0, 2, 0, 0, 0, 0, sq_mem.addr, 0, (15 << 16) | 1, (1 << 16) | 1)
    cq_status = host.command(create_cq).status
    assert cq_status == (Status.SUCCESS if iocqes == 4 else Status.INVALID_FIELD | DNR)
    sq_status = host.command(create_sq).status
    if iocqes != 4:
        assert sq_status == Status.COMPLETION_QUEUE_INVALID | DNR
    else:
        assert sq_status == (Status.SUCCESS if iosqes == 6 else Status.INVALID_FIELD | DNR)


def test_admin_queue_larger_than_mqes() -> None:
    r = make_rig(config=ControllerConfig(max_queue_entries=16), probe=False)
    try:
        host = RawHost(r, depth=32)  # Linux's NVME_AQ_DEPTH, whatever MQES says
        host.program()
        assert host.enable() == compose((CSTS.RDY, 1))
    finally:
        r.close()


def test_admin_queue_registers_are_frozen_while_enabled(rig: Rig) -> None:
    ctrl = rig.controller
    aqa, asq, acq = ctrl.aqa, ctrl.asq, ctrl.acq
    rig.transport.mmio_write(Reg.AQA, 4, 0)
    rig.transport.mmio_write(Reg.ASQ, 8, 0x5000)
    rig.transport.mmio_write(Reg.ACQ + 4, 4, 7)
    assert (ctrl.aqa, ctrl.asq, ctrl.acq) == (aqa, asq, acq)
    reason = "admin queue register written while enabled"
    assert _errors(rig) == [
        (Reg.AQA, 4, 0, reason),
        (Reg.ASQ, 4, 0x5000, reason),
        (Reg.ASQ + 4, 4, 0, reason),
        (Reg.ACQ + 4, 4, 7, reason),
    ]
    rig.driver.identify_controller()


# Section: shutdown and NVM Subsystem Reset


class _FlushCounting(RamBackend):
    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.flushes = 0

    def flush(self) -> None:
        self.flushes += 1


@pytest.mark.parametrize("shn", [ShutdownNotification.NORMAL, ShutdownNotification.ABRUPT])
def test_shutdown_reaches_shst_complete_after_flushing(shn: ShutdownNotification) -> None:
    backend = _FlushCounting(1 << 20)
    r = make_rig(namespaces=[Namespace(1, backend, 512)])
    try:
        r.driver.write(1, 0, b"\x66" * 512)
        assert CSTS.SHST.get(r.driver.read_reg(Reg.CSTS)) == ShutdownStatus.NORMAL
        flushes = backend.flushes
        cc = r.driver.read_reg(Reg.CC)
        r.transport.mmio_write(Reg.CC, 4, CC.SHN.put(cc, shn))
        csts = r.driver.read_reg(Reg.CSTS)
        assert CSTS.SHST.get(csts) == ShutdownStatus.COMPLETE
        assert CSTS.RDY.get(csts) == 1 and not CSTS.CFS.get(csts)
        assert backend.flushes == flushes + 1
        assert [e.args for e in r.trace.named("pci_nvme_mmio_shutdown_set")] == [(int(shn),)]
        # Clearing SHN again: SHST back to normal.
        r.transport.mmio_write(Reg.CC, 4, cc)
        assert CSTS.SHST.get(r.driver.read_reg(Reg.CSTS)) == ShutdownStatus.NORMAL
        assert r.trace.named("pci_nvme_mmio_shutdown_cleared")
    finally:
        r.close()


def test_driver_shutdown_then_reset_and_reprobe(rig: Rig) -> None:
    rig.driver.write(1, 3, b"\x44" * 512)
    rig.driver.shutdown()
    assert CSTS.SHST.get(rig.driver.read_reg(Reg.CSTS)) == ShutdownStatus.COMPLETE
    rig.driver.probe()  # CC.EN 1 -> 0 -> 1
    assert CSTS.RDY.get(rig.driver.read_reg(Reg.CSTS)) == 1
    assert rig.driver.read(1, 3, 1) == b"\x44" * 512


def test_nvm_subsystem_reset(rig: Rig) -> None:
    assert CAP.NSSRS.get(rig.driver.read_reg(Reg.CAP)) == 1
    rig.transport.mmio_write(Reg.NSSR, 4, NSSR_MAGIC)
    assert rig.trace.named("pci_nvme_nssr")
    assert rig.driver.read_reg(Reg.CSTS) == compose((CSTS.NSSRO, 1))
    assert rig.driver.read_reg(Reg.CC) == 0
    assert all(q is None for q in (*rig.controller.sqs, *rig.controller.cqs))
    assert not rig.controller.doorbells.active
    assert rig.driver.read_reg(Reg.NSSR) == 0  # NSSR reads as zero
    # The host brings the controller up again; NSSRO stays set until the host clears it.
    rig.driver.probe()
    csts = rig.driver.read_reg(Reg.CSTS)
    assert CSTS.RDY.get(csts) == 1 and CSTS.NSSRO.get(csts) == 1
    rig.driver.write(1, 0, b"\x21" * 512)


@pytest.mark.parametrize("value", [0, 1, NSSR_MAGIC - 1, NSSR_MAGIC + 1, 0x656D564E, 0xFFFF_FFFF])
def test_nssr_other_values_do_nothing(rig: Rig, value: int) -> None:
    rig.transport.mmio_write(Reg.NSSR, 4, value)
    assert rig.driver.read_reg(Reg.CSTS) == compose((CSTS.RDY, 1))
    assert not rig.trace.named("pci_nvme_nssr")
    rig.driver.write(1, 0, b"\x22" * 512)


def test_nssr_when_not_supported() -> None:
    r = make_rig(config=ControllerConfig(nssr_supported=False))
    try:
        assert CAP.NSSRS.get(r.driver.read_reg(Reg.CAP)) == 0
        r.transport.mmio_write(Reg.NSSR, 4, NSSR_MAGIC)
        assert r.driver.read_reg(Reg.CSTS) == compose((CSTS.RDY, 1))
        assert not r.trace.named("pci_nvme_nssr")
    finally:
        r.close()


def test_nssro_is_cleared_by_writing_one(rig: Rig) -> None:
    rig.transport.mmio_write(Reg.NSSR, 4, NSSR_MAGIC)
    rig.driver.probe()
    rig.transport.mmio_write(Reg.CSTS, 4, compose((CSTS.NSSRO, 1)))
    assert rig.driver.read_reg(Reg.CSTS) == compose((CSTS.RDY, 1))


# Section: INTMS / INTMC


def test_interrupt_mask_set_and_clear() -> None:
    r = make_rig(namespaces=[Namespace(1, NullBackend(1 << 30), 4096)], shadow_doorbells=False)
    try:
        ctrl = r.controller
        ctrl.mmio_write(Reg.INTMS, 4, 1 << 1)
        ctrl.mmio_write(Reg.INTMS, 4, 1 << 3)  # sets accumulate
        assert ctrl.mmio_read(Reg.INTMS, 4) == ctrl.mmio_read(Reg.INTMC, 4) == 0b1010
        ctrl.mmio_write(Reg.INTMC, 4, 1 << 3)  # clears only the bits written
        assert ctrl.mmio_read(Reg.INTMS, 4) == 0b0010
        # A completion on vector 1 while it is masked: posted, but no interrupt.
        qp = r.driver.queue(1)
        assert qp.vector == 1
        buf = r.host_memory.alloc(4096)
        qp.submit(r.driver.io_sqe(qp, NvmOpcode.READ, 1, 0, 1, buf, length=4096))
        effects = ctrl.mmio_write(qp.sq_db, 4, qp.sq_tail)
        qp.last_sq_tail = qp.sq_tail
        effects += ctrl.process()
        assert not any(isinstance(e, RaiseInterrupt) for e in effects)
        assert _traces(effects, "pci_nvme_irq_masked") == [(1,)]
        # Unmasking delivers the pending interrupt; unmasking again delivers nothing more.
        effects = ctrl.mmio_write(Reg.INTMC, 4, 1 << 1)
        assert [e for e in effects if isinstance(e, RaiseInterrupt)] == [RaiseInterrupt(1)]
        assert ctrl.mmio_read(Reg.INTMS, 4) == 0
        assert not any(isinstance(e, RaiseInterrupt) for e in ctrl.mmio_write(Reg.INTMC, 4, 1 << 1))
        assert len(qp.reap()) == 1
        # Unmasked: the next completion interrupts at once.
        qp.submit(r.driver.io_sqe(qp, NvmOpcode.READ, 1, 0, 1, buf, length=4096))
        ctrl.mmio_write(qp.sq_db, 4, qp.sq_tail)
        qp.last_sq_tail = qp.sq_tail
        assert RaiseInterrupt(1) in ctrl.process()
        assert len(qp.reap()) == 1
    finally:
        r.close()


# Section: read-only registers


@pytest.mark.parametrize(
    "offset", [Reg.CAP, Reg.CAP + 4, Reg.VS, Reg.CMBLOC, Reg.CMBSZ, 0x40, 0x100, 0xF00, 0xFFC]
)
def test_writes_to_read_only_or_reserved_registers_are_ignored(rig: Rig, offset: int) -> None:
    before = [rig.transport.mmio_read(reg, 4) for reg in range(0, 0x40, 4)]
    rig.transport.mmio_write(offset, 4, 0xFFFF_FFFF)
    assert [rig.transport.mmio_read(reg, 4) for reg in range(0, 0x40, 4)] == before
    assert _errors(rig) == [(offset, 4, 0xFFFF_FFFF, "write to a read-only or reserved register")]
    assert rig.transport.mmio_read(offset, 4) == (before[offset // 4] if offset < 0x40 else 0)


def test_64_bit_write_to_cap_is_ignored(rig: Rig) -> None:
    cap = rig.controller.cap
    rig.transport.mmio_write(Reg.CAP, 8, 0)
    assert rig.transport.mmio_read(Reg.CAP, 8) == cap
    reason = "write to a read-only or reserved register"
    assert _errors(rig) == [(Reg.CAP, 4, 0, reason), (Reg.CAP + 4, 4, 0, reason)]


def test_csts_status_bits_cannot_be_written(rig: Rig) -> None:
    for value in (0, compose((CSTS.CFS, 1), (CSTS.SHST, ShutdownStatus.COMPLETE))):
        rig.transport.mmio_write(Reg.CSTS, 4, value)
        assert rig.driver.read_reg(Reg.CSTS) == compose((CSTS.RDY, 1))
    assert not rig.controller.fatal
    rig.driver.identify_controller()


# Section: doorbells the controller refuses


_ERROR_EVENT = {
    AsyncEventErrorInfo.INVALID_DOORBELL_REGISTER: async_event_dw0(
        AsyncEventType.ERROR_STATUS,
        AsyncEventErrorInfo.INVALID_DOORBELL_REGISTER,
        LogPageId.ERROR_INFORMATION,
    ),
    AsyncEventErrorInfo.INVALID_DOORBELL_WRITE_VALUE: async_event_dw0(
        AsyncEventType.ERROR_STATUS,
        AsyncEventErrorInfo.INVALID_DOORBELL_WRITE_VALUE,
        LogPageId.ERROR_INFORMATION,
    ),
}


# (id, offset, value, trace event, its arguments, asynchronous event information)
_BAD_DOORBELLS: list[tuple[str, int, int, str, tuple[int, ...], AsyncEventErrorInfo]] = [
    (
        "missing-sq",
        sq_tail_doorbell(5, 0),
        3,
        "pci_nvme_err_db_invalid_queue",
        (5, 0, 3),
        AsyncEventErrorInfo.INVALID_DOORBELL_REGISTER,
    ),
    (
        "missing-cq",
        cq_head_doorbell(5, 0),
        0,
        "pci_nvme_err_db_invalid_queue",
        (5, 1, 0),
        AsyncEventErrorInfo.INVALID_DOORBELL_REGISTER,
    ),
    (
        "last-possible-sq",
        sq_tail_doorbell(64, 0),
        1,
        "pci_nvme_err_db_invalid_queue",
        (64, 0, 1),
        AsyncEventErrorInfo.INVALID_DOORBELL_REGISTER,
    ),
    (
        "past-the-doorbells",
        sq_tail_doorbell(65, 0),
        1,
        "pci_nvme_err_db_invalid_queue",
        (-1, 0, 1),
        AsyncEventErrorInfo.INVALID_DOORBELL_REGISTER,
    ),
    (
        "not-on-the-stride",
        0x1002,
        1,
        "pci_nvme_err_db_invalid_queue",
        (-1, 0, 1),
        AsyncEventErrorInfo.INVALID_DOORBELL_REGISTER,
    ),
    (
        "sq-tail-equal-to-size",
        sq_tail_doorbell(1, 0),
        64,
        "pci_nvme_err_db_invalid_value",
        (1, 0, 64),
        AsyncEventErrorInfo.INVALID_DOORBELL_WRITE_VALUE,
    ),
    (
        "sq-tail-huge",
        sq_tail_doorbell(1, 0),
        0xFFFF_FFFF,
        "pci_nvme_err_db_invalid_value",
        (1, 0, 0xFFFF_FFFF),
        AsyncEventErrorInfo.INVALID_DOORBELL_WRITE_VALUE,
    ),
    (
        "admin-sq-tail-equal-to-size",
        sq_tail_doorbell(0, 0),
        32,
        "pci_nvme_err_db_invalid_value",
        (0, 0, 32),
        AsyncEventErrorInfo.INVALID_DOORBELL_WRITE_VALUE,
    ),
    (
        "cq-head-beyond-tail",
        cq_head_doorbell(1, 0),
        5,
        "pci_nvme_err_db_invalid_value",
        (1, 1, 5),
        AsyncEventErrorInfo.INVALID_DOORBELL_WRITE_VALUE,
    ),
    (
        "cq-head-equal-to-size",
        cq_head_doorbell(1, 0),
        64,
        "pci_nvme_err_db_invalid_value",
        (1, 1, 64),
        AsyncEventErrorInfo.INVALID_DOORBELL_WRITE_VALUE,
    ),
]


@pytest.mark.parametrize(
    ("offset", "value", "event", "args", "info"),
    [case[1:] for case in _BAD_DOORBELLS],
    ids=[case[0] for case in _BAD_DOORBELLS],
)
@pytest.mark.parametrize("shadow_doorbells", [False, True], ids=["mmio", "dbbuf"])
def test_refused_doorbell_is_an_error_event(
    shadow_doorbells: bool,
    offset: int,
    value: int,
    event: str,
    args: tuple[int, ...],
    info: AsyncEventErrorInfo,
) -> None:
    r = make_rig(io_queue_depth=64, shadow_doorbells=shadow_doorbells)
    try:
        qp = r.driver.queue(1)
        ctrl = r.controller
        before = ctrl.statistics()
        sq1 = ctrl.sqs[1]
        assert sq1 is not None
        state = (sq1.head, sq1.tail)
        r.transport.mmio_write(offset, 4, value)
        after = ctrl.statistics()
        assert [e.args for e in r.trace.named(event)] == [args]
        assert after.invalid_doorbell_writes == before.invalid_doorbell_writes + 1
        assert (sq1.head, sq1.tail) == state
        if args[0] == -1:
            assert _errors(r) == [(offset, 4, value, "not a doorbell register")]
        # The driver's outstanding Asynchronous Event Request reports it (Error status, Error
        # Information log page); the next admin completion pass picks it up.
        r.driver.identify_controller()
        assert r.driver.async_event_log == [_ERROR_EVENT[info]]
        assert not ctrl.fatal
        # Nothing else happened: the queues keep working.
        r.driver.write(1, 9, b"\x99" * 512)
        assert r.driver.read(1, 9, 1) == b"\x99" * 512
        assert qp.depth == 64
    finally:
        r.close()


def test_doorbell_stride_gaps_are_not_doorbells() -> None:
    r = make_rig(config=ControllerConfig(dstrd=1))
    try:
        for offset in (0x1004, 0x100C, 0x1014):
            r.transport.mmio_write(offset, 4, 0)
        assert [e.args for e in r.trace.named("pci_nvme_err_db_invalid_queue")] == [(-1, 0, 0)] * 3
        assert r.controller.statistics().invalid_doorbell_writes == 3
        r.driver.write(1, 0, b"\x01" * 512)
    finally:
        r.close()


def test_error_events_are_masked_until_the_error_log_is_read(rig: Rig) -> None:
    """§5.2: once an event type is reported, more events of that type wait until the host reads
    the associated log page with RAE = 0."""
    admin = rig.driver.admin
    assert admin is not None
    bad_sq = sq_tail_doorbell(9, 0)
    rig.transport.mmio_write(bad_sq, 4, 1)
    rig.driver.identify_controller()
    assert rig.driver.async_event_log == [_ERROR_EVENT[AsyncEventErrorInfo.INVALID_DOORBELL_REGISTER]]
    aer = admin.submit(Sqe(AdminOpcode.ASYNC_EVENT_REQUEST, 0, 0, 0, 0, 0, 0, 0, 0))
    admin.ring_sq()
    rig.transport.mmio_write(bad_sq, 4, 2)  # masked: the request stays outstanding
    rig.driver.identify_controller()
    assert aer not in admin.results
    rig.driver.get_log_page(LogPageId.ERROR_INFORMATION, 64, rae=True)  # Retain: still masked
    rig.transport.mmio_write(bad_sq, 4, 3)
    rig.driver.identify_controller()
    assert aer not in admin.results
    rig.driver.get_log_page(LogPageId.ERROR_INFORMATION, 64)  # RAE = 0: unmasked
    rig.transport.mmio_write(bad_sq, 4, 4)
    rig.driver.identify_controller()
    assert admin.results.pop(aer).dw0 == _ERROR_EVENT[AsyncEventErrorInfo.INVALID_DOORBELL_REGISTER]
    assert rig.controller.statistics().invalid_doorbell_writes == 4
    assert [e.args[0] for e in rig.trace.named("pci_nvme_err_db_invalid_queue")] == [9, 9, 9, 9]


def test_doorbell_while_disabled_is_only_traced(bare: Rig) -> None:
    bare.transport.mmio_write(sq_tail_doorbell(0, 0), 4, 1)
    bare.transport.mmio_write(cq_head_doorbell(3, 0), 4, 1)
    assert _errors(bare) == [
        (0x1000, 4, 1, "doorbell write while not ready"),
        (cq_head_doorbell(3, 0), 4, 1, "doorbell write while not ready"),
    ]
    assert bare.controller.statistics().invalid_doorbell_writes == 0
    assert not bare.trace.named("pci_nvme_enqueue_event")
    # Nothing was remembered either: enabling starts from an empty admin queue.
    host = RawHost(bare)
    host.program()
    assert CSTS.RDY.get(host.enable())
    assert bare.controller.sqs[0] is not None and bare.controller.sqs[0].tail == 0
    host.identify_controller()
