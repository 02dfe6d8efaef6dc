"""``vnvme demo``: bring a controller up through the driver, turn on shadow doorbells, do I/O,
and show the doorbell counters side by side for every doorbell variant. Everything runs in one
process (controller and driver in the same thread), so doorbells cost a function call here:
the counts are exact, the IOPS only show the Python cost of the two sides."""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TextIO

from vnvme.bench.engine import JobSpec, run_job
from vnvme.controller import variants
from vnvme.controller.controller import Controller
from vnvme.controller.namespace import Namespace, NullBackend, RamBackend
from vnvme.controller.statistics import ControllerStatistics
from vnvme.controller.variants import VARIANTS as ALL_VARIANTS
from vnvme.controller.variants import DoorbellVariant
from vnvme.driver import HostMemory, InProcessTransport, NvmeDriver
from vnvme.memory import GuestMemory
from vnvme.spec.identify import Oacs
from vnvme.spec.registers import CAP

#: The variants compared (declared in vnvme.controller.variants).
VARIANTS: tuple[DoorbellVariant, ...] = tuple(ALL_VARIANTS[name] for name in variants.DEMO)


def _build(variant: DoorbellVariant) -> tuple[Controller, InProcessTransport, NvmeDriver, HostMemory]:
    namespaces = [Namespace(1, NullBackend(1 << 30), 512), Namespace(2, RamBackend(64 << 20), 4096)]
    controller = Controller(GuestMemory(), namespaces, variant.config())
    host_memory = HostMemory(32 << 20)
    transport = InProcessTransport.attach(controller, host_memory, controller_polls=variant.polls)
    driver = NvmeDriver(transport, shadow_doorbells=variant.shadow)
    driver.probe()
    return controller, transport, driver, host_memory


def _close(
    controller: Controller, transport: InProcessTransport, driver: NvmeDriver, memory: HostMemory
) -> None:
    driver.close()
    transport.close()
    memory.close()
    controller.close()


def bring_up(out: TextIO) -> None:
    """Narrate one bring-up and a verified write / read, with the counters."""
    controller, transport, driver, memory = _build(ALL_VARIANTS["dbbuf-eager"])
    try:
        info = driver.controller_info
        out.write("== bring-up (Linux nvme-pci order) ==\n")
        out.write(
            f"CAP: MQES={CAP.MQES.get(driver.cap)} DSTRD={CAP.DSTRD.get(driver.cap)} "
            f"TO={CAP.TO.get(driver.cap) * 500} ms; CC.EN=1 -> CSTS.RDY=1\n"
        )
        out.write(
            f"Identify: {info['mn'].decode().strip()!r} SN {info['sn'].decode().strip()!r} "
            f"NN={info['nn']} MDTS={info['mdts']} OACS={info['oacs']:#x} "
            f"(Doorbell Buffer Config: {'yes' if info['oacs'] & Oacs.DOORBELL_BUFFER_CONFIG else 'no'})\n"
        )
        for ns in driver.namespaces.values():
            out.write(f"namespace {ns.nsid}: {ns.nlba} LBAs of {ns.lba_size} bytes\n")
        assert driver.dbbuf_pages is not None
        shadow, eventidx = driver.dbbuf_pages
        out.write(
            f"Doorbell Buffer Config: shadow page {shadow.addr:#x}, EventIdx page {eventidx.addr:#x}; "
            f"I/O queue pairs: {len(driver.io)} of {driver.io[0].depth} entries, shadow doorbells on\n"
        )
        pattern = bytes(range(256)) * 16 * 64  # 256 KiB
        for offset in range(0, len(pattern), 64 << 10):
            driver.write(2, offset // 4096, pattern[offset : offset + (64 << 10)])
        readback = b"".join(driver.read(2, lba, 16) for lba in range(0, len(pattern) // 4096, 16))
        verdict = "OK" if readback == pattern else "MISMATCH"
        out.write(f"verify: wrote and read back {len(pattern) >> 10} KiB on the ram namespace: {verdict}\n")
        stats = controller.statistics()
        out.write(
            f"controller counters: admin doorbells SQ {stats.doorbell_sq_admin} CQ {stats.doorbell_cq_admin}; "
            f"I/O doorbells SQ {stats.doorbell_sq_io} CQ {stats.doorbell_cq_io}; shadow reads "
            f"{stats.shadow_reads}; EventIdx writes {stats.eventidx_writes}; rearms won {stats.rearms_won} "
            f"lost {stats.rearms_lost}; interrupts {stats.interrupts_raised}\n"
        )
        out.write(f"commands: admin {stats.admin_commands}; I/O {stats.io_commands}\n\n")
        if verdict != "OK":
            raise SystemExit("data verification failed")
    finally:
        _close(controller, transport, driver, memory)


@dataclass(frozen=True)
class DemoResult:
    """One row of the comparison: the engine's IOPS, the controller's own counts (I/O queues)."""

    iodepth: int
    ios: int
    iops: float
    sq_doorbells: int
    cq_doorbells: int
    interrupts: int

    @property
    def doorbells_per_io(self) -> float:
        return (self.sq_doorbells + self.cq_doorbells) / self.ios if self.ios else 0.0


def _counts(stats: ControllerStatistics) -> tuple[int, int, int]:
    return stats.doorbell_sq_io, stats.doorbell_cq_io, stats.interrupts_raised


def measure(controller: Controller, driver: NvmeDriver, depth: int, ios: int, block_size: int) -> DemoResult:
    """Random reads on namespace 1 through the bench engine, one SQ doorbell decision per batch
    (blk-mq's plug), counted by the controller."""
    spec = JobSpec(rw="randread", bs=block_size, iodepth=depth, number_ios=ios, iodepth_batch_submit=0)
    before = _counts(controller.statistics())
    result = run_job(driver, spec)
    sq, cq, irq = (a - b for a, b in zip(_counts(controller.statistics()), before, strict=True))
    return DemoResult(depth, result.ios, result.iops, sq, cq, irq)


def compare(
    out: TextIO, depths: Sequence[int], ios: int, block_size: int
) -> list[tuple[DoorbellVariant, DemoResult]]:
    out.write(
        f"== {block_size // 1024}k random reads, null namespace (reads return zeroes), {ios} I/Os per depth, "
        "in-process ==\n"
    )
    out.write(
        f"{'variant':28} {'depth':>5} {'IOPS':>9} {'SQ db/IO':>9} {'CQ db/IO':>9} {'db/IO':>7} {'IRQ/IO':>7}\n"
    )
    results: list[tuple[DoorbellVariant, DemoResult]] = []
    for variant in VARIANTS:
        controller, transport, driver, memory = _build(variant)
        try:
            for depth in depths:
                result = measure(controller, driver, depth, ios, block_size)
                results.append((variant, result))
                n = result.ios
                out.write(
                    f"{variant.label:28} {depth:5d} {result.iops:9.0f} {result.sq_doorbells / n:9.3f} "
                    f"{result.cq_doorbells / n:9.3f} {result.doorbells_per_io:7.3f} {result.interrupts / n:7.3f}\n"
                )
                out.flush()
        finally:
            _close(controller, transport, driver, memory)
    return results


def run_demo(
    out: TextIO, *, depths: Sequence[int] = (1, 2, 4, 8), ios: int = 20_000, block_size: int = 4096
) -> int:
    out.write(
        f"vnvme demo: Python {platform.python_version()} on {platform.machine()}, "
        f"{os.cpu_count()} CPUs; controller and Linux-style driver in one process\n\n"
    )
    bring_up(out)
    compare(out, depths, ios, block_size)
    out.write("\n" + DOORBELL_NOTE)
    return 0


#: What the table counts and how this host submits (printed under it).
DOORBELL_NOTE = """\
db/IO: writes to the I/O queues' SQ tail and CQ head doorbells that reached the controller
(trapped BAR0 writes, counted by the controller), per I/O. With dbbuf the driver stores each new
tail / head in the shadow buffer and writes the doorbell only past the controller's EventIdx;
those stores are not counted.
The host here is the Python driver in the controller's own thread, interrupts on. It places a
whole batch (the depth at first, then as many commands as it just reaped) and rings once; the
controller runs only inside that doorbell write or while the host waits, so it always finds the
whole batch and completes it before the host looks again. Without dbbuf that is 1 SQ + 1 CQ
doorbell per batch: 2 / depth (0.250 at depth 8). vnvme bench (over a socket, one ring per
command as fio does) and a Linux guest (one ring per submission call, interrupted as completions
come) place commands differently, so their doorbells per I/O differ. In-process a doorbell is a
function call; over vfio-user each one is a socket message.
"""
