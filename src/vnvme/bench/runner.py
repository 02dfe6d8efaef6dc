"""``vnvme bench``: the shadow doorbell experiment with the device in its own process.

Each variant gets a fresh ``vnvme serve`` (or an external vfio-user server), pinned as the
placement says; the host driver runs here over the real socket, so every trapped doorbell costs
a message round trip, as it costs a VM an exit. Doorbells are counted by the controller (its
statistics, fetched with SIGUSR1 between runs); for an external server, by the client.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import select
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from vnvme.bench.engine import JobResult, JobSpec, run_job
from vnvme.controller import variants
from vnvme.controller.variants import VARIANTS as ALL_VARIANTS
from vnvme.controller.variants import DoorbellVariant
from vnvme.driver import NvmeDriver
from vnvme.vfio_user.client import VfioUserTransport

Variant = DoorbellVariant
#: What ``--variants`` offers, in order (declared in vnvme.controller.variants).
VARIANTS: dict[str, Variant] = {name: ALL_VARIANTS[name] for name in variants.BENCH}
DEFAULT_VARIANTS = variants.BENCH_DEFAULT
#: The variants that make sense against a server we do not start ourselves.
EXTERNAL_VARIANTS = variants.BENCH_EXTERNAL


@dataclass(frozen=True)
class Placement:
    name: str
    server_cpus: frozenset[int] | None
    client_cpus: frozenset[int] | None

    def describe(self) -> str:
        if self.server_cpus is None or self.client_cpus is None:
            return "unpinned"
        return f"server on CPU {','.join(map(str, sorted(self.server_cpus)))}, client on CPU " + ",".join(
            map(str, sorted(self.client_cpus))
        )


def placements(names: Sequence[str]) -> list[Placement]:
    cpus = sorted(os.sched_getaffinity(0))
    out = []
    for name in names:
        if name == "same":
            out.append(Placement("same", frozenset(cpus[:1]), frozenset(cpus[:1])))
        elif name == "split":
            if len(cpus) < 2:
                raise ValueError("--cpu split needs two CPUs")
            out.append(Placement("split", frozenset(cpus[-1:]), frozenset(cpus[:1])))
        elif name == "any":
            out.append(Placement("any", None, None))
        else:
            raise ValueError(f"unknown placement {name!r} (same, split, any)")
    return out


@dataclass
class Point:
    """One measured (placement, variant, depth)."""

    placement: str
    variant: str
    iodepth: int
    ios: int
    seconds: float
    iops: float
    sq_doorbells: float  # per I/O, I/O queues
    cq_doorbells: float
    admin_doorbells: float
    mapped_doorbells: float
    counted_by: str  # "controller" or "client"
    lat_p50_us: float
    lat_p99_us: float
    lat_p999_us: float
    server_cpu_us: float | None  # controller-process CPU time per I/O
    client_cpu_us: float
    result: JobResult = field(repr=False)

    @property
    def doorbells(self) -> float:
        return self.sq_doorbells + self.cq_doorbells


class ServerProcess:
    """A ``vnvme serve`` (or any command with ``{socket}``) started for one variant."""

    def __init__(
        self, command: list[str], socket_path: str, cpus: frozenset[int] | None, *, ours: bool
    ) -> None:
        self.socket = socket_path
        self.ours = ours
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self._stderr_buffer = b""
        if cpus is not None:
            with contextlib.suppress(ProcessLookupError):
                os.sched_setaffinity(self.proc.pid, cpus)
        deadline = time.monotonic() + 60
        while not os.path.exists(socket_path):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                self.stop()
                raise RuntimeError(f"server did not start: {' '.join(command)}\n{err}")
            time.sleep(0.01)

    def counters(self, timeout: float = 10.0) -> dict[str, Any] | None:
        """The controller's statistics (vnvme serve prints them on SIGUSR1), or None."""
        if not self.ours or self.proc.stderr is None:
            return None
        self.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        # Raw reads with our own line buffer: a buffered readline() may swallow the statistics
        # line along with an earlier one, and select() would then wait for data already read.
        fd = self.proc.stderr.fileno()
        while time.monotonic() < deadline:
            while b"\n" in self._stderr_buffer:
                line, _, self._stderr_buffer = self._stderr_buffer.partition(b"\n")
                with contextlib.suppress(ValueError):
                    data = json.loads(line)
                    if isinstance(data, dict) and "controller" in data:
                        return data
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            self._stderr_buffer += chunk
        raise RuntimeError("the server did not report its statistics")

    def cpu_seconds(self) -> float | None:
        """CPU time of the server and every process under it (run.sh starts QEMU as a child)."""
        total = 0.0
        todo, seen = [self.proc.pid], set()
        while todo:
            pid = todo.pop()
            if pid in seen:
                continue
            seen.add(pid)
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                with open(f"/proc/{pid}/task/{pid}/children") as f:
                    todo += [int(child) for child in f.read().split()]
            except OSError:
                if pid == self.proc.pid:
                    return None
                continue
            # utime + stime of the process; its threads are included.
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return total

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


@dataclass
class BenchOptions:
    spec: JobSpec
    depths: list[int]
    variants: list[str]
    placements: list[Placement]
    namespace: str = "null,size=1G"
    socket: str | None = None  # an external server already listening (one client per variant)
    server_cmd: str | None = None  # an external server to start per variant; "{socket}" is replaced
    ramp_ios: int = 200
    queue_depth: int = 64


def _client_cpu() -> float:
    return time.process_time()


@contextlib.contextmanager
def _server_for(
    options: BenchOptions, variant: Variant, placement: Placement, workdir: str
) -> Iterator[ServerProcess | None]:
    if options.socket is not None:
        yield None
        return
    path = os.path.join(workdir, f"{variant.name}-{placement.name}.sock")
    if options.server_cmd is not None:
        command = [part.replace("{socket}", path) for part in shlex.split(options.server_cmd)]
        server = ServerProcess(command, path, placement.server_cpus, ours=False)
    else:
        command = [sys.executable, "-m", "vnvme", "serve", "--socket", path, "--quiet"]
        command += ["--namespace", options.namespace, *variant.serve_args()]
        server = ServerProcess(command, path, placement.server_cpus, ours=True)
    try:
        yield server
    finally:
        server.stop()


def _delta(after: dict[str, Any] | None, before: dict[str, Any] | None, key: str) -> int:
    if after is None or before is None:
        return 0
    return int(after["controller"][key]) - int(before["controller"][key])


def run_variant(
    options: BenchOptions,
    variant: Variant,
    placement: Placement,
    workdir: str,
    progress: Callable[[Point], None],
) -> list[Point]:
    points: list[Point] = []
    old_affinity = os.sched_getaffinity(0)
    if placement.client_cpus is not None:
        os.sched_setaffinity(0, placement.client_cpus)
    try:
        with _server_for(options, variant, placement, workdir) as server:
            socket_path = options.socket if server is None else server.socket
            assert socket_path is not None
            transport = VfioUserTransport(
                socket_path, posted_writes=variant.posted, mapped_doorbells=variant.mapped
            )
            driver: NvmeDriver | None = None
            try:
                driver = NvmeDriver(
                    transport,
                    shadow_doorbells=variant.shadow,
                    io_queues=options.spec.numjobs,
                    io_queue_depth=max(options.queue_depth, max(options.depths) + 1),
                )
                driver.probe()
                if variant.shadow and not driver.dbbuf_enabled:
                    raise RuntimeError("the controller does not offer shadow doorbells (OACS bit 8)")
                for depth in options.depths:
                    spec = dataclasses.replace(options.spec, iodepth=depth, ramp_time=0.0)
                    if options.ramp_ios:
                        run_job(driver, dataclasses.replace(spec, number_ios=options.ramp_ios, runtime=None))
                    before = server.counters() if server is not None else None
                    cpu_before = server.cpu_seconds() if server is not None else None
                    client_before = _client_cpu()
                    result = run_job(driver, spec)
                    client_after = _client_cpu()
                    cpu_after = server.cpu_seconds() if server is not None else None
                    after = server.counters() if server is not None else None
                    point = _point(placement, variant, depth, result, before, after, cpu_before, cpu_after)
                    point.client_cpu_us = (client_after - client_before) / max(point.ios, 1) * 1e6
                    points.append(point)
                    progress(point)
            finally:
                if driver is not None:
                    driver.close()  # its queues hold views of host memory: before the memory goes
                transport.close()
    finally:
        os.sched_setaffinity(0, old_affinity)
    return points


def _point(
    placement: Placement,
    variant: Variant,
    depth: int,
    result: JobResult,
    before: dict[str, Any] | None,
    after: dict[str, Any] | None,
    cpu_before: float | None,
    cpu_after: float | None,
) -> Point:
    ios = result.total_ios
    per = 1.0 / max(ios, 1)
    if after is not None:
        sq = _delta(after, before, "doorbell_sq_io") * per
        cq = _delta(after, before, "doorbell_cq_io") * per
        admin = (
            _delta(after, before, "doorbell_sq_admin") + _delta(after, before, "doorbell_cq_admin")
        ) * per
        mapped = _delta(after, before, "mapped_doorbell_updates") * per
        counted_by = "controller"
    else:
        sq = result.sq_doorbells * per
        cq = result.cq_doorbells * per
        admin = 0.0
        mapped = 0.0
        counted_by = "client"
    if variant.mapped and after is None:
        sq, cq, mapped = 0.0, 0.0, (result.sq_doorbells + result.cq_doorbells) * per
    server_cpu = None
    if cpu_before is not None and cpu_after is not None:
        server_cpu = (cpu_after - cpu_before) * per * 1e6
    p50, p99, p999 = result.latency_percentiles_us((50.0, 99.0, 99.9))
    return Point(
        placement=placement.name,
        variant=variant.name,
        iodepth=depth,
        ios=ios,
        seconds=result.seconds,
        iops=result.iops,
        sq_doorbells=sq,
        cq_doorbells=cq,
        admin_doorbells=admin,
        mapped_doorbells=mapped,
        counted_by=counted_by,
        lat_p50_us=p50,
        lat_p99_us=p99,
        lat_p999_us=p999,
        server_cpu_us=server_cpu,
        client_cpu_us=0.0,
        result=result,
    )


def run_bench(options: BenchOptions, progress: Callable[[Point], None]) -> list[Point]:
    points: list[Point] = []
    with tempfile.TemporaryDirectory(prefix="vnvme-bench-") as workdir:
        for placement in options.placements:
            for name in options.variants:
                points += run_variant(options, VARIANTS[name], placement, workdir, progress)
    return points


# Section: reporting


def _k(value: float) -> str:
    return f"{value / 1000:.1f}k"


def format_tables(points: Sequence[Point], options: BenchOptions, out: TextIO) -> None:
    depths = options.depths
    for placement in options.placements:
        mine = [p for p in points if p.placement == placement.name]
        if not mine:
            continue
        by = {(p.variant, p.iodepth): p for p in mine}
        print(f"\n### {placement.name}: {placement.describe()}\n", file=out)
        print("| iodepth | " + " | ".join(map(str, depths)) + " |", file=out)
        print("|---|" + "---|" * len(depths), file=out)
        for name in options.variants:
            label = VARIANTS[name].label
            print(f"| IOPS, {label} | " + " | ".join(_k(by[name, d].iops) for d in depths) + " |", file=out)
        for name in options.variants:
            label = VARIANTS[name].label
            row = [by[name, d] for d in depths]
            key = "mapped doorbell stores" if VARIANTS[name].mapped else "doorbell MMIOs"
            values = [(p.mapped_doorbells if VARIANTS[name].mapped else p.doorbells) for p in row]
            print(f"| {key} per IO, {label} | " + " | ".join(f"{v:.2f}" for v in values) + " |", file=out)
        if "no-dbbuf" in options.variants:
            for name in options.variants:
                if name == "no-dbbuf":
                    continue
                ratios = [by[name, d].iops / max(by["no-dbbuf", d].iops, 1e-9) for d in depths]
                print(
                    f"| IOPS ratio, {VARIANTS[name].label} / no dbbuf | "
                    + " | ".join(f"{r:.2f}x" for r in ratios)
                    + " |",
                    file=out,
                )
        print(file=out)
        print(
            "| variant | depth | IOPS | SQ db/IO | CQ db/IO | admin db/IO | p50 us | p99 us | p99.9 us "
            "| server CPU us/IO | client CPU us/IO | counted by |",
            file=out,
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|---|", file=out)
        for name in options.variants:
            for d in depths:
                p = by[name, d]
                cpu = f"{p.server_cpu_us:.1f}" if p.server_cpu_us is not None else "n/a"
                print(
                    f"| {VARIANTS[name].label} | {d} | {p.iops:.0f} | {p.sq_doorbells:.3f} | {p.cq_doorbells:.3f} "
                    f"| {p.admin_doorbells:.3f} | {p.lat_p50_us:.1f} | {p.lat_p99_us:.1f} | {p.lat_p999_us:.1f} "
                    f"| {cpu} | {p.client_cpu_us:.1f} | {p.counted_by} |",
                    file=out,
                )


def progress_line(point: Point) -> str:
    db = (
        f"{point.mapped_doorbells:.2f} mapped" if VARIANTS[point.variant].mapped else f"{point.doorbells:.2f}"
    )
    return (
        f"[{point.placement}] {VARIANTS[point.variant].label:<28} depth {point.iodepth:>3}: "
        f"{point.iops:>9.0f} IOPS  {db} doorbells/IO  p99 {point.lat_p99_us:.0f} us"
    )


def plot(points: Sequence[Point], options: BenchOptions, path: str) -> bool:
    """IOPS and doorbells per I/O against depth, one line per variant and placement (PNG)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax_iops, ax_db) = plt.subplots(1, 2, figsize=(12, 4.6))
    palette = plt.get_cmap("tab10")
    styles = ("-", "--", ":")
    for p_index, placement in enumerate(options.placements):
        for v_index, name in enumerate(options.variants):
            row = [p for p in points if p.placement == placement.name and p.variant == name]
            if not row:
                continue
            # One colour per variant, one line style per placement.
            style = {
                "color": palette(v_index % 10),
                "linestyle": styles[p_index % len(styles)],
                "marker": "o",
                "label": f"{VARIANTS[name].label} ({placement.name})",
            }
            depths = [p.iodepth for p in row]
            ax_iops.plot(depths, [p.iops for p in row], **style)
            values = [p.mapped_doorbells if VARIANTS[name].mapped else p.doorbells for p in row]
            ax_db.plot(depths, values, **style)
    for ax, title in ((ax_iops, "IOPS"), (ax_db, "doorbells per I/O")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(options.depths, [str(d) for d in options.depths])
        ax.set_xlabel("iodepth")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    ax_iops.set_ylim(bottom=0)
    ax_db.set_ylim(bottom=0)
    ax_db.legend(fontsize=6.5, loc="upper right", ncol=1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
