"""Scale runs: many I/O queues on one controller, many ``vnvme serve`` processes at once.

Queues: ``numjobs`` jobs of the workload engine, one I/O queue pair each, against one controller,
in this process or over vfio-user (``vnvme serve`` in its own process). Reported per queue: the
commands it completed in the measured window and its IOPS, then the min / max ratio and the
total. With fewer MSI-X vectors than queues the queues share vectors (``NvmeDriver.interrupt_vector``).

Servers: N ``vnvme serve`` processes, each with a file namespace of its own, and N client
processes, one per server, all at once. Each client writes a pattern only it can produce (its
tag in every block) over the first part of its namespace and checks it reading back, runs a
verified random read / write job on the rest, then reads its tagged part again. Afterwards every
file must hold exactly its own client's tags: a block reaching the wrong server shows there.
Each server's descriptors (/proc/PID/fd) and memory (/proc/PID/status) are sampled before its
client connects, once it has connected, in the middle of the I/O, at its end, and after the
client is gone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import multiprocessing
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, TextIO

from vnvme.bench.engine import JobResult, JobSpec, run_job
from vnvme.bench.runner import ServerProcess
from vnvme.controller.config import ControllerConfig
from vnvme.controller.controller import Controller
from vnvme.controller.namespace import parse_namespace_spec
from vnvme.driver import HostMemory, InProcessTransport, NvmeDriver
from vnvme.driver.transport import HostTransport
from vnvme.driver.vfio_user import VfioUserTransport
from vnvme.memory import GuestMemory

#: The reference ask: 64 I/O queues of depth 32 against one controller.
QUEUES = 64
IODEPTH = 32


# Section: many queues


@dataclass(frozen=True)
class QueueRun:
    """One run of ``queues`` jobs at ``iodepth``, one I/O queue each."""

    transport: str
    queues: int
    iodepth: int
    #: MSI-X vectors the host had for its queues (the admin queue's vector 0 included).
    vectors: int
    #: The vector each I/O queue's CQ uses, in queue order.
    queue_vectors: tuple[int, ...]
    result: JobResult
    #: Commands the controller fetched from each I/O SQ (in-process only: it is in reach).
    fetched: tuple[int, ...] | None = None

    @property
    def job_ios(self) -> tuple[int, ...]:
        return self.result.job_ios

    @property
    def queue_iops(self) -> list[float]:
        seconds = self.result.elapsed
        return [ios / seconds if seconds > 0 else 0.0 for ios in self.job_ios]

    @property
    def fairness(self) -> float:
        """min / max of the per-queue completed I/Os (1.0: all equal)."""
        counts = self.job_ios
        most = max(counts, default=0)
        return min(counts) / most if most else 0.0


def queue_spec(
    queues: int = QUEUES,
    iodepth: int = IODEPTH,
    *,
    runtime: float | None = None,
    number_ios: int | None = None,
    rw: str = "randread",
    bs: int = 4096,
    verify: str | None = None,
) -> JobSpec:
    return JobSpec(
        rw=rw, bs=bs, iodepth=iodepth, numjobs=queues, runtime=runtime, number_ios=number_ios, verify=verify
    )


def _drive(transport: HostTransport, spec: JobSpec, name: str) -> tuple[NvmeDriver, QueueRun]:
    driver = NvmeDriver(transport, io_queues=spec.numjobs, io_queue_depth=spec.iodepth + 1)
    try:
        driver.probe()
        if len(driver.io) != spec.numjobs:
            raise RuntimeError(
                f"asked for {spec.numjobs} I/O queues, the controller granted {len(driver.io)}"
            )
        result = run_job(driver, spec)
    except BaseException:
        driver.close()  # its queues hold views of the host memory the caller unmaps
        raise
    run = QueueRun(
        name,
        spec.numjobs,
        spec.iodepth,
        transport.interrupt_vectors,
        tuple(qp.vector for qp in driver.io),
        result,
    )
    return driver, run


def run_queues_in_process(
    spec: JobSpec, *, namespace: str = "null,size=1G", vectors: int | None = None
) -> QueueRun:
    """``spec`` against a controller in this process; ``vectors``: its MSI-X table size
    (default: one per I/O queue and the admin queue's)."""
    queues = max(spec.numjobs, QUEUES)
    config = ControllerConfig(max_io_queues=queues, interrupt_vectors=vectors or queues + 1)
    controller = Controller(GuestMemory(), [parse_namespace_spec(namespace, 1)], config)
    need = spec.numjobs * (spec.iodepth * spec.bs + 4 * 4096) + (16 << 20)
    memory = HostMemory(-(-need // 4096) * 4096)
    transport = InProcessTransport.attach(controller, memory)
    driver: NvmeDriver | None = None
    try:
        driver, run = _drive(transport, spec, "in-process")
        # Over the whole run (a verify job's fill and read-back included), not just the window.
        fetched = tuple(
            sq.entries if (sq := controller.sqs[qid]) is not None else 0 for qid in range(1, spec.numjobs + 1)
        )
        return dataclasses.replace(run, fetched=fetched)
    finally:
        if driver is not None:
            driver.close()
        transport.close()
        memory.close()
        controller.close()


def run_queues_vfio_user(
    spec: JobSpec,
    *,
    namespace: str = "null,size=1G",
    vectors: int | None = None,
    socket: str | None = None,
    serve_args: Sequence[str] = (),
) -> QueueRun:
    """``spec`` against ``vnvme serve`` in its own process (started here, with ``serve_args``,
    unless ``socket`` names one listening); ``vectors``: MSI-X vectors the client takes
    (default: all offered)."""
    name = f"vfio-user ({socket})"
    with contextlib.ExitStack() as stack:
        if socket is None:
            workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="vnvme-scale-"))
            socket = os.path.join(workdir, "vnvme.sock")
            name = " ".join(["vfio-user", *serve_args])
            command = [sys.executable, "-m", "vnvme", "serve", "--socket", socket, "--quiet"]
            command += [
                "--namespace",
                namespace,
                "--max-io-queues",
                str(max(spec.numjobs, QUEUES)),
                *serve_args,
            ]
            server = ServerProcess(command, socket, None, ours=True)
            stack.callback(server.stop)
        memory = spec.numjobs * (spec.iodepth * spec.bs + 4 * 4096) + (16 << 20)
        transport = VfioUserTransport(socket, vectors=vectors, memory_size=-(-memory // 4096) * 4096)
        stack.callback(transport.close)
        driver, run = _drive(transport, spec, name)
        stack.callback(driver.close)  # its queues hold views of host memory: before the memory goes
        return run


def format_queue_run(run: QueueRun, out: TextIO) -> None:
    r = run.result
    print(
        f"## {run.transport}: {run.queues} queues x iodepth {run.iodepth}, {r.ios} I/Os in "
        f"{r.elapsed:.3f} s, {run.vectors} MSI-X vectors",
        file=out,
    )
    print("| qid | vector | completed | IOPS |" + (" fetched |" if run.fetched else ""), file=out)
    print("|---:|---:|---:|---:|" + ("---:|" if run.fetched else ""), file=out)
    for index, (done, iops) in enumerate(zip(run.job_ios, run.queue_iops, strict=True)):
        row = f"| {index + 1} | {run.queue_vectors[index]} | {done} | {iops:,.0f} |"
        if run.fetched:
            row += f" {run.fetched[index]} |"
        print(row, file=out)
    ios = run.job_ios
    print(
        f"total {r.ios} I/Os, {r.iops:,.0f} IOPS; per queue min {min(ios)} max {max(ios)} "
        f"(min/max {run.fairness:.3f}); verify errors {r.verify_errors} of {r.verify_reads} reads",
        file=out,
    )


# Section: many servers


def tag_block(tag: int, block: int, size: int) -> bytes:
    """A block only client ``tag`` writes: its tag and the block number, then a keyed fill."""
    head = f"vnvme-scale client {tag} block {block}\n".encode()
    fill = hashlib.blake2b(head, digest_size=64).digest()
    return (head + fill * (size // len(fill) + 1))[:size]


@dataclass(frozen=True)
class Sample:
    """A server's descriptors and resident memory (KiB: all, anonymous, shared)."""

    fds: int
    rss_kib: int
    anon_kib: int
    shmem_kib: int


def sample(pid: int) -> Sample:
    status: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssShmem"):
                status[key] = int(value.split()[0])
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    return Sample(fds, status.get("VmRSS", 0), status.get("RssAnon", 0), status.get("RssShmem", 0))


@dataclass
class ServerRun:
    index: int
    pid: int
    #: "idle" (no client yet), "start" (client connected), "middle", "end" (I/O done), "after".
    samples: dict[str, Sample] = field(default_factory=dict)
    client: dict[str, Any] = field(default_factory=dict)
    #: Tagged blocks in this server's file holding anything but its own client's tag.
    foreign_blocks: int = -1
    exit_status: int | None = None


@dataclass(frozen=True)
class ServersSpec:
    servers: int = 4
    #: Bytes of each file namespace; the first ``tag_bytes`` carry the client's tags.
    size: int = 16 << 20
    tag_bytes: int = 1 << 20
    bs: int = 4096
    iodepth: int = 8
    number_ios: int | None = 300
    runtime: float | None = None
    timeout: float = 120.0


def _client(conn: Connection, socket: str, tag: int, spec: ServersSpec) -> None:
    """One client process: connect, wait for go, tag, job, check, wait for close, leave."""
    try:
        transport = VfioUserTransport(socket, memory_size=8 << 20)
        try:
            driver = NvmeDriver(transport, io_queues=1, io_queue_depth=spec.iodepth + 1)
            driver.probe()
            conn.send(("ready", len(transport.eventfds)))
            conn.recv()
            ns = driver.namespaces[1]
            nlb = spec.bs // ns.lba_size
            blocks = spec.tag_bytes // spec.bs
            started = time.monotonic()
            for block in range(blocks):
                driver.write(1, block * nlb, tag_block(tag, block, spec.bs))
            job = JobSpec(
                rw="randrw",
                bs=spec.bs,
                iodepth=spec.iodepth,
                number_ios=spec.number_ios,
                runtime=spec.runtime,
                offset=spec.tag_bytes,
                size=spec.size - spec.tag_bytes,
                verify="crc32c",
                seed=tag,
            )
            result = run_job(driver, job)
            mismatches = sum(
                driver.read(1, block * nlb, nlb) != tag_block(tag, block, spec.bs) for block in range(blocks)
            )
            conn.send(
                (
                    "done",
                    {
                        "ios": result.ios + 2 * blocks,
                        "job_ios": result.ios,
                        "verify_errors": result.verify_errors,
                        "verify_reads": result.verify_reads,
                        "tag_mismatches": mismatches,
                        "seconds": round(time.monotonic() - started, 3),
                    },
                )
            )
            conn.recv()
            driver.shutdown()
            driver.close()
        finally:
            transport.close()
        conn.send(("closed", None))
    except Exception as exc:  # reported to the parent as one line, never a traceback
        with contextlib.suppress(OSError):
            conn.send(("error", f"client {tag}: {type(exc).__name__}: {exc}"))


def _expect(conns: Sequence[Connection], what: str, deadline: float) -> list[Any]:
    answers: list[Any] = []
    for conn in conns:
        if not conn.poll(max(0.0, deadline - time.monotonic())):
            raise RuntimeError(f"a client did not report '{what}' in time")
        kind, value = conn.recv()
        if kind == "error":
            raise RuntimeError(value)
        if kind != what:
            raise RuntimeError(f"a client said {kind!r}, expected {what!r}")
        answers.append(value)
    return answers


def run_servers(spec: ServersSpec, workdir: str | None = None) -> list[ServerRun]:
    """``spec.servers`` servers and as many clients at once; see the module's docstring."""
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="vnvme-servers-"))
        runs: list[ServerRun] = []
        servers: list[ServerProcess] = []
        for index in range(spec.servers):
            socket = os.path.join(workdir, f"server{index}.sock")
            image = os.path.join(workdir, f"disk{index}.img")
            command = [sys.executable, "-m", "vnvme", "serve", "--socket", socket, "--quiet"]
            command += ["--namespace", f"file={image},size={spec.size}"]
            server = ServerProcess(command, socket, None, ours=True)
            stack.callback(server.stop)
            servers.append(server)
            runs.append(ServerRun(index, server.proc.pid))
        for run in runs:
            run.samples["idle"] = sample(run.pid)
        context = multiprocessing.get_context("spawn")
        conns: list[Connection] = []
        clients = []
        for index, server in enumerate(servers):
            parent, child = context.Pipe()
            process = context.Process(target=_client, args=(child, server.socket, index, spec), daemon=True)
            process.start()
            child.close()
            conns.append(parent)
            clients.append(process)
            stack.callback(_end_client, process)
        deadline = time.monotonic() + spec.timeout
        _expect(conns, "ready", deadline)
        for run in runs:
            run.samples["start"] = sample(run.pid)
        began = time.monotonic()
        for conn in conns:
            conn.send("go")
        # Sample while the clients run; "middle" is the one nearest half of the longest run.
        timeline: list[tuple[float, list[Sample]]] = []
        while not all(conn.poll() for conn in conns):
            if time.monotonic() > deadline:
                raise RuntimeError("the clients did not finish in time")
            timeline.append((time.monotonic(), [sample(run.pid) for run in runs]))
            time.sleep(0.02)
        done = _expect(conns, "done", deadline)
        ended = time.monotonic()
        for run, result in zip(runs, done, strict=True):
            run.client = result
            run.samples["end"] = sample(run.pid)
        if timeline:
            middle = min(timeline, key=lambda t: abs(t[0] - (began + ended) / 2))[1]
            for run, one in zip(runs, middle, strict=True):
                run.samples["middle"] = one
        for conn in conns:
            conn.send("close")
        _expect(conns, "closed", deadline)
        for process in clients:
            process.join(max(0.0, deadline - time.monotonic()))
        time.sleep(0.2)  # the server notices the disconnect and drops the client's resources
        for run in runs:
            run.samples["after"] = sample(run.pid)
        for run, server in zip(runs, servers, strict=True):
            server.stop()
            run.exit_status = server.proc.returncode
            run.foreign_blocks = _foreign_blocks(
                os.path.join(workdir, f"disk{run.index}.img"), run.index, spec
            )
        return runs


def _end_client(process: multiprocessing.process.BaseProcess) -> None:
    """Teardown after a failure: a client still running is ended (by its PID: ours)."""
    if process.is_alive():
        process.terminate()
        process.join(10)


def _foreign_blocks(path: str, tag: int, spec: ServersSpec) -> int:
    with open(path, "rb") as f:
        return sum(
            f.read(spec.bs) != tag_block(tag, block, spec.bs) for block in range(spec.tag_bytes // spec.bs)
        )


def format_server_runs(runs: Sequence[ServerRun], out: TextIO) -> None:
    print(f"## {len(runs)} servers, {len(runs)} clients at once", file=out)
    print(
        "| server | I/Os | verify errors | tag mismatches | foreign blocks | fds idle/start/middle/end/after "
        "| RSS KiB start/middle/end (anon) | exit |",
        file=out,
    )
    print("|---:|---:|---:|---:|---:|---|---|---:|", file=out)
    for run in runs:
        s = run.samples
        fds = "/".join(str(s[k].fds) if k in s else "-" for k in ("idle", "start", "middle", "end", "after"))
        rss = "/".join(
            f"{s[k].rss_kib} ({s[k].anon_kib})" if k in s else "-" for k in ("start", "middle", "end")
        )
        c = run.client
        print(
            f"| {run.index} | {c.get('ios')} | {c.get('verify_errors')} | {c.get('tag_mismatches')} "
            f"| {run.foreign_blocks} | {fds} | {rss} | {run.exit_status} |",
            file=out,
        )
    for run in runs:
        s = run.samples
        if "start" in s and "end" in s:
            print(
                f"server {run.index}: fds {s['end'].fds - s['start'].fds:+d} over the run, "
                f"RSS {s['end'].rss_kib - s['start'].rss_kib:+d} KiB "
                f"(anonymous {s['end'].anon_kib - s['start'].anon_kib:+d} KiB); "
                f"after the client left: {s['after'].fds} fds (idle: {s['idle'].fds})",
                file=out,
            )


def server_run_ok(run: ServerRun) -> bool:
    """Every check held: no verify error, every tag read back and in the file, the server exited
    cleanly, and it holds as many descriptors after its client left as before it came."""
    c, s = run.client, run.samples
    return bool(
        c
        and c["verify_errors"] == 0
        and c["tag_mismatches"] == 0
        and run.foreign_blocks == 0
        and run.exit_status == 0
        and s["after"].fds == s["idle"].fds
        and s["end"].fds == s["start"].fds
    )
