"""NVMe checks: registers, controller enable / disable / shutdown, Identify, queue management and
I/O, each error case judged by the status the NVMe 1.3 specification gives it."""

from __future__ import annotations

import time
from collections.abc import Callable

from vnvme.check.registry import Outcome, Skip, check, failed, info, passed, verdict
from vnvme.check.target import Context
from vnvme.driver.driver import NamespaceInfo, NvmeDriver
from vnvme.spec import registers as regs
from vnvme.spec.commands import AdminOpcode, Cns, Cqe, FeatureId, NvmOpcode
from vnvme.spec.registers import AQA, CAP, CC, CSTS, Reg
from vnvme.spec.status import Status, describe, without_flags
from vnvme.vfio_user import protocol as vu

NVME = "NVMe 1.3"
#: An I/O opcode no NVMe command set assigns (zoned and key-value ones included).
UNASSIGNED_IO_OPCODE = 0x7F
#: A CNS value no revision of the base specification assigns.
RESERVED_CNS = 0xFF


def first_namespace(driver: NvmeDriver) -> NamespaceInfo:
    if not driver.namespaces:
        raise Skip("no active namespace (Identify Active Namespace ID list is empty)")
    return driver.namespaces[min(driver.namespaces)]


class StatusCases:
    """Commands expected to fail with given statuses; each case's result goes into the evidence."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.ok = True

    def expect(self, what: str, expected: Status, cqe: Cqe) -> None:
        got = without_flags(cqe.status)
        good = got == expected
        self.ok = self.ok and good
        mark = "ok" if good else f"expected {expected.name}"
        self.lines.append(f"{what}: {describe(cqe.status) if cqe.status else 'SUCCESS'} ({mark})")

    def outcome(self) -> Outcome:
        return verdict(self.ok, "; ".join(self.lines))


@check("nvme.cap-vs", f"{NVME} §3.1.1 CAP, §3.1.2 VS")
def cap_vs(ctx: Context) -> Outcome:
    """CAP and VS hold a usable controller: MQES, NVM command set, timeout, doorbells inside BAR0"""
    transport = ctx.transport()
    cap = transport.mmio_read(Reg.CAP, 8)
    halves = transport.mmio_read(Reg.CAP, 4) | transport.mmio_read(Reg.CAP + 4, 4) << 32
    vs = transport.mmio_read(Reg.VS, 4)
    dstrd = CAP.DSTRD.get(cap)
    last_doorbell = regs.cq_head_doorbell(1, dstrd) + 4  # queue 1's, the first I/O queue
    problems = []
    if halves != cap:
        problems.append(f"CAP read as two dwords {halves:#x} differs from one 8-byte read")
    if CAP.MQES.get(cap) < 1:
        problems.append("MQES 0 (a queue needs at least 2 entries)")
    if not CAP.CSS.get(cap) & 1:
        problems.append("CSS bit 0 clear (no NVM command set)")
    if CAP.TO.get(cap) == 0:
        problems.append("TO 0")
    if vs >> 16 < 1:
        problems.append("VS major 0")
    if last_doorbell > transport.bar0.size:
        problems.append(
            f"queue 1's doorbells end at {last_doorbell:#x}, beyond BAR0 ({transport.bar0.size:#x})"
        )
    evidence = (
        f"CAP {cap:#018x} (MQES {CAP.MQES.get(cap)}, DSTRD {dstrd}, TO {CAP.TO.get(cap) * 500} ms, "
        f"MPSMIN {CAP.MPSMIN.get(cap)}), VS {vs >> 16}.{(vs >> 8) & 0xFF}.{vs & 0xFF}"
    )
    return verdict(not problems, evidence + ("; " + "; ".join(problems) if problems else ""))


def _wait_csts(driver: NvmeDriver, field: regs.Field, value: int) -> float | None:
    """Seconds until CSTS.<field> reads ``value`` (None: not within CAP.TO)."""
    limit = max(CAP.TO.get(driver.cap), 1) * 0.5
    start = time.monotonic()
    while time.monotonic() - start <= limit:
        if field.get(driver.read_reg(Reg.CSTS)) == value:
            return time.monotonic() - start
        time.sleep(0.0005)
    return None


@check("nvme.enable", f"{NVME} §7.6.1 (initialization), §3.1.6 CSTS.RDY")
def enable(ctx: Context) -> Outcome:
    """With the admin queue programmed, CC.EN = 1 brings CSTS.RDY to 1 within CAP.TO"""
    driver = ctx.driver(probe=False)
    driver.cap = driver.read_reg(Reg.CAP)
    driver.disable()
    memory = driver.transport.memory
    sq, cq = memory.alloc(2 * 64), memory.alloc(2 * 16)
    try:
        driver.write_reg(Reg.AQA, regs.compose((AQA.ASQS, 1), (AQA.ACQS, 1)))
        driver.write_reg(Reg.ASQ, sq.addr)
        driver.write_reg(Reg.ACQ, cq.addr)
        driver.write_reg(Reg.CC, regs.compose((CC.EN, 1), (CC.IOSQES, 6), (CC.IOCQES, 4)))
        took = _wait_csts(driver, CSTS.RDY, 1)
        csts = driver.read_reg(Reg.CSTS)
        driver.write_reg(Reg.CC, 0)
        _wait_csts(driver, CSTS.RDY, 0)
    finally:
        memory.free(sq)
        memory.free(cq)
    limit = max(CAP.TO.get(driver.cap), 1) * 500
    if took is None:
        return failed(f"CSTS {csts:#x}: RDY not 1 within CAP.TO ({limit} ms)")
    return verdict(
        not CSTS.CFS.get(csts), f"CSTS.RDY = 1 after {took * 1e3:.1f} ms (CAP.TO {limit} ms), CSTS {csts:#x}"
    )


@check("nvme.disable", f"{NVME} §7.3.2 (controller reset), §3.1.5 CC.EN")
def disable(ctx: Context) -> Outcome:
    """CC.EN = 0 brings CSTS.RDY to 0 and deletes the I/O queues: they can be created again"""
    driver = ctx.driver()
    driver.write_reg(Reg.CC, CC.EN.put(driver.read_reg(Reg.CC), 0))
    took = _wait_csts(driver, CSTS.RDY, 0)
    if took is None:
        return failed(f"CSTS {driver.read_reg(Reg.CSTS):#x}: RDY not 0 within CAP.TO after CC.EN = 0")
    try:
        driver.probe()  # creates I/O queue 1 again: refused if the reset kept it
        ns = first_namespace(driver)
        driver.read(ns.nsid, 0, 1)
    except Exception as exc:
        return failed(
            f"CSTS.RDY = 0 after {took * 1e3:.1f} ms; enabling again and re-creating queue 1 failed: {exc}"
        )
    return passed(
        f"CSTS.RDY = 0 after {took * 1e3:.1f} ms; enabled again, queue 1 re-created, a read completed"
    )


@check("nvme.shutdown", f"{NVME} §7.6.2 (shutdown), §3.1.6 CSTS.SHST")
def shutdown(ctx: Context) -> Outcome:
    """CC.SHN = normal brings CSTS.SHST to complete"""
    driver = ctx.driver()
    driver.write_reg(Reg.CC, CC.SHN.put(driver.read_reg(Reg.CC), regs.ShutdownNotification.NORMAL))
    limit = max(CAP.TO.get(driver.cap), 1) * 0.5
    start = time.monotonic()
    while (shst := CSTS.SHST.get(driver.read_reg(Reg.CSTS))) != regs.ShutdownStatus.COMPLETE:
        if time.monotonic() - start > limit:
            return failed(f"CSTS.SHST {shst} after {limit * 1e3:.0f} ms (CAP.TO)")
        time.sleep(0.0005)
    return passed(f"CSTS.SHST = complete after {(time.monotonic() - start) * 1e3:.1f} ms")


@check("nvme.identify", f"{NVME} §5.15 Identify")
def identify(ctx: Context) -> Outcome:
    """Identify Controller, the active namespace list and Identify Namespace describe a usable device"""
    driver = ctx.driver()
    c = driver.controller_info
    problems = []
    if c["sqes"] & 0xF != 6 or c["sqes"] >> 4 < 6:
        problems.append(f"SQES {c['sqes']:#x} (required 6)")
    if c["cqes"] & 0xF != 4 or c["cqes"] >> 4 < 4:
        problems.append(f"CQES {c['cqes']:#x} (required 4)")
    if c["nn"] < 1:
        problems.append("NN 0")
    if not driver.namespaces:
        problems.append("no active namespace")
    problems.extend(
        f"namespace {ns.nsid}: NSZE {ns.nlba}, NCAP {ns.raw['ncap']}, LBA {ns.lba_size}"
        for ns in driver.namespaces.values()
        if ns.nlba == 0 or ns.raw["ncap"] > ns.nlba or ns.lba_size < 512
    )
    sn = c["sn"].decode(errors="replace").strip()
    mn = c["mn"].decode(errors="replace").strip()
    namespaces = ", ".join(f"{n.nsid}: {n.nlba} x {n.lba_size} B" for n in driver.namespaces.values())
    evidence = f"VID {c['vid']:#06x}, SN {sn!r}, MN {mn!r}, OACS {c['oacs']:#x}, NN {c['nn']}; namespaces {namespaces}"
    return verdict(not problems, evidence + ("; " + "; ".join(problems) if problems else ""))


@check("nvme.identify-errors", f"{NVME} §5.15 Identify, §4.6.1.2.1 (generic status)")
def identify_errors(ctx: Context) -> Outcome:
    """A reserved CNS is Invalid Field; Identify Namespace of an invalid NSID is Invalid Namespace"""
    driver = ctx.driver()
    buf = driver.transport.memory.alloc(4096)
    cases = StatusCases()
    try:
        cqe = driver.admin_command(AdminOpcode.IDENTIFY, prp1=buf.addr, cdw10=RESERVED_CNS, check=False)
        cases.expect(f"CNS {RESERVED_CNS:#x}", Status.INVALID_FIELD, cqe)
        nsid = driver.controller_info["nn"] + 1
        if nsid < 0xFFFFFFFF:
            cqe = driver.admin_command(
                AdminOpcode.IDENTIFY, prp1=buf.addr, nsid=nsid, cdw10=Cns.NAMESPACE, check=False
            )
            cases.expect(f"Identify Namespace NSID {nsid:#x} (NN + 1)", Status.INVALID_NAMESPACE, cqe)
    finally:
        driver.transport.memory.free(buf)
    return cases.outcome()


def _granted_queues(driver: NvmeDriver) -> int:
    """I/O queue pairs the controller allocated (Get Features Number of Queues, both 0-based)."""
    dw0 = driver.get_features(FeatureId.NUMBER_OF_QUEUES)
    return min(dw0 & 0xFFFF, dw0 >> 16) + 1


@check("nvme.queue-create", f"{NVME} §5.3 Create I/O CQ, §5.4 Create I/O SQ, Delete I/O SQ / CQ")
def queue_create(ctx: Context) -> Outcome:
    """An I/O queue pair is created, carries a read, and is deleted"""
    driver = ctx.driver(io_queues=2)
    if len(driver.io) < 2:
        raise Skip(f"the controller granted {len(driver.io)} I/O queue pair(s): the check needs a second")
    qp = driver.io[1]
    driver.delete_io_queue_pair(qp)
    qp = driver.create_io_queue_pair(2, 16)
    ns = first_namespace(driver)
    driver.read(ns.nsid, 0, 1, qid=2)
    driver.delete_io_queue_pair(qp)
    return passed(f"queue 2 (16 entries, vector {qp.vector}) created, read LBA 0, deleted")


@check(
    "nvme.queue-create-errors", f"{NVME} §5.3, §5.4, Delete I/O SQ / CQ; §4.6.1.2.2 (command specific status)"
)
def queue_create_errors(ctx: Context) -> Outcome:
    """Queue creation and deletion errors complete with the statuses the spec gives them"""
    transport = ctx.transport()
    driver = ctx.driver(transport, io_queues=2)
    if len(driver.io) >= 2:
        driver.delete_io_queue_pair(driver.queue(2))  # qid 2: allowed, free
    mqes = CAP.MQES.get(driver.cap)
    granted = _granted_queues(driver)
    _flags, vectors = transport.client.irq_info(vu.PciIrq.MSIX)
    ring = transport.memory.alloc(4096)
    cases = StatusCases()

    def cq(qid: int, qsize: int, vector: int = 0) -> Cqe:
        cdw11 = 1 | 2 | (vector << 16)  # physically contiguous, interrupts enabled
        return driver.admin_command(
            AdminOpcode.CREATE_IO_CQ, prp1=ring.addr, cdw10=(qsize << 16) | qid, cdw11=cdw11, check=False
        )

    def sq(qid: int, cqid: int, qsize: int = 1) -> Cqe:
        return driver.admin_command(
            AdminOpcode.CREATE_IO_SQ,
            prp1=ring.addr,
            cdw10=(qsize << 16) | qid,
            cdw11=(cqid << 16) | 1,
            check=False,
        )

    free_qid = 2 if granted >= 2 else None
    try:
        cases.expect("Create I/O CQ qid 0", Status.INVALID_QUEUE_IDENTIFIER, cq(0, 1))
        cases.expect(
            f"Create I/O CQ qid {granted + 1} (granted {granted})",
            Status.INVALID_QUEUE_IDENTIFIER,
            cq(granted + 1, 1),
        )
        cases.expect("Create I/O CQ qid 1 again", Status.INVALID_QUEUE_IDENTIFIER, cq(1, 1))
        if free_qid is not None:
            _free_qid_cases(cases, cq, sq, free_qid, mqes, vectors)
        cases.expect("Create I/O SQ qid 0", Status.INVALID_QUEUE_IDENTIFIER, sq(0, 1))
        deletion = driver.admin_command(AdminOpcode.DELETE_IO_CQ, cdw10=1, check=False)
        cases.expect("Delete I/O CQ 1 while SQ 1 uses it", Status.INVALID_QUEUE_DELETION, deletion)
        missing = granted + 1
        cases.expect(
            f"Delete I/O SQ {missing} that does not exist",
            Status.INVALID_QUEUE_IDENTIFIER,
            driver.admin_command(AdminOpcode.DELETE_IO_SQ, cdw10=missing, check=False),
        )
    finally:
        transport.memory.free(ring)
    if free_qid is None:
        cases.lines.append("size, vector and CQID cases not run: only one I/O queue pair granted")
    return cases.outcome()


def _free_qid_cases(
    cases: StatusCases,
    cq: Callable[..., Cqe],
    sq: Callable[..., Cqe],
    free_qid: int,
    mqes: int,
    vectors: int,
) -> None:
    """The creation errors that need a queue identifier the host may use: size, vector, CQID."""
    if mqes < 0xFFFF:
        cases.expect(
            f"Create I/O CQ QSIZE {mqes + 1} > MQES {mqes}", Status.INVALID_QUEUE_SIZE, cq(free_qid, mqes + 1)
        )
    cases.expect("Create I/O CQ QSIZE 0", Status.INVALID_QUEUE_SIZE, cq(free_qid, 0))
    if vectors < 2048:
        cases.expect(
            f"Create I/O CQ IV {vectors} (MSI-X has {vectors})",
            Status.INVALID_INTERRUPT_VECTOR,
            cq(free_qid, 1, vectors),
        )
    cases.expect(
        f"Create I/O SQ {free_qid} on CQ {free_qid} that does not exist",
        Status.COMPLETION_QUEUE_INVALID,
        sq(free_qid, free_qid),
    )


def _io(driver: NvmeDriver, opcode: int, nsid: int, slba: int, nlb: int, lba_size: int) -> Cqe:
    qp = driver.queue(1)
    buf = driver.transport.memory.alloc(max(nlb, 1) * lba_size)
    try:
        sqe = driver.io_sqe(qp, opcode, nsid, slba, nlb, buf, length=nlb * lba_size)
        return driver.io_command(qp, sqe, check=False)
    finally:
        driver.transport.memory.free(buf)


@check("nvme.io-read", f"{NVME} §6.9 Read, Flush")
def io_read(ctx: Context) -> Outcome:
    """Reads of one block, of 128 KiB (a PRP list), at the last LBA, and a Flush complete successfully"""
    driver = ctx.driver()
    ns = first_namespace(driver)
    nlb = max(1, (128 << 10) // ns.lba_size)
    cases = [("LBA 0", 0, 1), (f"{nlb} blocks", 0, min(nlb, ns.nlba)), ("last LBA", ns.nlba - 1, 1)]
    lines = []
    for what, slba, count in cases:
        cqe = _io(driver, NvmOpcode.READ, ns.nsid, slba, count, ns.lba_size)
        if cqe.status:
            return failed(f"read {what} on namespace {ns.nsid}: {describe(cqe.status)}")
        lines.append(what)
    cqe = _io(driver, NvmOpcode.FLUSH, ns.nsid, 0, 0, ns.lba_size)
    if cqe.status:
        return failed(f"reads ok; Flush: {describe(cqe.status)}")
    return passed(f"namespace {ns.nsid}: read {', '.join(lines)}; Flush: all SUCCESS")


@check("nvme.io-write", f"{NVME} §6.15 Write, §6.9 Read")
def io_write(ctx: Context) -> Outcome:
    """A write completes and reads back (only with --allow-writes: it changes the namespace)"""
    if not ctx.options.allow_writes:
        raise Skip("writes change the namespace's data: run with --allow-writes")
    driver = ctx.driver()
    ns = first_namespace(driver)
    pattern = bytes((i * 7 + 3) & 0xFF for i in range(8 * ns.lba_size))
    driver.write(ns.nsid, 0, pattern)
    back = driver.read(ns.nsid, 0, 8)
    what = f"namespace {ns.nsid}: 8 blocks written at LBA 0"
    if back == pattern:
        return passed(f"{what}, read back equal")
    if not any(back):
        # A null namespace reads zeroes whatever was written; nothing tells it from lost writes.
        return info(f"{what}, read back all zero: a namespace that keeps no data, or lost writes")
    return failed(
        f"{what}, read back different data (first difference at byte {_first_difference(back, pattern)})"
    )


def _first_difference(a: bytes, b: bytes) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), min(len(a), len(b)))


@check("nvme.io-lba-range", f"{NVME} §6.9 Read; §4.6.1.2.1 (LBA Out of Range)")
def io_lba_range(ctx: Context) -> Outcome:
    """Reads past the namespace's last LBA complete with LBA Out of Range"""
    driver = ctx.driver()
    ns = first_namespace(driver)
    cases = StatusCases()
    cases.expect(
        f"read 2 blocks at NSZE - 1 ({ns.nlba - 1})",
        Status.LBA_OUT_OF_RANGE,
        _io(driver, NvmOpcode.READ, ns.nsid, ns.nlba - 1, 2, ns.lba_size),
    )
    cases.expect(
        f"read 1 block at NSZE ({ns.nlba})",
        Status.LBA_OUT_OF_RANGE,
        _io(driver, NvmOpcode.READ, ns.nsid, ns.nlba, 1, ns.lba_size),
    )
    return cases.outcome()


@check("nvme.io-invalid-opcode", f"{NVME} §4.6.1.2.1 (Invalid Command Opcode)")
def io_invalid_opcode(ctx: Context) -> Outcome:
    """An I/O opcode no command set assigns completes with Invalid Command Opcode"""
    driver = ctx.driver()
    ns = first_namespace(driver)
    cases = StatusCases()
    cases.expect(
        f"I/O opcode {UNASSIGNED_IO_OPCODE:#x}",
        Status.INVALID_OPCODE,
        _io(driver, UNASSIGNED_IO_OPCODE, ns.nsid, 0, 0, ns.lba_size),
    )
    return cases.outcome()


@check("nvme.io-invalid-namespace", f"{NVME} §4.6.1.2.1 (Invalid Namespace or Format)")
def io_invalid_namespace(ctx: Context) -> Outcome:
    """Reads of NSID 0 and of NSID NN + 1 complete with Invalid Namespace or Format"""
    driver = ctx.driver()
    ns = first_namespace(driver)
    cases = StatusCases()
    cases.expect("read NSID 0", Status.INVALID_NAMESPACE, _io(driver, NvmOpcode.READ, 0, 0, 1, ns.lba_size))
    nsid = driver.controller_info["nn"] + 1
    if nsid < 0xFFFFFFFF:
        cases.expect(
            f"read NSID {nsid:#x} (NN + 1)",
            Status.INVALID_NAMESPACE,
            _io(driver, NvmOpcode.READ, nsid, 0, 1, ns.lba_size),
        )
    return cases.outcome()
