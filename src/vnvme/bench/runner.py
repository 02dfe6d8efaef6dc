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
import stat
import statistics
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
from vnvme.driver.driver import NvmeError, NvmeTimeout
from vnvme.driver.vfio_user import VfioUserTransport
from vnvme.vfio_user.protocol import Disconnected, ProtocolError


class BenchError(RuntimeError):
    """The run cannot go on for a reason outside this process; the message is one line for the user."""


#: What a server that fails, refuses or goes away raises in the client and the driver.
_SERVER_FAILURES = (OSError, Disconnected, ProtocolError, NvmeError, NvmeTimeout)

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
    repeat: int = 1  # which run of this point (1-based), with --repeat

    @property
    def doorbells(self) -> float:
        return self.sq_doorbells + self.cq_doorbells


def process_tree_cpu_seconds(pid: int) -> float | None:
    """utime + stime of process ``pid`` (all its threads) and every process under it, in
    seconds; None when ``pid`` is gone."""
    total = 0.0
    todo, seen = [pid], set()
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        try:
            with open(f"/proc/{current}/stat") as f:
                # the command name may hold spaces and parentheses: the fields follow the last ')'
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{current}/task/{current}/children") as f:
                todo += [int(child) for child in f.read().split()]
        except OSError:
            if current == pid:
                return None
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


class ServerProcess:
    """A ``vnvme serve`` (or any command with ``{socket}``) started for one variant.

    Its stderr (and an external server's stdout) goes to an unnamed file, never a pipe that
    could fill: read only when the server fails, for its own last word. ``vnvme serve``'s stdout
    is a pipe: its statistics arrive there, one JSON line per SIGUSR1.
    """

    def __init__(
        self, command: list[str], socket_path: str, cpus: frozenset[int] | None, *, ours: bool
    ) -> None:
        self.socket = socket_path
        self.ours = ours
        # O_APPEND: the server's writes land at the end whatever we read meanwhile. Closed in stop().
        self._log = tempfile.TemporaryFile(mode="a+b")  # noqa: SIM115
        self._stdout_buffer = b""
        try:
            self.proc = subprocess.Popen(
                command, stdout=subprocess.PIPE if ours else self._log, stderr=self._log
            )
        except OSError as exc:
            self._log.close()
            raise BenchError(f"cannot start the server {command[0]!r}: {exc.strerror or exc}") from None
        try:
            if cpus is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.sched_setaffinity(self.proc.pid, cpus)
            deadline = time.monotonic() + 60
            while not os.path.exists(socket_path):
                if self.proc.poll() is not None:
                    raise BenchError(self.failure())
                if time.monotonic() > deadline:
                    raise BenchError(
                        f"the server did not listen on {socket_path} within 60 s: {shlex.join(command)}"
                    )
                time.sleep(0.01)
        except BaseException:  # Ctrl-C included: never leave the server behind
            self.stop()
            raise

    def exited(self) -> bool:
        return self.proc.poll() is not None

    def failure(self) -> str:
        """One line on why the server is gone: its last line on stderr (its own message), else its status."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)  # it closed the socket or its stdout: let it finish exiting
        code = self.proc.returncode
        if code is None:
            return "the server stopped answering"
        status = f"signal {-code}" if code < 0 else f"status {code}"
        last = ""
        with contextlib.suppress(OSError, ValueError):
            size = self._log.seek(0, os.SEEK_END)
            self._log.seek(max(0, size - 4096))
            lines = self._log.read().decode(errors="replace").splitlines()
            last = next((line.strip() for line in reversed(lines) if line.strip()), "")
        return f"the server exited ({status}): {last}" if last else f"the server exited ({status})"

    def counters(self, timeout: float = 10.0) -> dict[str, Any] | None:
        """The controller's statistics (vnvme serve prints them on SIGUSR1), or None."""
        if not self.ours or self.proc.stdout is None:
            return None
        if self.exited():
            raise BenchError(self.failure())
        self.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        # Raw reads with our own line buffer: a buffered readline() may swallow the statistics
        # line along with an earlier one, and select() would then wait for data already read.
        fd = self.proc.stdout.fileno()
        while time.monotonic() < deadline:
            while b"\n" in self._stdout_buffer:
                line, _, self._stdout_buffer = self._stdout_buffer.partition(b"\n")
                with contextlib.suppress(ValueError):
                    data = json.loads(line)
                    if isinstance(data, dict) and "controller" in data:
                        return data
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                raise BenchError(self.failure())
            self._stdout_buffer += chunk
        raise BenchError("the server did not report its statistics")

    def cpu_seconds(self) -> float | None:
        """CPU time of the server and every process under it (run.sh starts QEMU as a child)."""
        return process_tree_cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()


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
    repeat: int = 1  # runs of every point, interleaved across placements and variants


def _client_cpu() -> float:
    return time.process_time()


@contextlib.contextmanager
def _server_for(
    options: BenchOptions, variant: Variant, placement: Placement, workdir: str, repeat: int
) -> Iterator[ServerProcess | None]:
    if options.socket is not None:
        yield None
        return
    path = os.path.join(workdir, f"{variant.name}-{placement.name}-{repeat}.sock")
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


def check_socket(path: str) -> None:
    """``--socket`` must name a socket: a regular file would only refuse connections until a timeout."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise BenchError(f"{path}: {exc.strerror or exc}") from None
    if not stat.S_ISSOCK(mode):
        raise BenchError(f"{path}: not a socket")


def _server_failure(server: ServerProcess | None, socket_path: str, exc: BaseException) -> BenchError:
    """The one line for a server that refused, failed or went away: its own word when it exited."""
    if server is not None:
        # A server that dies closes its socket before it can be reaped: give it a moment.
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.proc.wait(1)
        if server.exited():
            return BenchError(server.failure())
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
    return BenchError(f"{socket_path}: {reason}")


def run_variant(
    options: BenchOptions,
    variant: Variant,
    placement: Placement,
    workdir: str,
    progress: Callable[[Point], None],
    repeat: int = 1,
) -> list[Point]:
    points: list[Point] = []
    old_affinity = os.sched_getaffinity(0)
    if placement.client_cpus is not None:
        os.sched_setaffinity(0, placement.client_cpus)
    try:
        with _server_for(options, variant, placement, workdir, repeat) as server:
            socket_path = options.socket if server is None else server.socket
            assert socket_path is not None
            try:
                points = _measure(options, variant, placement, server, socket_path, progress, repeat)
            except _SERVER_FAILURES as exc:
                raise _server_failure(server, socket_path, exc) from exc
    finally:
        os.sched_setaffinity(0, old_affinity)
    return points


def _measure(
    options: BenchOptions,
    variant: Variant,
    placement: Placement,
    server: ServerProcess | None,
    socket_path: str,
    progress: Callable[[Point], None],
    repeat: int,
) -> list[Point]:
    points: list[Point] = []
    transport = VfioUserTransport(socket_path, posted_writes=variant.posted, mapped_doorbells=variant.mapped)
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
            raise BenchError("the controller does not offer shadow doorbells (OACS bit 8)")
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
            point.repeat = repeat
            points.append(point)
            progress(point)
    finally:
        if driver is not None:
            driver.close()  # its queues hold views of host memory: before the memory goes
        transport.close()
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
    """Every point ``options.repeat`` times; each round covers every placement and variant, so
    a machine that drifts over the run moves all of them alike."""
    if options.socket is not None:
        check_socket(options.socket)
    points: list[Point] = []
    with tempfile.TemporaryDirectory(prefix="vnvme-bench-") as workdir:
        for repeat in range(1, options.repeat + 1):
            for placement in options.placements:
                for name in options.variants:
                    points += run_variant(options, VARIANTS[name], placement, workdir, progress, repeat)
    return points


# Section: reporting


@dataclass(frozen=True)
class Spread:
    """One quantity over the runs of a point: every value, their median and extremes."""

    values: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def low(self) -> float:
        return min(self.values)

    @property
    def high(self) -> float:
        return max(self.values)

    def format(self, one: Callable[[float], str]) -> str:
        """The median, then (min-max) when there was more than one run."""
        if len(self.values) == 1:
            return one(self.median)
        return f"{one(self.median)} ({one(self.low)}-{one(self.high)})"

    def as_json(self) -> dict[str, object]:
        return {"median": self.median, "min": self.low, "max": self.high, "values": list(self.values)}


def runs_by_point(points: Sequence[Point]) -> dict[tuple[str, str, int], list[Point]]:
    """The runs of each (placement, variant, iodepth), in the order they ran."""
    out: dict[tuple[str, str, int], list[Point]] = {}
    for p in points:
        out.setdefault((p.placement, p.variant, p.iodepth), []).append(p)
    return out


def spread(runs: Sequence[Point], value: Callable[[Point], float]) -> Spread:
    return Spread(tuple(value(p) for p in runs))


def shown_doorbells(point: Point) -> float:
    """Doorbells per I/O as reported: stores into the mapped page for mappable doorbells, else MMIOs."""
    return point.mapped_doorbells if VARIANTS[point.variant].mapped else point.doorbells


def _median_or_none(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def _k(value: float) -> str:
    return f"{value / 1000:.1f}k"


def format_tables(points: Sequence[Point], options: BenchOptions, out: TextIO) -> None:
    runs = runs_by_point(points)
    if options.repeat > 1:
        print(
            f"\nEvery value is the median of {options.repeat} runs, IOPS with (min-max) across them; "
            "the runs of all variants interleave, so drift moves them alike.",
            file=out,
        )
    for placement in options.placements:
        by = {(v, d): r for (pl, v, d), r in runs.items() if pl == placement.name}
        if not by:
            continue
        print(f"\n### {placement.name}: {placement.describe()}\n", file=out)
        _summary_table(by, options, out)
        print(file=out)
        _detail_table(by, options, out)
    print("\n" + doorbell_note(options), file=out)


def _summary_table(by: dict[tuple[str, int], list[Point]], options: BenchOptions, out: TextIO) -> None:
    """IOPS, doorbells per I/O and the IOPS ratio to no dbbuf: a row per variant, a column per depth."""
    depths = options.depths
    print("| iodepth | " + " | ".join(map(str, depths)) + " |", file=out)
    print("|---|" + "---|" * len(depths), file=out)
    for name in options.variants:
        label = VARIANTS[name].label
        cells = [spread(by[name, d], lambda p: p.iops).format(_k) for d in depths]
        print(f"| IOPS, {label} | " + " | ".join(cells) + " |", file=out)
    for name in options.variants:
        label = VARIANTS[name].label
        key = "mapped doorbell stores" if VARIANTS[name].mapped else "doorbell MMIOs"
        values = [spread(by[name, d], shown_doorbells).median for d in depths]
        print(f"| {key} per IO, {label} | " + " | ".join(f"{v:.2f}" for v in values) + " |", file=out)
    if "no-dbbuf" in options.variants:
        for name in options.variants:
            if name == "no-dbbuf":
                continue
            ratios = [
                spread(by[name, d], lambda p: p.iops).median
                / max(spread(by["no-dbbuf", d], lambda p: p.iops).median, 1e-9)
                for d in depths
            ]
            print(
                f"| IOPS ratio, {VARIANTS[name].label} / no dbbuf | "
                + " | ".join(f"{r:.2f}x" for r in ratios)
                + " |",
                file=out,
            )


def _detail_table(by: dict[tuple[str, int], list[Point]], options: BenchOptions, out: TextIO) -> None:
    """Every point: IOPS, doorbells, latency percentiles, CPU per I/O."""
    print(
        "| variant | depth | IOPS | SQ db/IO | CQ db/IO | admin db/IO | p50 us | p99 us | p99.9 us "
        "| server CPU us/IO | client CPU us/IO | counted by |",
        file=out,
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|", file=out)
    for name in options.variants:
        for d in options.depths:
            r = by[name, d]

            def med(value: Callable[[Point], float], r: list[Point] = r) -> float:
                return spread(r, value).median

            server_cpu = _median_or_none([p.server_cpu_us for p in r])
            cpu = f"{server_cpu:.1f}" if server_cpu is not None else "n/a"
            print(
                f"| {VARIANTS[name].label} | {d} | {spread(r, lambda p: p.iops).format(lambda v: f'{v:.0f}')} "
                f"| {med(lambda p: p.sq_doorbells):.3f} | {med(lambda p: p.cq_doorbells):.3f} "
                f"| {med(lambda p: p.admin_doorbells):.3f} | {med(lambda p: p.lat_p50_us):.1f} "
                f"| {med(lambda p: p.lat_p99_us):.1f} | {med(lambda p: p.lat_p999_us):.1f} "
                f"| {cpu} | {med(lambda p: p.client_cpu_us):.1f} | {r[0].counted_by} |",
                file=out,
            )


def doorbell_note(options: BenchOptions) -> str:
    """What the tables count and how this host submits (printed under them)."""
    batch = options.spec.iodepth_batch_submit
    rings = (
        "once per command (fio's default)"
        if batch == 1
        else ("once per batch of all free slots" if batch == 0 else f"once per {batch} commands")
    )
    return (
        "doorbells per IO: writes to the I/O queues' SQ tail and CQ head doorbells that trapped to "
        "the controller (each a vfio-user message), per I/O; counted by the controller (by the client "
        "for an external server). With dbbuf the host stores each new tail / head in the shadow "
        "buffer and writes the doorbell only past the controller's EventIdx; those stores are not "
        "counted. Mappable doorbells: stores into the mapped page instead, none trapped.\n"
        "The host is this process's Python driver, as fio drives a device: it keeps iodepth commands "
        f"in flight per job and updates the SQ tail {rings} (--iodepth_batch_submit); it reaps "
        "every completion ready (waiting for the interrupt only when none is) and updates the CQ head "
        "once per reap. Without dbbuf that is 1 SQ doorbell per I/O plus 1 CQ doorbell per reap."
    )


def summary(points: Sequence[Point], jobname: Callable[[Point], str]) -> list[dict[str, object]]:
    """One entry per (placement, variant, iodepth): medians, IOPS and p99 with every run's value."""
    out: list[dict[str, object]] = []
    for (placement, variant, depth), runs in runs_by_point(points).items():
        out.append(
            {
                "placement": placement,
                "variant": variant,
                "iodepth": depth,
                "runs": len(runs),
                "jobnames": [jobname(p) for p in runs],
                "iops": spread(runs, lambda p: p.iops).as_json(),
                "doorbells_per_io": {
                    "sq": spread(runs, lambda p: p.sq_doorbells).median,
                    "cq": spread(runs, lambda p: p.cq_doorbells).median,
                    "admin": spread(runs, lambda p: p.admin_doorbells).median,
                    "mapped": spread(runs, lambda p: p.mapped_doorbells).median,
                },
                "counted_by": runs[0].counted_by,
                "lat_p99_us": spread(runs, lambda p: p.lat_p99_us).as_json(),
                "server_cpu_us_per_io": _median_or_none([p.server_cpu_us for p in runs]),
                "client_cpu_us_per_io": spread(runs, lambda p: p.client_cpu_us).median,
            }
        )
    return out


def progress_line(point: Point, repeats: int = 1) -> str:
    db = (
        f"{point.mapped_doorbells:.2f} mapped" if VARIANTS[point.variant].mapped else f"{point.doorbells:.2f}"
    )
    where = point.placement if repeats == 1 else f"{point.placement} {point.repeat}/{repeats}"
    return (
        f"[{where}] {VARIANTS[point.variant].label:<28} depth {point.iodepth:>3}: "
        f"{point.iops:>9.0f} IOPS  {db} doorbells/IO  p99 {point.lat_p99_us:.0f} us"
    )


def plot(points: Sequence[Point], options: BenchOptions, path: str) -> bool:
    """IOPS and doorbells per I/O against depth as a PNG; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig = plot_figure(points, options)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_figure(points: Sequence[Point], options: BenchOptions) -> Any:
    """The plot's matplotlib Figure: one line per variant (colour) and placement (line style),
    medians of the runs, IOPS bars from min to max with --repeat; one legend under both panels."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    labels = len(options.variants) * len(options.placements)
    legend_rows = -(-labels // 4)
    height = 4.4 + 0.25 * legend_rows
    fig, (ax_iops, ax_db) = plt.subplots(1, 2, figsize=(12, height))
    palette = plt.get_cmap("tab10")
    styles = ("-", "--", ":")
    runs = runs_by_point(points)
    for p_index, placement in enumerate(options.placements):
        for v_index, name in enumerate(options.variants):
            rows = [runs[k] for d in options.depths if (k := (placement.name, name, d)) in runs]
            if not rows:
                continue
            style = {
                "color": palette(v_index % 10),
                "linestyle": styles[p_index % len(styles)],
                "marker": "o",
                "label": f"{VARIANTS[name].label} ({placement.name})",
            }
            depths = [r[0].iodepth for r in rows]
            iops = [spread(r, lambda p: p.iops) for r in rows]
            medians = [s.median for s in iops]
            if options.repeat > 1:
                bars = [[s.median - s.low for s in iops], [s.high - s.median for s in iops]]
                ax_iops.errorbar(depths, medians, yerr=bars, capsize=3, **style)
            else:
                ax_iops.plot(depths, medians, **style)
            ax_db.plot(depths, [spread(r, shown_doorbells).median for r in rows], **style)
    runs_note = f", median of {options.repeat} runs (bars: min-max)" if options.repeat > 1 else ""
    for ax, ylabel, title in (
        (ax_iops, "IOPS", f"IOPS{runs_note}"),
        (ax_db, "doorbells per I/O", "doorbells per I/O (trapped writes; stores when mapped)"),
    ):
        ax.set_xscale("log", base=2)
        ax.set_xticks(options.depths, [str(d) for d in options.depths])
        ax.set_xlabel("iodepth")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
    ax_iops.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value / 1000:g}k" if value else "0"))
    # One legend for both panels, under them: it hides no line and keeps a readable size.
    handles, names = ax_db.get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=min(4, max(1, len(names))), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, (0.25 * legend_rows + 0.15) / height, 1, 1))
    return fig
