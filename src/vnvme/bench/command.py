"""The ``vnvme bench`` command line: fio's vocabulary, variants, placement, outputs."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import signal
import sys
import time
from collections.abc import Iterator
from types import FrameType
from typing import TextIO

from vnvme.bench.runner import (
    DEFAULT_VARIANTS,
    EXTERNAL_VARIANTS,
    VARIANTS,
    BenchError,
    BenchOptions,
    Point,
    format_tables,
    placements,
    plot,
    progress_line,
    run_bench,
    summary,
)
from vnvme.controller.namespace import parse_size
from vnvme.paths import check_output_file

EXIT_OK = 0
EXIT_FAILED = 1  # the run failed: a server did not start, refused, went away; an I/O failed
EXIT_USAGE = 2  # a bad option or value (argparse's own code for the same)

EPILOG = """\
exit status:
  0    the run completed and the report is written
  1    the run failed: a server did not start (its own message is shown), the socket
       cannot be reached or refuses, the server went away, an I/O failed
  2    usage: a bad option or value
  130  interrupted by Ctrl-C (SIGINT)
  143  interrupted by SIGTERM
On every failure and interruption one line on stderr says why; the servers this command
started are stopped and their sockets removed first.
"""


def _list_of_ints(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError("values must be positive")
    return values


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG  # exit statuses, one per line: for a formatter that keeps line breaks
    _workload_arguments(parser.add_argument_group("workload (fio's names)"))
    _experiment_arguments(parser.add_argument_group("experiment"))


def _workload_arguments(fio: argparse._ArgumentGroup) -> None:
    fio.add_argument(
        "--rw",
        default="randread",
        choices=["randread", "randwrite", "read", "write", "randrw"],
        help="I/O pattern: random or sequential reads or writes, or a random mix (randread)",
    )
    fio.add_argument("--rwmixread", type=int, default=50, help="percentage of reads for --rw randrw (50)")
    fio.add_argument("--bs", type=_size, default=4096, help="block size (4k)")
    fio.add_argument(
        "--iodepth", type=_list_of_ints, default=[1, 2, 4, 8], help="depths to measure (1,2,4,8)"
    )
    fio.add_argument(
        "--iodepth_batch_submit",
        type=int,
        default=1,
        help="commands placed per SQ tail update: 1 (fio's default) rings for each, 0 for the whole batch",
    )
    fio.add_argument("--numjobs", type=int, default=1, help="jobs, one I/O queue pair each (1)")
    fio.add_argument("--runtime", type=float, help="seconds per measurement (instead of --number_ios)")
    fio.add_argument("--number_ios", type=int, default=10_000, help="I/Os per job and measurement (10000)")
    fio.add_argument(
        "--ramp_time", type=float, default=0.0, help="seconds of warm-up I/O before each measurement"
    )
    fio.add_argument("--size", type=_size, help="bytes of the namespace to use (all of it)")
    fio.add_argument("--offset", type=_size, default=0, help="where the range starts (0)")
    fio.add_argument("--verify", choices=["crc32c"], help="write a pattern and check it on read")
    fio.add_argument(
        "--output-format",
        choices=["normal", "json", "json+"],
        default="normal",
        help="normal: Markdown tables; json: fio's JSON plus a 'vnvme' block; json+: json with "
        "fio's latency histogram ('bins' in clat_ns) (normal)",
    )
    fio.add_argument("--output", metavar="FILE", help="write the report (tables or JSON) to FILE")
    fio.add_argument("--json-output", metavar="FILE", help="also write the fio-format JSON report to FILE")


def _experiment_arguments(exp: argparse._ArgumentGroup) -> None:
    exp.add_argument(
        "--variants",
        default=",".join(DEFAULT_VARIANTS),
        help="comma-separated, or 'all': " + ", ".join(f"{n} ({v.label})" for n, v in VARIANTS.items()),
    )
    exp.add_argument(
        "--cpu",
        default="same,split",
        help="placements to measure: same (server and client share a CPU), split (one CPU each), "
        "any (unpinned); comma-separated (same,split)",
    )
    exp.add_argument("--namespace", default="null,size=1G", help="the namespace vnvme serves (null,size=1G)")
    exp.add_argument("--queue-depth", type=int, default=64, help="entries of each I/O queue (64)")
    exp.add_argument("--socket", help="drive a vfio-user NVMe server already listening on SOCKET instead")
    exp.add_argument(
        "--server-cmd",
        help="start this server for each variant instead of vnvme serve ('{socket}' is replaced), e.g. "
        "'../shared/tools/qemu-vfio-user-server/run.sh {socket}'",
    )
    exp.add_argument(
        "--repeat",
        type=_positive,
        default=1,
        metavar="N",
        help="run every point N times, interleaved across variants; tables show the median and "
        "(min-max), the JSON every run (1)",
    )
    exp.add_argument(
        "--plot", metavar="PNG", help="IOPS and doorbells per I/O against depth (needs matplotlib)"
    )


def options_from(args: argparse.Namespace) -> BenchOptions:
    from vnvme.bench.engine import JobSpec

    names = (
        list(VARIANTS)
        if args.variants == "all"
        else [v.strip() for v in args.variants.split(",") if v.strip()]
    )
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    external = args.socket is not None or args.server_cmd is not None
    if external:
        names = [n for n in names if n in EXTERNAL_VARIANTS] if args.variants == "all" else names
        bad = [n for n in names if n not in EXTERNAL_VARIANTS]
        if bad:
            raise ValueError(
                f"variant(s) {', '.join(bad)} need vnvme serve; an external server takes {EXTERNAL_VARIANTS}"
            )
    spec = JobSpec(
        rw=args.rw,
        rwmixread=args.rwmixread,
        bs=args.bs,
        iodepth=1,
        numjobs=args.numjobs,
        runtime=args.runtime,
        number_ios=None if args.runtime else args.number_ios,
        ramp_time=0.0,
        size=args.size,
        offset=args.offset,
        verify=args.verify,
        iodepth_batch_submit=args.iodepth_batch_submit,
    )
    place = placements([p.strip() for p in args.cpu.split(",") if p.strip()])
    if args.socket is not None and any(p.server_cpus is not None for p in place):
        place = [p for p in place if p.name == "any"] or placements(["any"])
    return BenchOptions(
        spec=spec,
        depths=args.iodepth,
        variants=names,
        placements=place,
        namespace=args.namespace,
        socket=args.socket,
        server_cmd=args.server_cmd,
        ramp_ios=0 if args.ramp_time == 0 else 200,
        queue_depth=args.queue_depth,
        repeat=args.repeat,
    )


def machine_description() -> str:
    """Host name, CPUs this process may use, CPU model, kernel and Python: for every report."""
    cpus = len(os.sched_getaffinity(0))
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{platform.node()}: {cpus} CPUs ({model}), Linux {platform.release()}, Python {platform.python_version()}"


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived: unwind (stopping every server on the way), then exit 128 + signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def _interruptible() -> Iterator[None]:
    """SIGINT and SIGTERM become :class:`Interrupted`. A second one while the servers are being
    stopped is ignored: that cleanup is bounded (ServerProcess.stop) and must not be cut short."""

    def interrupted(signum: int, frame: FrameType | None) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        raise Interrupted(signum)

    old = {sig: signal.signal(sig, interrupted) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _write_reports(
    args: argparse.Namespace,
    points: list[Point],
    options: BenchOptions,
    started: float,
    heading: tuple[str, str],
    out: TextIO,
    err: TextIO,
) -> None:
    """The report (tables, or JSON) to --output or ``out``; --json-output and --plot besides."""
    stream = open(args.output, "w") if args.output else out  # noqa: SIM115 - closed below
    try:
        if args.output_format in ("json", "json+"):
            report = json_report(points, options, started, bins=args.output_format == "json+")
            json.dump(report, stream, indent=2)
            stream.write("\n")
        else:
            print(f"# vnvme bench: {heading[0]}", file=stream)
            print(f"machine: {heading[1]}", file=stream)
            format_tables(points, options, stream)
    finally:
        if stream is not out:
            stream.close()
    if args.json_output:
        with open(args.json_output, "w") as f:
            json.dump(json_report(points, options, started), f, indent=2)
            f.write("\n")
    if args.plot:
        if plot(points, options, args.plot):
            print(f"plot: {args.plot}", file=err)
        else:
            print("plot: matplotlib is not installed (pip install 'vnvme[plot]')", file=err)


def run(args: argparse.Namespace, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """The bench; returns the exit status (EPILOG). ValueError means a bad option (EXIT_USAGE)."""
    options = options_from(args)
    for option, path in (
        ("--output", args.output),
        ("--json-output", args.json_output),
        ("--plot", args.plot),
    ):
        if path is not None:
            check_output_file(option, path)  # before the run: its results would be lost
    started = time.time()
    what = f"{options.spec.rw} bs={options.spec.bs} numjobs={options.spec.numjobs}"
    amount = f"{options.spec.runtime} s" if options.spec.runtime else f"{options.spec.number_ios} I/Os"
    runs = f", {options.repeat} runs" if options.repeat > 1 else ""
    target = options.socket or options.server_cmd or f"vnvme serve ({options.namespace})"
    machine = machine_description()  # now: progress runs pinned to the client's CPUs
    first = True

    def progress(point: Point) -> None:
        nonlocal first
        if first:  # said once a point is measured: a run that cannot start says only why
            first = False
            print(
                f"vnvme bench: {what}, {amount} per point{runs}, depths {options.depths}, against {target}",
                file=err,
            )
            print(f"machine: {machine}", file=err)
            for p in options.placements:
                print(f"placement {p.name}: {p.describe()}", file=err)
        print(progress_line(point, options.repeat), file=err, flush=True)

    try:
        with _interruptible():
            try:
                points = run_bench(options, progress)
            except BenchError as exc:
                print(f"vnvme bench: {exc}", file=err)
                return EXIT_FAILED
    except Interrupted as exc:
        print(f"vnvme bench: interrupted by {signal.Signals(exc.signum).name}", file=err)
        return 128 + exc.signum
    try:
        heading = (f"{what}, {amount} per point{runs}, against {target}", machine)
        _write_reports(args, points, options, started, heading, out, err)
    except BrokenPipeError:
        raise  # our reader left (vnvme bench | head): the command line's business, not a failure
    except OSError as exc:  # checked before the run, yet the disk can still fill up
        print(f"vnvme bench: cannot write the report: {exc}", file=err)
        return EXIT_FAILED
    print(f"done in {time.time() - started:.1f} s", file=err)
    return EXIT_OK


def jobname(point: Point, options: BenchOptions) -> str:
    name = f"{point.variant}/qd{point.iodepth}/{point.placement}"
    return name if options.repeat == 1 else f"{name}/r{point.repeat}"


def json_report(
    points: list[Point], options: BenchOptions, started: float, *, bins: bool = False
) -> dict[str, object]:
    """fio's JSON, one job per run; the 'vnvme' block has each run's counters ("points") and,
    per (placement, variant, iodepth), the median and spread over its runs ("summary").
    ``bins``: fio's json+ latency histogram in each job's clat_ns."""
    from vnvme.bench.fio_json import to_fio_json

    jobs = []
    extra_points = []
    for p in points:
        name = jobname(p, options)
        jobs.append((name, dataclasses.replace(options.spec, iodepth=p.iodepth), p.result))
        extra_points.append(
            {
                "jobname": name,
                "variant": p.variant,
                "placement": p.placement,
                "iodepth": p.iodepth,
                "repeat": p.repeat,
                "doorbells_per_io": {
                    "sq": p.sq_doorbells,
                    "cq": p.cq_doorbells,
                    "admin": p.admin_doorbells,
                    "mapped": p.mapped_doorbells,
                },
                "counted_by": p.counted_by,
                # Measured I/Os per job (its own I/O queue), in queue order: the fairness across them.
                "queue_ios": list(p.result.job_ios),
                "server_cpu_us_per_io": p.server_cpu_us,
                "client_cpu_us_per_io": p.client_cpu_us,
            }
        )
    extra = {
        "machine": machine_description(),
        "placements": {p.name: p.describe() for p in options.placements},
        "repeat": options.repeat,
        "points": extra_points,
        "summary": summary(points, lambda p: jobname(p, options)),
        "started": started,
    }
    return to_fio_json(jobs, extra=extra, bins=bins)
