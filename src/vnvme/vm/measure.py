"""What one guest boot measured, per fio job: parsed from the blocks the guest reports
(``guest_init.sh``) and the server's CPU time sampled by the host while the guest runs.

Per job (one fio randread at one depth, ``NUMJOBS`` jobs reported as one):

- IOPS and p50 / p99 completion latency: fio's JSON (``clat_ns`` percentiles, all jobs merged).
- Doorbells per I/O, SQ and CQ apart: vnvme's counters page (vendor log page C0h) read by the
  guest before and after the job, divided by the I/O commands the controller fetched in between;
  for QEMU's devices, a traced boot cut at the guest's marks (see ``guest.py``).
- Guest interrupts per I/O: the lines of ``/proc/interrupts`` that belong to the nvme I/O
  queues' vectors, summed over CPUs, after minus before, divided by the reads the block device
  completed in between (``/sys/block/<dev>/stat``).
- Server CPU per I/O: CPU time of the server's process tree (``/proc/<pid>/stat``) sampled when
  the guest starts and ends the fio block, divided by the same reads.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from vnvme.spec.log_pages import VNVME_COUNTERS, VNVME_COUNTERS_SIGNATURE
from vnvme.vm.guest import BootResult, trace_doorbells_between_marks


@dataclass
class DepthResult:
    depth: int
    iops: float
    ios: int  # I/Os the doorbells are divided by
    sq_doorbells: float | None  # per I/O, I/O queues; None: not counted
    cq_doorbells: float | None
    lat_p50_us: float | None = None
    lat_p99_us: float | None = None
    #: Interrupts the guest took on the nvme I/O queue vectors, per I/O.
    interrupts: float | None = None
    #: CPU time of the server process tree during the job, per I/O (microseconds).
    server_cpu_us: float | None = None
    #: Doorbell values vnvme found in a page the guest writes directly (not trapped), per I/O.
    mapped_doorbells: float | None = None

    @property
    def doorbells(self) -> float | None:
        if self.sq_doorbells is None or self.cq_doorbells is None:
            return None
        return self.sq_doorbells + self.cq_doorbells


def parse_counters(text: str) -> dict[str, int] | None:
    """vnvme's counters page from ``od -An -v -tx1`` output, or None if it is not that page."""
    try:
        data = bytes(int(token, 16) for token in text.split())
    except ValueError:
        return None
    if len(data) < VNVME_COUNTERS.size or not data.startswith(VNVME_COUNTERS_SIGNATURE):
        return None
    values = VNVME_COUNTERS.unpack(data)
    return {key: value for key, value in values.items() if isinstance(value, int)}


def fio_read_summary(block_json: Any) -> tuple[float, int, int, float | None, float | None]:
    """IOPS, I/Os, errors and p50/p99 completion latency (us) of fio's first job (with
    ``group_reporting``, all jobs as one)."""
    job = block_json["jobs"][0]
    read = job["read"]
    percentiles = read.get("clat_ns", {}).get("percentile", {})
    p50 = percentiles.get("50.000000")
    p99 = percentiles.get("99.000000")
    return (
        float(read["iops"]),
        int(read["total_ios"]),
        int(job.get("error", 0)),
        p50 / 1000 if p50 is not None else None,
        p99 / 1000 if p99 is not None else None,
    )


#: A vector of an nvme I/O queue: Linux names them nvme<instance>q<qid>, qid 0 the admin queue.
#: A vector shared with the admin queue ("nvme0q0, nvme0q1", one vector in all) counts too.
_IO_QUEUE_VECTOR = re.compile(r"\bnvme\d+q[1-9]\d*\b")


def parse_interrupts(text: str) -> int | None:
    """Interrupts on the nvme I/O queues' vectors, summed over CPUs, from ``/proc/interrupts``;
    None if the text has no CPU header."""
    lines = text.strip().splitlines()
    header = next((i for i, line in enumerate(lines) if line.split()[:1] == ["CPU0"]), None)
    if header is None:
        return None
    cpus = len(lines[header].split())
    total = 0
    for line in lines[header + 1 :]:
        if not _IO_QUEUE_VECTOR.search(line):
            continue
        counts = line.split()[1 : 1 + cpus]
        total += sum(int(count) for count in counts if count.isdigit())
    return total


def parse_block_reads(text: str) -> int | None:
    """Reads completed, the first field of ``/sys/block/<dev>/stat``."""
    fields = text.split()
    return int(fields[0]) if fields and fields[0].isdigit() else None


def _delta(boot: BootResult, name: str, depth: int, parse: Callable[[str], int | None]) -> int | None:
    before = boot.block(f"{name}-before-d{depth}")
    after = boot.block(f"{name}-after-d{depth}")
    if before is None or after is None or not before.ok or not after.ok:
        return None
    a, b = parse(before.text), parse(after.text)
    return b - a if a is not None and b is not None else None


def _counted_doorbells(boot: BootResult, depth: int) -> tuple[int, float, float, float] | None:
    """(I/O commands, SQ, CQ and mapped doorbells per I/O) from vnvme's counters around the job."""
    before = boot.block(f"counters-before-d{depth}")
    after = boot.block(f"counters-after-d{depth}")
    if before is None or after is None:
        return None
    a, b = parse_counters(before.text), parse_counters(after.text)
    if a is None or b is None:
        return None
    ios = b["io_commands"] - a["io_commands"]
    sq = (b["doorbell_sq_io"] - a["doorbell_sq_io"]) / max(ios, 1)
    cq = (b["doorbell_cq_io"] - a["doorbell_cq_io"]) / max(ios, 1)
    mapped = (b["mapped_doorbell_updates"] - a["mapped_doorbell_updates"]) / max(ios, 1)
    return ios, sq, cq, mapped


def _traced_doorbells(traced: BootResult, index: int, depth: int) -> tuple[int, float, float] | None:
    """(I/Os, SQ and CQ doorbells per I/O) of job ``index`` in a traced boot of QEMU."""
    intervals = trace_doorbells_between_marks(traced.trace)
    # marks come in pairs around each job: interval 2*index is the job itself
    block = traced.block(f"fio-randread-d{depth}")
    if len(intervals) <= 2 * index or block is None or not block.ok:
        return None
    ios = _delta(traced, "iostat", depth, parse_block_reads)
    if ios is None:
        _, ios, _, _, _ = fio_read_summary(block.json())
    interval = intervals[2 * index]
    return ios, interval["sq_io"] / max(ios, 1), interval["cq_io"] / max(ios, 1)


def depth_results(
    boot: BootResult,
    depths: Sequence[int],
    *,
    traced: BootResult | None = None,
    server_cpu: dict[int, float] | None = None,
) -> list[DepthResult]:
    """Per depth, what the guest measured (see the module's docstring); doorbells from vnvme's
    counters or else a traced boot; ``server_cpu``: the server's CPU seconds per depth."""
    out = []
    for index, depth in enumerate(depths):
        block = boot.block(f"fio-randread-d{depth}")
        if block is None or not block.ok:
            raise RuntimeError(f"{boot.name}: fio at depth {depth} did not complete")
        iops, fio_ios, _, p50, p99 = fio_read_summary(block.json())
        counted = _counted_doorbells(boot, depth)
        mapped = counted[3] if counted is not None else None
        doorbells = counted[:3] if counted is not None else None
        if doorbells is None and traced is not None:
            doorbells = _traced_doorbells(traced, index, depth)
        ios, sq, cq = doorbells if doorbells is not None else (fio_ios, None, None)
        reads = _delta(boot, "iostat", depth, parse_block_reads)
        interrupts = _delta(boot, "irq", depth, parse_interrupts)
        cpu = (server_cpu or {}).get(depth)
        result = DepthResult(depth, iops, ios, sq, cq, p50, p99, mapped_doorbells=mapped)
        if reads:
            result.interrupts = interrupts / reads if interrupts is not None else None
            result.server_cpu_us = cpu * 1e6 / reads if cpu is not None else None
        out.append(result)
    return out


_FIO_BLOCK = re.compile(r"^@@(begin|end) fio-randread-d(\d+)\b")


class CpuWindows:
    """The server's CPU seconds during each fio job: ``sample`` (the server's CPU time, or None
    when it is gone) is read when the guest's fio block begins and when it ends. Fed the
    guest's ``@@`` lines as they arrive (:meth:`Guest.boot`'s ``on_line``)."""

    def __init__(self, sample: Callable[[], float | None]) -> None:
        self._sample = sample
        self._started: dict[int, float] = {}
        self.seconds: dict[int, float] = {}

    def on_line(self, line: str) -> None:
        match = _FIO_BLOCK.match(line)
        if match is None:
            return
        now = self._sample()
        depth = int(match.group(2))
        if now is None:
            return
        if match.group(1) == "begin":
            self._started[depth] = now
        elif depth in self._started:
            self.seconds[depth] = now - self._started.pop(depth)
