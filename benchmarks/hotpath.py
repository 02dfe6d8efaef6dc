"""Instructions per I/O on the vfio-user hot path, counted by callgrind (deterministic, unlike
wall-clock time on a shared machine). 4 KiB random reads, null namespace, one queue pair, shadow
doorbells, the same server defaults as ``vnvme serve`` but for the SQ EventIdx policy, pinned to
``batch`` (the default when the baseline of 116,440 per I/O at depth 1 was taken, commit
561d57e: compare like with like), both processes pinned to one CPU. Figures, step by step, in
``benchmarks/HOTPATH.md``; each run says which build it measured (pure Python, or the hot path
compiled in place by ``scripts/build_mypyc.sh``).

    PYTHONPATH=src python benchmarks/hotpath.py server --depth 1 --ios 2000
    PYTHONPATH=src python benchmarks/hotpath.py client --depth 1 --ios 2000

``server``: the server process runs under callgrind, the client natively. After a warm-up the
client zeroes the server's counters (callgrind_control), runs ``--ios`` I/Os and dumps them.
Reported: the whole server process per I/O, and the part inside the device (NvmeFunction.run and
BAR0 writes: the controller core with its PCI glue), attributed by calling those two through
``functools.partial`` (callgrind's inclusive cost of ``partial_vectorcall``): the server is
handed a stand-in for the NvmeFunction (``_MeasuredDevice``), since a compiled NvmeFunction takes
no replacement of its methods (its other methods are the function's own, bound). The rest is the message path: select loop, receive, dispatch,
reply.

``client``: the client process runs under callgrind with collection on only during the measured
run (entered through ``operator.methodcaller``); the transport's doorbell writes and interrupt
waits are wrapped in ``functools.partial`` the same way, so the driver + engine part and the
vfio-user client part are reported apart.
"""

from __future__ import annotations

import argparse
import functools
import operator
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Any

from vnvme.bench.engine import JobSpec, run_job
from vnvme.driver import NvmeDriver
from vnvme.driver.vfio_user import VfioUserTransport

HERE = os.path.abspath(__file__)
VALGRIND = ["valgrind", "--tool=callgrind", "--dump-instr=no", "--dump-line=no"]


def _pin(pid: int) -> None:
    """Both processes on one CPU (the placement the hot path is tuned for), like bench --cpu same."""
    os.sched_setaffinity(pid, {min(os.sched_getaffinity(0))})


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONHASHSEED="0")
    src = os.path.join(os.path.dirname(os.path.dirname(HERE)), "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _wait_for(path: str, proc: subprocess.Popen[bytes], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("server did not start")
        time.sleep(0.05)


def _driver(path: str) -> tuple[VfioUserTransport, NvmeDriver]:
    transport = VfioUserTransport(path, timeout=600.0)
    driver = NvmeDriver(transport, io_queue_depth=64, command_timeout=600.0)
    driver.probe()
    if not driver.dbbuf_enabled:
        raise RuntimeError("no shadow doorbells")
    return transport, driver


def _build() -> str:
    """Which build of the hot path runs (scripts/build_mypyc.sh compiles it in place)."""
    import vnvme.controller.controller as controller

    return "mypyc (scripts/build_mypyc.sh)" if (controller.__file__ or "").endswith(".so") else "pure Python"


def _spec(depth: int, ios: int) -> JobSpec:
    return JobSpec(rw="randread", bs=4096, iodepth=depth, number_ios=ios)


def _totals(path: str) -> tuple[int, int]:
    """(program total, inclusive cost of partial_vectorcall) in instructions."""
    out = subprocess.run(
        ["callgrind_annotate", "--inclusive=yes", "--threshold=100", path],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    total = inside = 0
    for line in out.splitlines():
        match = re.match(r"\s*([\d,]+)\s+(?:\([^)]*\)\s+)?(.*)", line)
        if not match:
            continue
        count = int(match.group(1).replace(",", ""))
        if "PROGRAM TOTALS" in match.group(2):
            total = count
        elif re.search(r"\bpartial_vectorcall\b", match.group(2)) and "fallback" not in match.group(2):
            inside = max(inside, count)
    return total, inside


# Section: roles run under callgrind


class _MeasuredDevice:
    """What the server sees of the NvmeFunction (the Device protocol), its two entry points
    behind partials: ``run``, and the BAR0 region's ``write``. A compiled NvmeFunction takes no
    replacement of its methods, so the server is handed this stand-in; the other methods are
    the function's own, bound. No ``__getattr__``: it would slow every attribute lookup."""

    def __init__(self, function: Any) -> None:
        from vnvme.function import NvmeFunction
        from vnvme.vfio_user.protocol import PciRegion

        self.run = functools.partial(NvmeFunction.run, function)
        self.idle = function.idle
        self.next_deadline = function.next_deadline
        self.set_irqs = function.set_irqs
        self.attach = function.attach
        self.detach = function.detach
        self.reset = function.reset
        self.memory_changed = function.memory_changed
        self.regions = function.regions
        self.irqs = function.irqs
        self.memory = function.memory
        # Region is the server's plain dataclass: its write can be replaced in either build.
        self.regions[PciRegion.BAR0].write = functools.partial(NvmeFunction._bar0_write, function)


def serve_role(socket_path: str) -> None:
    """``vnvme serve --namespace null,size=1G`` with the device's entry points behind partials."""
    from vnvme import serve

    server_class = serve.VfioUserServer

    def measured(device: Any, *args: Any, **kwargs: Any) -> Any:
        return server_class(_MeasuredDevice(device), *args, **kwargs)

    serve.VfioUserServer = measured  # type: ignore[assignment,misc]
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    args = parser.parse_args(
        ["--socket", socket_path, "--quiet", "--namespace", "null,size=1G", "--sq-eventidx", "batch"]
    )
    serve.run(args)


def client_role(socket_path: str, depth: int, ios: int) -> None:
    transport, driver = _driver(socket_path)
    try:
        transport.mmio_write = functools.partial(VfioUserTransport.mmio_write, transport)  # type: ignore[method-assign]
        transport.wait_for_interrupt = functools.partial(  # type: ignore[method-assign]
            VfioUserTransport.wait_for_interrupt, transport
        )
        run_job(driver, _spec(depth, 200))

        class Measured:
            def go(self) -> None:
                run_job(driver, _spec(depth, ios))

        operator.methodcaller("go")(Measured())
    finally:
        driver.close()
        transport.close()


# Section: orchestration


def measure_server(depth: int, ios: int) -> None:
    workdir = tempfile.mkdtemp()
    path = os.path.join(workdir, "vnvme.sock")
    out = os.path.join(workdir, "callgrind.out")
    _pin(0)
    proc = subprocess.Popen(
        [*VALGRIND, f"--callgrind-out-file={out}", sys.executable, HERE, "_serve", path], env=_env()
    )
    try:
        _wait_for(path, proc)
        transport, driver = _driver(path)
        try:
            run_job(driver, _spec(depth, 200))
            subprocess.run(["callgrind_control", "-z", str(proc.pid)], check=True, capture_output=True)
            result = run_job(driver, _spec(depth, ios))
            subprocess.run(["callgrind_control", "-d", str(proc.pid)], check=True, capture_output=True)
        finally:
            driver.close()
            transport.close()
    finally:
        proc.terminate()
        proc.wait()
    dumps = sorted(f for f in os.listdir(workdir) if f.startswith("callgrind.out.") or f == "callgrind.out")
    first = next(f for f in dumps if f != "callgrind.out")  # the dump after the measured run
    total, device = _totals(os.path.join(workdir, first))
    n = result.ios
    print(
        f"server process, depth {depth}, {n} I/Os, {result.sq_doorbells_per_io:.2f} SQ doorbells/IO, {_build()}"
    )
    print(f"  total          {total / n:10.0f} instructions/IO")
    print(f"  device         {device / n:10.0f} instructions/IO (NvmeFunction.run + BAR0 writes)")
    print(f"  message path   {(total - device) / n:10.0f} instructions/IO (loop, receive, dispatch, reply)")


def measure_client(depth: int, ios: int) -> None:
    workdir = tempfile.mkdtemp()
    path = os.path.join(workdir, "vnvme.sock")
    out = os.path.join(workdir, "callgrind.out")
    _pin(0)
    server = subprocess.Popen(
        [sys.executable, "-m", "vnvme", "serve", "--socket", path, "--quiet", "--namespace", "null,size=1G"],
        env=_env(),
    )
    try:
        _wait_for(path, server)
        subprocess.run(
            [
                *VALGRIND,
                f"--callgrind-out-file={out}",
                "--collect-atstart=no",
                "--toggle-collect=methodcaller_call",
                sys.executable,
                HERE,
                "_client",
                path,
                str(depth),
                str(ios),
            ],
            check=True,
            env=_env(),
        )
    finally:
        server.terminate()
        server.wait()
    total, transport = _totals(out)
    print(f"client process, depth {depth}, {ios} I/Os, {_build()}")
    print(f"  total          {total / ios:10.0f} instructions/IO")
    print(f"  transport      {transport / ios:10.0f} instructions/IO (doorbell MMIO writes, interrupt waits)")
    print(f"  driver+engine  {(total - transport) / ios:10.0f} instructions/IO")


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_serve":
        serve_role(sys.argv[2])
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "_client":
        client_role(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
        return 0
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("side", choices=["server", "client"])
    parser.add_argument("--depth", type=int, default=1)
    parser.add_argument("--ios", type=int, default=2000)
    args = parser.parse_args()
    (measure_server if args.side == "server" else measure_client)(args.depth, args.ios)
    return 0


if __name__ == "__main__":
    sys.exit(main())
