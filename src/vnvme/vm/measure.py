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
- Guest QEMU CPU per I/O: the same for the qemu-system process that runs the guest (its vCPUs
  under TCG, its I/O thread and, for QEMU's built-in nvme, the device itself).
- Machine CPUs busy: ``/proc/stat``'s busy time over the same window, as CPUs out of all.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
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
    #: CPU time of the guest's own QEMU process during the job, per I/O (microseconds).
    guest_qemu_cpu_us: float | None = None
    #: The machine's busy CPUs during the job (busy CPU-seconds per second), out of ``machine_cpus``.
    machine_busy_cpus: float | None = None
    machine_cpus: int | None = None

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
    cpu: CpuWindows | None = None,
) -> list[DepthResult]:
    """Per depth, what the guest measured (see the module's docstring); doorbells from vnvme's
    counters or else a traced boot; ``cpu``: what the host sampled around each fio job."""
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
        result = DepthResult(depth, iops, ios, sq, cq, p50, p99, mapped_doorbells=mapped)
        if cpu is not None:
            result.machine_busy_cpus = cpu.busy_cpus(depth)
            result.machine_cpus = cpu.machine_cpus
        if reads:
            result.interrupts = interrupts / reads if interrupts is not None else None
            if cpu is not None:
                result.server_cpu_us = cpu.per_io_us(SERVER, depth, reads)
                result.guest_qemu_cpu_us = cpu.per_io_us(GUEST_QEMU, depth, reads)
        out.append(result)
    return out


_FIO_BLOCK = re.compile(r"^@@(begin|end) fio-randread-d(\d+)\b")

#: What :class:`CpuWindows` samples: the vfio-user server's process tree, the guest's QEMU
#: process (CPU seconds); the machine's busy CPU-seconds, summed over its CPUs, and the time
#: that passed (``/proc/stat``'s jiffies of every kind over the CPUs, so that busy / elapsed
#: is the busy CPUs whatever the tick).
SERVER = "server"
GUEST_QEMU = "guest_qemu"
MACHINE_BUSY = "machine_busy"
MACHINE_ELAPSED = "machine_elapsed"


def parse_proc_stat(text: str) -> tuple[int, int, int] | None:
    """(busy jiffies, all jiffies, CPUs) from ``/proc/stat``: its ``cpu`` line (every CPU summed)
    and how many ``cpuN`` lines follow; None without them. Busy is user, nice, system, irq and
    softirq; idle, iowait and steal (time the hypervisor ran someone else) are not; guest and
    guest_nice are already inside user and nice, so neither part counts them again."""
    total: list[int] | None = None
    cpus = 0
    for line in text.splitlines():
        name, _, rest = line.partition(" ")
        if name == "cpu":
            fields = rest.split()
            if len(fields) < 4 or not all(field.isdigit() for field in fields):
                return None
            total = [int(field) for field in fields[:8]] + [0] * (8 - min(len(fields), 8))
        elif name.startswith("cpu") and name[3:].isdigit():
            cpus += 1
    if total is None or cpus == 0:
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = total
    busy = user + nice + system + irq + softirq
    return busy, busy + idle + iowait + steal, cpus


class MachineCpu:
    """The machine's CPU time from ``/proc/stat`` (``read``: its text), for :class:`CpuWindows`."""

    def __init__(self, read: Callable[[], str] | None = None) -> None:
        self._read = read or _read_proc_stat
        first = self._parse()
        self.cpus = first[2] if first is not None else None

    def _parse(self) -> tuple[int, int, int] | None:
        try:
            return parse_proc_stat(self._read())
        except OSError:
            return None

    def sources(self) -> dict[str, Callable[[], float | None]]:
        """Busy CPU-seconds summed over the CPUs, and the seconds that passed (per CPU)."""
        tick = os.sysconf("SC_CLK_TCK")

        def busy() -> float | None:
            parsed = self._parse()
            return parsed[0] / tick if parsed is not None else None

        def elapsed() -> float | None:
            parsed = self._parse()
            return parsed[1] / parsed[2] / tick if parsed is not None else None

        return {MACHINE_BUSY: busy, MACHINE_ELAPSED: elapsed}


def _read_proc_stat() -> str:
    with open("/proc/stat") as f:
        return f.read()


class CpuWindows:
    """What several sources counted during each fio job: every source (seconds, or None when it
    is gone) is read when the guest's fio block begins and when it ends, one after the other.
    Fed the guest's ``@@`` lines as they arrive (:meth:`Guest.boot`'s ``on_line``).
    ``seconds[source][depth]``: the difference; ``machine_cpus``: the CPUs the machine has."""

    def __init__(
        self, sources: Mapping[str, Callable[[], float | None]], machine_cpus: int | None = None
    ) -> None:
        self._sources = dict(sources)
        self._started: dict[tuple[str, int], float] = {}
        self.seconds: dict[str, dict[int, float]] = {name: {} for name in self._sources}
        self.machine_cpus = machine_cpus

    @classmethod
    def around_guest(
        cls, guest: Callable[[], float | None], server: Callable[[], float | None] | None = None
    ) -> CpuWindows:
        """The guest's QEMU, the server when there is one, and this machine's ``/proc/stat``."""
        machine = MachineCpu()
        sources = {GUEST_QEMU: guest, **machine.sources()}
        if server is not None:
            sources[SERVER] = server
        return cls(sources, machine.cpus)

    def on_line(self, line: str) -> None:
        match = _FIO_BLOCK.match(line)
        if match is None:
            return
        depth = int(match.group(2))
        for name, sample in self._sources.items():
            now = sample()
            if now is None:
                continue
            if match.group(1) == "begin":
                self._started[name, depth] = now
            elif (name, depth) in self._started:
                self.seconds[name][depth] = now - self._started.pop((name, depth))

    def per_io_us(self, source: str, depth: int, ios: int) -> float | None:
        """``source``'s CPU time during the job at ``depth``, per I/O (microseconds)."""
        seconds = self.seconds.get(source, {}).get(depth)
        return seconds * 1e6 / ios if seconds is not None and ios else None

    def busy_cpus(self, depth: int) -> float | None:
        """The machine's busy CPUs during the job at ``depth`` (busy CPU-seconds per second)."""
        busy = self.seconds.get(MACHINE_BUSY, {}).get(depth)
        elapsed = self.seconds.get(MACHINE_ELAPSED, {}).get(depth)
        return busy / elapsed if busy is not None and elapsed else None
