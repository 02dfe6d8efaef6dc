"""The guest scenarios against ``vnvme serve``, judged on the host, and the side-by-side run.

``run_scenarios``: one ``vnvme serve`` (a null namespace for fio, a file namespace for the
write/verify), a first guest that runs everything including a reboot for the read-back, then a
second guest against the same server process. Each scenario passes or fails with its evidence.

``compare``: the same guest and fio jobs against vnvme with and without shadow doorbells, QEMU's
built-in ``-device nvme`` (null-co, read-zeroes) and, when built, QEMU's own NVMe controller
exported over vfio-user (``../shared/tools/qemu-vfio-user-server``). vnvme's doorbells come from
its counters (vendor log page C0h, read by the guest around every job); QEMU's from its trace
events, in separate traced passes so that tracing does not distort the IOPS.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vnvme.bench.runner import ServerProcess
from vnvme.controller.variants import VARIANTS as DOORBELL_VARIANTS
from vnvme.controller.variants import VM_COMPARE
from vnvme.spec.identify import Oacs
from vnvme.spec.log_pages import VNVME_COUNTERS, VNVME_COUNTERS_SIGNATURE
from vnvme.vm.guest import (
    QEMU_DOORBELL_TRACE,
    BootResult,
    Guest,
    builtin_nvme_device,
    trace_doorbells_between_marks,
    vfio_user_device,
)
from vnvme.vm.provision import Image

VERIFY_NAMESPACE_BYTES = 64 << 20
VERIFY_WRITE = "16M"
MODEL = "vnvme shadow doorbell controller"


@dataclass
class Scenario:
    name: str
    passed: bool
    evidence: str


@dataclass
class DepthResult:
    depth: int
    iops: float
    ios: int  # I/Os the doorbells are divided by
    sq_doorbells: float | None  # per I/O, I/O queues; None: not counted
    cq_doorbells: float | None
    lat_p50_us: float | None = None
    lat_p99_us: float | None = None

    @property
    def doorbells(self) -> float | None:
        if self.sq_doorbells is None or self.cq_doorbells is None:
            return None
        return self.sq_doorbells + self.cq_doorbells


@dataclass
class ScenarioReport:
    kernel: str
    qemu: str
    scenarios: list[Scenario]
    reads: list[DepthResult]
    server_statistics: dict[str, Any] | None
    boots: list[dict[str, Any]] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.scenarios) and all(s.passed for s in self.scenarios)

    def to_json(self) -> dict[str, Any]:
        return {
            "kernel": self.kernel,
            "qemu": self.qemu,
            "passed": self.passed,
            "scenarios": [asdict(s) for s in self.scenarios],
            "reads": [asdict(r) for r in self.reads],
            "boots": self.boots,
            "server_statistics": self.server_statistics,
        }


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
    """IOPS, I/Os, errors and p50/p99 completion latency (us) of fio's first job."""
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


def depth_results(
    boot: BootResult, depths: Sequence[int], *, traced: BootResult | None = None
) -> list[DepthResult]:
    """fio IOPS per depth, with doorbells per I/O from vnvme's counters or a traced boot."""
    out = []
    trace_intervals = trace_doorbells_between_marks(traced.trace) if traced is not None else []
    for index, depth in enumerate(depths):
        block = boot.block(f"fio-randread-d{depth}")
        if block is None or not block.ok:
            raise RuntimeError(f"{boot.name}: fio at depth {depth} did not complete")
        iops, ios, _, p50, p99 = fio_read_summary(block.json())
        sq = cq = None
        count_ios = ios
        before = boot.block(f"counters-before-d{depth}")
        after = boot.block(f"counters-after-d{depth}")
        if before is not None and after is not None:
            a, b = parse_counters(before.text), parse_counters(after.text)
            if a is not None and b is not None:
                count_ios = b["io_commands"] - a["io_commands"]
                sq = (b["doorbell_sq_io"] - a["doorbell_sq_io"]) / max(count_ios, 1)
                cq = (b["doorbell_cq_io"] - a["doorbell_cq_io"]) / max(count_ios, 1)
        elif traced is not None and len(trace_intervals) > 2 * index:
            # marks come in pairs around each job: interval 2*index is the job itself
            interval = trace_intervals[2 * index]
            traced_block = traced.block(f"fio-randread-d{depth}")
            if traced_block is not None and traced_block.ok:
                _, count_ios, _, _, _ = fio_read_summary(traced_block.json())
                sq = interval["sq_io"] / max(count_ios, 1)
                cq = interval["cq_io"] / max(count_ios, 1)
        out.append(DepthResult(depth, iops, count_ios, sq, cq, p50, p99))
    return out


def parse_size_text(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


#: fio's verify header starts with its magic, 0xacca, little-endian.
FIO_VERIFY_MAGIC = b"\xca\xac"


def fio_verify_blocks(path: Path, length: int, block_size: int = 4096) -> int:
    """Blocks of the first ``length`` bytes of ``path`` that start with fio's verify header."""
    with open(path, "rb") as f:
        data = f.read(length)
    return sum(1 for at in range(0, len(data), block_size) if data[at : at + 2] == FIO_VERIFY_MAGIC)


def _boot_summary(boot: BootResult) -> dict[str, Any]:
    return {
        "name": boot.name,
        "exit_code": boot.exit_code,
        "timed_out": boot.timed_out,
        "seconds": round(boot.seconds, 1),
        "boots": boot.boots,
        "steps": {b.name: b.rc for b in boot.blocks},
        "notes": boot.notes,
    }


def _tail(text: str, lines: int = 12) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


class _Judge:
    def __init__(self) -> None:
        self.scenarios: list[Scenario] = []

    def check(self, name: str, body: Callable[[], str]) -> None:
        """``body`` returns its evidence, or raises AssertionError/KeyError/... with the reason."""
        try:
            evidence = body()
            self.scenarios.append(Scenario(name, True, evidence))
        except Exception as exc:  # every scenario gets a verdict, whatever broke
            self.scenarios.append(Scenario(name, False, f"{type(exc).__name__}: {exc}"))


def _need(boot: BootResult, name: str) -> str:
    block = boot.block(name)
    if block is None:
        raise AssertionError(
            f"step {name!r} never ran (boot: exit {boot.exit_code}, timed out {boot.timed_out})"
        )
    if not block.ok:
        raise AssertionError(f"step {name!r} exited {block.rc}:\n{_tail(block.text)}")
    return block.text


def _need_json(boot: BootResult, name: str) -> Any:
    _need(boot, name)
    block = boot.block(name)
    assert block is not None
    return block.json()


def vnvme_serve_command(socket_path: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "vnvme", "serve", "--socket", socket_path, *extra]


@dataclass
class VmOptions:
    depths: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    runtime: int = 3
    ramp: int = 1
    boot_timeout: float = 900.0
    work_dir: Path | None = None
    keep: bool = False
    say: Callable[[str], None] = print


def _scenario_env(options: VmOptions, phase: str, **extra: str) -> dict[str, str]:
    env = {
        "PHASE": phase,
        "DEPTHS": " ".join(map(str, options.depths)),
        "RUNTIME": str(options.runtime),
        "RAMP": str(options.ramp),
        "COUNTERS": "1",
    }
    env.update(extra)
    return env


def _progress(say: Callable[[str], None], name: str) -> Callable[[str], None]:
    started = time.monotonic()
    return lambda line: say(f"[vm {name} {time.monotonic() - started:5.1f}s] {line}")


def boot_with_progress(guest: Guest, options: VmOptions, what: str) -> BootResult:
    """Boot ``guest`` saying so when it starts, what its scenario reports, and how it ended."""
    options.say(f"[vm] {guest.name}: booting {what} ...")
    boot = guest.boot(options.boot_timeout, _progress(options.say, guest.name))
    if boot.timed_out:
        ended = f"stopped after the {options.boot_timeout:.0f} s timeout"
    else:
        ended = f"QEMU exited ({boot.exit_code}) after {boot.seconds:.0f} s"
    options.say(f"[vm] {guest.name}: {ended}, {boot.boots} guest boot(s)")
    return boot


def run_scenarios(image: Image, options: VmOptions) -> ScenarioReport:
    """Boot guests against one ``vnvme serve`` and judge every scenario."""
    run_dir = Path(tempfile.mkdtemp(prefix="vnvme-vm-", dir=options.work_dir))
    say = options.say
    socket_path = str(run_dir / "vnvme.sock")
    disk = run_dir / "verify.img"
    with open(disk, "wb") as f:
        f.truncate(VERIFY_NAMESPACE_BYTES)
    server = ServerProcess(
        vnvme_serve_command(socket_path, "--namespace", "null,size=1G", "--namespace", f"file={disk}"),
        socket_path,
        None,
        ours=True,
    )
    first: BootResult | None = None
    second: BootResult | None = None
    blocks_on_disk = -1
    stats_after_first: dict[str, Any] | None = None
    final_stats: dict[str, Any] | None = None
    server_alive = False
    try:
        main_env = _scenario_env(
            options,
            "main",
            VERIFY_NSID="2",
            VERIFY_SIZE=VERIFY_WRITE,
            VERIFY_BLOCKS=str(VERIFY_NAMESPACE_BYTES // 4096),
        )
        guest = Guest(image, run_dir, "guest1", vfio_user_device(socket_path), main_env, allow_reboot=True)
        first = boot_with_progress(
            guest, options, f"kernel {image.kernel_version} under {image.qemu_version}, against vnvme serve"
        )
        stats_after_first = server.counters()
        blocks_on_disk = fio_verify_blocks(disk, parse_size_text(VERIFY_WRITE))
        quick_env = _scenario_env(options, "quick", DEPTHS="4", VERIFY_NSID="")
        guest2 = Guest(image, run_dir, "guest2", vfio_user_device(socket_path), quick_env)
        second = boot_with_progress(guest2, options, "a second guest against the same server process")
        final_stats = server.counters()
        server_alive = server.proc.poll() is None
    finally:
        server.stop()
        if not options.keep:
            shutil.rmtree(run_dir, ignore_errors=True)
        else:
            say(f"[vm] run folder kept: {run_dir}")

    judge = _Judge()
    assert first is not None and second is not None
    reads: list[DepthResult] = []

    def booted() -> str:
        if first.timed_out:
            raise AssertionError(
                f"guest 1 did not power off in {options.boot_timeout:.0f} s:\n{_tail(first.console)}"
            )
        return f"guest 1: {first.boots} boots, {first.seconds:.0f} s, powered off (exit {first.exit_code})"

    judge.check("guest boots and powers off", booted)

    def probe() -> str:
        text = _need(first, "probe")
        if f"model {MODEL}" not in text or "state live" not in text:
            raise AssertionError(f"unexpected probe output:\n{_tail(text)}")
        namespaces = [line for line in text.splitlines() if line.startswith("nvme0n") and " nsid " in line]
        if len(namespaces) != 2:
            raise AssertionError(f"expected 2 namespaces, the guest lists {namespaces}")
        return "\n".join(
            line for line in text.splitlines() if line.startswith(("state", "model", "queues", "nvme0"))
        )

    judge.check("the Linux nvme driver probes vnvme", probe)

    def dbbuf() -> str:
        stats = (stats_after_first or {}).get("controller", {})
        if stats.get("dbbuf_configs", 0) < 1:
            raise AssertionError(f"no Doorbell Buffer Config reached the controller: {stats}")
        counters = parse_counters(_need(first, f"counters-after-d{options.depths[-1]}"))
        if counters is None or counters["dbbuf_configs"] < 1 or counters["shadow_reads"] == 0:
            raise AssertionError(f"the guest's counters page shows no shadow doorbells: {counters}")
        return (
            f"server: {stats['dbbuf_configs']} Doorbell Buffer Config commands, "
            f"{stats['shadow_reads']} shadow reads, {stats['eventidx_writes']} EventIdx writes; "
            f"guest-read counters page: dbbuf_configs={counters['dbbuf_configs']}"
        )

    judge.check("Doorbell Buffer Config arrives from Linux", dbbuf)

    def nvme_cli() -> str:
        ctrl = _need_json(first, "id-ctrl")
        if not int(ctrl["oacs"]) & Oacs.DOORBELL_BUFFER_CONFIG:
            raise AssertionError(f"id-ctrl OACS {int(ctrl['oacs']):#x} lacks bit 8 (Doorbell Buffer Config)")
        if ctrl["mn"].strip() != MODEL:
            raise AssertionError(f"id-ctrl mn {ctrl['mn']!r}")
        ns = _need_json(first, "id-ns")
        smart = _need_json(first, "smart-log")
        _need(first, "error-log")
        queues = _need(first, "get-feature-queues").strip().splitlines()
        vwc = _need(first, "get-feature-vwc").strip().splitlines()
        return (
            f"id-ctrl: mn {ctrl['mn'].strip()!r}, oacs {int(ctrl['oacs']):#x}, vwc {ctrl.get('vwc')}; "
            f"id-ns: nsze {ns['nsze']}, flbas {ns['flbas']}; smart-log: {len(smart)} fields; "
            f"get-feature 7: {queues[0] if queues else ''}; get-feature 6: {vwc[0] if vwc else ''}"
        )

    judge.check("nvme-cli id-ctrl / id-ns / smart-log / error-log / get-feature", nvme_cli)

    def fio_reads() -> str:
        reads.extend(depth_results(first, options.depths))
        parts = [
            f"d{r.depth}: {r.iops / 1000:.1f}k IOPS"
            + (f", {r.doorbells:.3f} doorbells/IO" if r.doorbells is not None else "")
            for r in reads
        ]
        for depth in options.depths:
            _, ios, errors, _, _ = fio_read_summary(_need_json(first, f"fio-randread-d{depth}"))
            if errors or ios == 0:
                raise AssertionError(f"fio at depth {depth}: {ios} I/Os, error {errors}")
        return "; ".join(parts)

    judge.check("fio randread 4k at each depth", fio_reads)

    def reset_idle() -> str:
        text = _need(first, "reset-idle")
        return _tail(text, 3)

    judge.check("reset_controller while idle", reset_idle)

    def reset_io() -> str:
        text = _need(first, "reset-under-io")
        _, ios, errors, _, _ = fio_read_summary(_need_json(first, "reset-under-io"))
        if errors or ios == 0:
            raise AssertionError(f"fio across the reset: {ios} I/Os, error {errors}")
        counters = parse_counters(_need(first, "counters-final"))
        enables = counters["enables"] if counters else None
        if enables is None or enables < 3:
            raise AssertionError(
                f"expected >= 3 controller enables (probe + 2 resets), counters say {enables}"
            )
        return (
            f"fio across the reset: {ios} I/Os, no errors; CC.EN 0->1 transitions so far: {enables}; "
            + _tail(text, 1)
        )

    judge.check("reset_controller under I/O", reset_io)

    def write_verify() -> str:
        w = _need_json(first, "write-verify")
        b = _need_json(first, "read-back")
        if first.boots < 2:
            raise AssertionError("the guest did not reboot between the write and the read-back")
        wjob, bjob = w["jobs"][0], b["jobs"][0]
        if wjob["error"] or bjob["error"] or wjob["write"]["io_bytes"] == 0 or bjob["read"]["io_bytes"] == 0:
            raise AssertionError(
                f"write {wjob['write']['io_bytes']} B err {wjob['error']}, read back "
                f"{bjob['read']['io_bytes']} B err {bjob['error']}"
            )
        expected = parse_size_text(VERIFY_WRITE) // 4096
        if blocks_on_disk != expected:
            raise AssertionError(f"the server's file holds {blocks_on_disk} of {expected} blocks fio wrote")
        return (
            f"{blocks_on_disk}/{expected} blocks in the server's file carry fio's verify header; "
            f"wrote {wjob['write']['io_bytes'] >> 20} MiB with crc32c headers on the file namespace "
            f"(fsync at the end), rebooted ({first.boots} boots), read back and verified "
            f"{bjob['read']['io_bytes'] >> 20} MiB"
        )

    judge.check("fio randwrite verify=crc32c, read back after a guest reboot", write_verify)

    def second_boot() -> str:
        if second.timed_out:
            raise AssertionError(f"guest 2 did not power off:\n{_tail(second.console)}")
        _need(second, "probe")
        _need(second, "id-ctrl")
        (r,) = depth_results(second, [4])
        clients = (final_stats or {}).get("clients_served")
        if not server_alive:
            raise AssertionError("the server had exited")
        if clients is None or clients < 2:
            raise AssertionError(f"the server served {clients} clients, expected 2")
        return f"same server process, client {clients}: probe, id-ctrl, fio d4 {r.iops / 1000:.1f}k IOPS"

    judge.check("a second boot without restarting the server", second_boot)

    def healthy() -> str:
        stats = (final_stats or {}).get("controller", {})
        if stats.get("internal_errors", 1) != 0:
            raise AssertionError(f"controller internal errors: {stats.get('internal_errors')}")
        return (
            f"internal errors 0; error completions {stats.get('error_completions')}; "
            f"message errors {(final_stats or {}).get('message_errors')}"
        )

    judge.check("the server stays healthy", healthy)

    return ScenarioReport(
        kernel=image.kernel_version,
        qemu=image.qemu_version,
        scenarios=judge.scenarios,
        reads=reads,
        server_statistics=final_stats,
        boots=[_boot_summary(first), _boot_summary(second)],
    )


# -- side by side


QEMU_VFU_CACHE = Path(os.environ.get("QEMU_VFU_CACHE", Path.home() / ".cache" / "qemu-vfio-user"))


def qemu_vfio_user_run_script() -> Path | None:
    """``run.sh`` of ../shared/tools/qemu-vfio-user-server, if that server was built."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        script = parent.parent / "shared" / "tools" / "qemu-vfio-user-server" / "run.sh"
        if script.exists():
            built = QEMU_VFU_CACHE / "trixie" / "usr" / "local" / "bin" / "qemu-system-x86_64-vfu"
            return script if built.exists() else None
    return None


@dataclass
class DeviceColumn:
    name: str
    description: str
    results: list[DepthResult]
    #: CPU time of the server process tree over the whole boot, per I/O of the fio jobs.
    server_cpu_us: float | None = None


def _bench_boot(
    image: Image,
    run_dir: Path,
    name: str,
    devices: list[str],
    env: dict[str, str],
    options: VmOptions,
    **kw: Any,
) -> BootResult:
    guest = Guest(image, run_dir, name, devices, env, **kw)
    boot = boot_with_progress(guest, options, "for fio")
    probe = boot.block("probe")
    if boot.timed_out or probe is None or not probe.ok:
        raise RuntimeError(f"{name}: the guest did not finish:\n{_tail(boot.console, 20)}")
    return boot


def compare(image: Image, options: VmOptions, *, include_qemu_vfio_user: bool = True) -> list[DeviceColumn]:
    """fio randread per depth against each device, doorbells per I/O counted as described above."""
    run_dir = Path(tempfile.mkdtemp(prefix="vnvme-vm-compare-", dir=options.work_dir))
    columns: list[DeviceColumn] = []
    try:
        for name in VM_COMPARE:
            variant = DOORBELL_VARIANTS[name]
            extra = variant.serve_args()
            label = "vnvme " + name.replace("-", " ")
            description = f"vnvme serve{''.join(' ' + arg for arg in extra)} ({variant.label})"
            socket_path = str(run_dir / "vnvme.sock")
            server = ServerProcess(vnvme_serve_command(socket_path, *extra), socket_path, None, ours=True)
            try:
                slug = label.replace(" ", "-")
                boot = _bench_boot(
                    image,
                    run_dir,
                    slug,
                    vfio_user_device(socket_path),
                    _scenario_env(options, "bench"),
                    options,
                )
                cpu = server.cpu_seconds()
            finally:
                server.stop()
            results = depth_results(boot, options.depths)
            columns.append(DeviceColumn(label, description, results, _per_io_us(cpu, results)))

        untraced = _bench_boot(
            image,
            run_dir,
            "qemu-builtin",
            builtin_nvme_device(),
            _scenario_env(options, "bench", COUNTERS="0"),
            options,
        )
        traced = _bench_boot(
            image,
            run_dir,
            "qemu-builtin-traced",
            builtin_nvme_device(),
            _scenario_env(options, "bench", COUNTERS="0", RAMP="0"),
            options,
            trace_events=QEMU_DOORBELL_TRACE,
        )
        columns.append(
            DeviceColumn(
                "QEMU built-in nvme",
                f"-device nvme, null-co read-zeroes ({image.qemu_version}); doorbells from a traced pass",
                depth_results(untraced, options.depths, traced=traced),
            )
        )
        script = qemu_vfio_user_run_script() if include_qemu_vfio_user else None
        if script is not None:
            columns.append(_qemu_vfio_user_column(image, run_dir, script, options))
        elif include_qemu_vfio_user:
            options.say(
                "[vm] QEMU's vfio-user server is not built (../shared/tools/qemu-vfio-user-server/build.sh): column skipped"
            )
    finally:
        if not options.keep:
            shutil.rmtree(run_dir, ignore_errors=True)
    return columns


def _per_io_us(cpu_seconds: float | None, results: Sequence[DepthResult]) -> float | None:
    ios = sum(r.ios for r in results)
    return cpu_seconds * 1e6 / ios if cpu_seconds is not None and ios else None


def _qemu_vfio_user_column(image: Image, run_dir: Path, script: Path, options: VmOptions) -> DeviceColumn:
    boots: list[BootResult] = []
    cpu: float | None = None
    for traced in (False, True):
        socket_path = str(run_dir / f"qemu-vfu-{int(traced)}.sock")
        trace_file = run_dir / "qemu-vfu-trace.log"
        extra: list[str] = []
        if traced:
            for event in QEMU_DOORBELL_TRACE:
                extra += ["--trace", event]
            extra += ["-D", str(trace_file)]
        command = ["bash", str(script), socket_path, *extra]
        server = ServerProcess(command, socket_path, None, ours=False)
        try:
            env = _scenario_env(options, "bench", COUNTERS="0", **({"RAMP": "0"} if traced else {}))
            boot = _bench_boot(
                image,
                run_dir,
                f"qemu-vfu-{'traced' if traced else 'plain'}",
                vfio_user_device(socket_path),
                env,
                options,
            )
        finally:
            server.stop()
        if traced:
            boot.trace = trace_file.read_text(errors="replace") if trace_file.exists() else ""
        boots.append(boot)
    results = depth_results(boots[0], options.depths, traced=boots[1])
    return DeviceColumn(
        "QEMU nvme over vfio-user",
        "QEMU's hw/nvme as a vfio-user server (shared/tools/qemu-vfio-user-server); doorbells from a traced pass",
        results,
        _per_io_us(cpu, results),
    )


def format_columns(columns: Sequence[DeviceColumn], depths: Sequence[int]) -> str:
    head = "| device | " + " | ".join(f"depth {d}" for d in depths) + " |"
    rule = "|---|" + "---|" * len(depths)
    rows = [head, rule]
    rows += [
        f"| {column.name}: IOPS | " + " | ".join(f"{r.iops / 1000:.2f}k" for r in column.results) + " |"
        for column in columns
    ]
    for column in columns:
        cells = []
        for r in column.results:
            if r.sq_doorbells is None or r.cq_doorbells is None:
                cells.append("n/a")
            else:
                cells.append(f"{r.doorbells:.3f} ({r.sq_doorbells:.3f} + {r.cq_doorbells:.3f})")
        rows.append(f"| {column.name}: doorbells/IO (SQ + CQ) | " + " | ".join(cells) + " |")
    rows += [
        f"| {column.name}: server CPU per I/O | {column.server_cpu_us:.0f} us (all depths) |"
        + " |" * (len(depths) - 1)
        for column in columns
        if column.server_cpu_us is not None
    ]
    return "\n".join(rows)


def git_describe() -> str:
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        return out.stdout.strip() or "?"
    except (OSError, subprocess.TimeoutExpired):
        return "?"
