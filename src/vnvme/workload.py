"""A closed-loop random I/O workload through the host driver, fio-style.

Like fio with libaio: keep ``iodepth`` commands in flight; when completions arrive, reap all of
them (one CQ head update), then submit as many new commands and ring once (blk-mq's plug and
``commit_rqs``: one SQ doorbell decision per batch). Doorbell MMIOs are counted by the
controller when it is in reach (in-process), else by the driver.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

from vnvme.controller.controller import Controller, ControllerStatistics
from vnvme.driver.driver import NvmeDriver, NvmeError
from vnvme.driver.transport import DmaBuffer
from vnvme.spec.commands import NvmOpcode


@dataclass(frozen=True)
class WorkloadResult:
    iodepth: int
    ios: int
    seconds: float
    #: I/O queue doorbell writes that trapped (BAR0), SQ tail and CQ head.
    sq_doorbells: int
    cq_doorbells: int
    interrupts: int
    #: Rearm races the controller lost (it found work while publishing EventIdx).
    rearms_lost: int
    #: Where the doorbell counts come from: "controller" or "driver".
    counted_by: str

    @property
    def iops(self) -> float:
        return self.ios / self.seconds if self.seconds > 0 else 0.0

    @property
    def doorbells_per_io(self) -> float:
        return (self.sq_doorbells + self.cq_doorbells) / self.ios if self.ios else 0.0


def _snapshot(driver: NvmeDriver, controller: Controller | None) -> tuple[int, int, int, int]:
    if controller is not None:
        stats: ControllerStatistics = controller.statistics()
        return stats.doorbell_sq_io, stats.doorbell_cq_io, stats.interrupts_raised, stats.rearms_lost
    return driver.stats.sq_doorbell_mmio, driver.stats.cq_doorbell_mmio, 0, 0


def run_random_io(
    driver: NvmeDriver,
    *,
    nsid: int = 1,
    iodepth: int = 1,
    ios: int = 10_000,
    block_size: int = 4096,
    write: bool = False,
    qid: int = 1,
    seed: int = 0,
    controller: Controller | None = None,
) -> WorkloadResult:
    """Random reads (or writes) of ``block_size`` bytes over the whole namespace."""
    ns = driver.namespaces[nsid]
    if block_size % ns.lba_size:
        raise ValueError(f"block size {block_size} is not a multiple of the LBA size {ns.lba_size}")
    qp = driver.queue(qid)
    if iodepth < 1 or iodepth > qp.depth - 1:
        raise ValueError(f"iodepth must be in 1..{qp.depth - 1} for this queue")
    nlb = block_size // ns.lba_size
    blocks = ns.nlba // nlb
    rng = random.Random(seed)
    memory = driver.transport.memory
    buffers: list[DmaBuffer] = [memory.alloc(block_size) for _ in range(iodepth)]
    free_buffers = list(range(iodepth))
    buffer_of: dict[int, int] = {}
    opcode = NvmOpcode.WRITE if write else NvmOpcode.READ

    def submit() -> None:
        index = free_buffers.pop()
        cid = qp.free_cids[-1]
        slba = rng.randrange(blocks) * nlb
        sqe = driver.io_sqe(qp, opcode, nsid, slba, nlb, buffers[index], length=block_size, cid_hint=cid)
        qp.submit(sqe)
        buffer_of[cid] = index

    before = _snapshot(driver, controller)
    start = time.perf_counter()
    issued = done = 0
    try:
        while issued < min(iodepth, ios):
            submit()
            issued += 1
        qp.ring_sq()
        while done < ios:
            completions = qp.wait()
            for cqe in completions:
                if cqe.status:
                    raise NvmeError("workload I/O", cqe)
                free_buffers.append(buffer_of.pop(cqe.cid))
            done += len(completions)
            more = min(len(completions), ios - issued)
            for _ in range(more):
                submit()
            issued += more
            if more:
                qp.ring_sq()
        seconds = time.perf_counter() - start
    finally:
        for buf in buffers:
            memory.free(buf)
    after = _snapshot(driver, controller)
    return WorkloadResult(
        iodepth=iodepth,
        ios=done,
        seconds=seconds,
        sq_doorbells=after[0] - before[0],
        cq_doorbells=after[1] - before[1],
        interrupts=after[2] - before[2],
        rearms_lost=after[3] - before[3],
        counted_by="controller" if controller is not None else "driver",
    )
