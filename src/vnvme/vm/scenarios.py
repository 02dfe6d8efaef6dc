"""The guest scenarios against ``vnvme serve``, judged on the host.

``run_scenarios``: one ``vnvme serve`` (a null namespace for fio, a file namespace for the
write/verify), a first guest that runs everything including a reboot for the read-back, then a
second guest against the same server process. Each scenario passes or fails with its evidence.
The side-by-side run of several devices is ``vnvme.vm.compare``.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vnvme.bench.runner import ServerProcess
from vnvme.controller.variants import VM_COMPARE
from vnvme.spec.identify import Oacs
from vnvme.vm.guest import BootResult, Guest, vfio_user_device
from vnvme.vm.measure import DepthResult, depth_results, fio_read_summary, parse_counters
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


def tail_lines(text: str, lines: int = 12) -> str:
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
        raise AssertionError(f"step {name!r} exited {block.rc}:\n{tail_lines(block.text)}")
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
    #: vCPUs of the guest; fio runs one job per vCPU, each pinned to its own.
    smp: int = 1
    #: Boots per column (``vnvme vm compare``).
    repeat: int = 1
    #: vnvme columns of ``vnvme vm compare``, by their names in ``vnvme.controller.variants``.
    variants: tuple[str, ...] = VM_COMPARE


def scenario_env(options: VmOptions, phase: str, **extra: str) -> dict[str, str]:
    env = {
        "PHASE": phase,
        "DEPTHS": " ".join(map(str, options.depths)),
        "RUNTIME": str(options.runtime),
        "RAMP": str(options.ramp),
        "COUNTERS": "1",
        "NUMJOBS": str(options.smp),
    }
    env.update(extra)
    return env


def _progress(
    say: Callable[[str], None], name: str, watch: Callable[[str], None] | None
) -> Callable[[str], None]:
    started = time.monotonic()

    def on_line(line: str) -> None:
        if watch is not None:
            watch(line)
        if not line.startswith("@@begin"):  # the end of a step says enough
            say(f"[vm {name} {time.monotonic() - started:5.1f}s] {line}")

    return on_line


def boot_with_progress(
    guest: Guest, options: VmOptions, what: str, watch: Callable[[str], None] | None = None
) -> BootResult:
    """Boot ``guest`` saying so when it starts, what its scenario reports, and how it ended;
    ``watch`` sees every ``@@`` line as it arrives."""
    options.say(f"[vm] {guest.name}: booting {what} ...")
    boot = guest.boot(options.boot_timeout, _progress(options.say, guest.name, watch))
    if boot.timed_out:
        ended = f"stopped after the {options.boot_timeout:.0f} s timeout"
    else:
        ended = f"QEMU exited ({boot.exit_code}) after {boot.seconds:.0f} s"
    options.say(f"[vm] {guest.name}: {ended}, {boot.boots} guest boot(s)")
    return boot


@dataclass
class _Run:
    """What the scenario boots left behind, for the checks."""

    options: VmOptions
    first: BootResult
    second: BootResult
    blocks_on_disk: int
    stats_after_first: dict[str, Any] | None
    final_stats: dict[str, Any] | None
    server_alive: bool
    reads: list[DepthResult] = field(default_factory=list)


def _boot_scenarios(image: Image, options: VmOptions, run_dir: Path) -> _Run:
    """One server, a first guest that runs everything (a reboot included), a second guest."""
    socket_path = str(run_dir / "vnvme.sock")
    disk = run_dir / "verify.img"
    with open(disk, "wb") as f:
        f.truncate(VERIFY_NAMESPACE_BYTES)
    server = ServerProcess(
        vnvme_serve_command(
            socket_path, "--namespace", "null,size=1G", "--namespace", f"file={disk}", "--check-host"
        ),
        socket_path,
        None,
        ours=True,
    )
    try:
        main_env = scenario_env(
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
        quick_env = scenario_env(options, "quick", DEPTHS="4", VERIFY_NSID="")
        guest2 = Guest(image, run_dir, "guest2", vfio_user_device(socket_path), quick_env)
        second = boot_with_progress(guest2, options, "a second guest against the same server process")
        final_stats = server.counters()
        alive = server.proc.poll() is None
    finally:
        server.stop()
    return _Run(options, first, second, blocks_on_disk, stats_after_first, final_stats, alive)


def run_scenarios(image: Image, options: VmOptions) -> ScenarioReport:
    """Boot guests against one ``vnvme serve`` and judge every scenario."""
    run_dir = Path(tempfile.mkdtemp(prefix="vnvme-vm-", dir=options.work_dir))
    try:
        run = _boot_scenarios(image, options, run_dir)
    finally:
        if not options.keep:
            shutil.rmtree(run_dir, ignore_errors=True)
        else:
            options.say(f"[vm] run folder kept: {run_dir}")
    judge = _Judge()
    for name, check in SCENARIO_CHECKS:
        judge.check(name, functools.partial(check, run))
    return ScenarioReport(
        kernel=image.kernel_version,
        qemu=image.qemu_version,
        scenarios=judge.scenarios,
        reads=run.reads,
        server_statistics=run.final_stats,
        boots=[_boot_summary(run.first), _boot_summary(run.second)],
    )


# -- the checks: each returns its evidence or raises with the reason


def _booted(run: _Run) -> str:
    first = run.first
    if first.timed_out:
        raise AssertionError(
            f"guest 1 did not power off in {run.options.boot_timeout:.0f} s:\n{tail_lines(first.console)}"
        )
    return f"guest 1: {first.boots} boots, {first.seconds:.0f} s, powered off (exit {first.exit_code})"


def _probe(run: _Run) -> str:
    text = _need(run.first, "probe")
    if f"model {MODEL}" not in text or "state live" not in text:
        raise AssertionError(f"unexpected probe output:\n{tail_lines(text)}")
    namespaces = [line for line in text.splitlines() if line.startswith("nvme0n") and " nsid " in line]
    if len(namespaces) != 2:
        raise AssertionError(f"expected 2 namespaces, the guest lists {namespaces}")
    return "\n".join(
        line for line in text.splitlines() if line.startswith(("state", "model", "queues", "nvme0"))
    )


def _dbbuf(run: _Run) -> str:
    stats = (run.stats_after_first or {}).get("controller", {})
    if stats.get("dbbuf_configs", 0) < 1:
        raise AssertionError(f"no Doorbell Buffer Config reached the controller: {stats}")
    counters = parse_counters(_need(run.first, f"counters-after-d{run.options.depths[-1]}"))
    if counters is None or counters["dbbuf_configs"] < 1 or counters["shadow_reads"] == 0:
        raise AssertionError(f"the guest's counters page shows no shadow doorbells: {counters}")
    return (
        f"server: {stats['dbbuf_configs']} Doorbell Buffer Config commands, "
        f"{stats['shadow_reads']} shadow reads, {stats['eventidx_writes']} EventIdx writes; "
        f"guest-read counters page: dbbuf_configs={counters['dbbuf_configs']}"
    )


def _nvme_cli(run: _Run) -> str:
    first = run.first
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


def _fio_reads(run: _Run) -> str:
    run.reads.extend(depth_results(run.first, run.options.depths))
    parts = [
        f"d{r.depth}: {r.iops / 1000:.1f}k IOPS"
        + (f", {r.doorbells:.3f} doorbells/IO" if r.doorbells is not None else "")
        for r in run.reads
    ]
    for depth in run.options.depths:
        _, ios, errors, _, _ = fio_read_summary(_need_json(run.first, f"fio-randread-d{depth}"))
        if errors or ios == 0:
            raise AssertionError(f"fio at depth {depth}: {ios} I/Os, error {errors}")
    return "; ".join(parts)


def _reset_idle(run: _Run) -> str:
    return tail_lines(_need(run.first, "reset-idle"), 3)


def _reset_io(run: _Run) -> str:
    text = _need(run.first, "reset-under-io")
    _, ios, errors, _, _ = fio_read_summary(_need_json(run.first, "reset-under-io"))
    if errors or ios == 0:
        raise AssertionError(f"fio across the reset: {ios} I/Os, error {errors}")
    counters = parse_counters(_need(run.first, "counters-final"))
    enables = counters["enables"] if counters else None
    if enables is None or enables < 3:
        raise AssertionError(f"expected >= 3 controller enables (probe + 2 resets), counters say {enables}")
    return (
        f"fio across the reset: {ios} I/Os, no errors; CC.EN 0->1 transitions so far: {enables}; "
        + tail_lines(text, 1)
    )


def _write_verify(run: _Run) -> str:
    w = _need_json(run.first, "write-verify")
    b = _need_json(run.first, "read-back")
    if run.first.boots < 2:
        raise AssertionError("the guest did not reboot between the write and the read-back")
    wjob, bjob = w["jobs"][0], b["jobs"][0]
    if wjob["error"] or bjob["error"] or wjob["write"]["io_bytes"] == 0 or bjob["read"]["io_bytes"] == 0:
        raise AssertionError(
            f"write {wjob['write']['io_bytes']} B err {wjob['error']}, read back "
            f"{bjob['read']['io_bytes']} B err {bjob['error']}"
        )
    expected = parse_size_text(VERIFY_WRITE) // 4096
    if run.blocks_on_disk != expected:
        raise AssertionError(f"the server's file holds {run.blocks_on_disk} of {expected} blocks fio wrote")
    return (
        f"{run.blocks_on_disk}/{expected} blocks in the server's file carry fio's verify header; "
        f"wrote {wjob['write']['io_bytes'] >> 20} MiB with crc32c headers on the file namespace "
        f"(fsync at the end), rebooted ({run.first.boots} boots), read back and verified "
        f"{bjob['read']['io_bytes'] >> 20} MiB"
    )


def _second_boot(run: _Run) -> str:
    second = run.second
    if second.timed_out:
        raise AssertionError(f"guest 2 did not power off:\n{tail_lines(second.console)}")
    _need(second, "probe")
    _need(second, "id-ctrl")
    (r,) = depth_results(second, [4])
    clients = (run.final_stats or {}).get("clients_served")
    if not run.server_alive:
        raise AssertionError("the server had exited")
    if clients is None or clients < 2:
        raise AssertionError(f"the server served {clients} clients, expected 2")
    return f"same server process, client {clients}: probe, id-ctrl, fio d4 {r.iops / 1000:.1f}k IOPS"


def _healthy(run: _Run) -> str:
    stats = (run.final_stats or {}).get("controller", {})
    if stats.get("internal_errors", 1) != 0:
        raise AssertionError(f"controller internal errors: {stats.get('internal_errors')}")
    return (
        f"internal errors 0; error completions {stats.get('error_completions')}; "
        f"message errors {(run.final_stats or {}).get('message_errors')}"
    )


def _host_check(run: _Run) -> str:
    """The server ran with --check-host: Linux breaks no rule the spec makes an error; the
    warnings are reported (docs/HOST-CHECK.md says what each one seen from Linux means)."""
    report = (run.final_stats or {}).get("host_check")
    if report is None:
        raise AssertionError("the server reported no host check (was it started with --check-host?)")
    seen = {r["name"]: (r["severity"], r["count"], r["first"][:2]) for r in report["rules"] if r["count"]}
    if report["errors"]:
        raise AssertionError(f"{report['errors']} host protocol errors: {seen}")
    return f"0 errors, {report['warnings']} warnings" + (f": {seen}" if seen else "")


#: Every scenario, in the order it is judged and reported.
SCENARIO_CHECKS: tuple[tuple[str, Callable[[_Run], str]], ...] = (
    ("guest boots and powers off", _booted),
    ("the Linux nvme driver probes vnvme", _probe),
    ("Doorbell Buffer Config arrives from Linux", _dbbuf),
    ("nvme-cli id-ctrl / id-ns / smart-log / error-log / get-feature", _nvme_cli),
    ("fio randread 4k at each depth", _fio_reads),
    ("reset_controller while idle", _reset_idle),
    ("reset_controller under I/O", _reset_io),
    ("fio randwrite verify=crc32c, read back after a guest reboot", _write_verify),
    ("a second boot without restarting the server", _second_boot),
    ("the server stays healthy", _healthy),
    ("the Linux host breaks no protocol rule (vnvme serve --check-host)", _host_check),
)


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
