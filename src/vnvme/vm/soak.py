"""``vnvme vm soak``: a 2-vCPU Linux guest runs verified I/O while the harness breaks things.

Each boot (``soak_init.sh`` is its /init) runs, for ``io_seconds``:

- two fio verify jobs, one per vCPU (pinned), randrw with crc32c headers on their own region of
  a file namespace, verifying as they go and at the end, then a Flush (``end_fsync``);
- a third fio job over the *fault area* (never touched by the verify jobs) with
  ``continue_on_error`` and ``error_dump``, so every failed I/O is one line with its offset;
- controller resets from the guest (``reset_controller``) at the planned times.

Meanwhile the host turns media errors (with DNR, so Linux does not retry) on and off for 64 KiB
ranges of the fault area through ``vnvme serve --control``, and watches for progress. Between
boots it SIGKILLs ``vnvme serve`` and starts a new one on the same file: the regions' checksums
the guest took at the end of a boot must be the file's after the kill and the next guest's
before it writes. Every time is drawn from one seed, printed, so a run can be repeated.

A hang is a boot with no I/O progress for :data:`HANG_SECONDS` while its fio runs, no word from
the guest for :data:`SILENCE_SECONDS`, a boot past its time limit, or an I/O timeout in the
guest's kernel log; the guest is then stopped, never waited for without end.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import re
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from vnvme.bench.runner import BenchError, ServerProcess
from vnvme.control import request
from vnvme.vm.guest import Block, BootResult, Guest, vfio_user_device
from vnvme.vm.provision import Image
from vnvme.vm.scenarios import tail_lines, vnvme_serve_command

MIB = 1 << 20
NAMESPACE_BYTES = 32 * MIB
#: The verify jobs' regions (offset, bytes), one per vCPU.
REGIONS = ((0, 8 * MIB), (8 * MIB, 8 * MIB))
#: Where the fault job runs and media errors are turned on: apart from every region.
FAULT_AREA = (24 * MIB, 1 * MIB)
#: One fault range: 16 blocks of 4 KiB, aligned to 4 KiB (and to itself).
FAULT_RANGE = 64 << 10
LBA_BYTES = 512
SMP = 2
#: Seconds without I/O progress, while fio runs, that make a hang (below the guest's 60 s I/O
#: timeout, so a lost completion shows here rather than as a recovered timeout).
HANG_SECONDS = 30.0
#: Seconds without any line from the guest, in any phase, that make a hang.
SILENCE_SECONDS = 180.0
#: What a boot may take beyond its I/O (booting under TCG, checksums, power off).
BOOT_SLACK_SECONDS = 300.0

_FIO_ERROR = re.compile(r"io_u error on file \S+: (.*?): (\w+) offset=(\d+), buflen=(\d+)")
_VERIFY_FAILED = re.compile(r"^(verify: |.*verify failed)", re.MULTILINE)
_KERNEL_TIMEOUT = re.compile(r"nvme nvme\d+: I/O .*timeout", re.IGNORECASE)
_EILSEQ = 84  # what fio's verify jobs exit with on a mismatch


def soak_init_script() -> bytes:
    return resources.files("vnvme.vm").joinpath("soak_init.sh").read_bytes()


@dataclass
class SoakOptions:
    minutes: float = 1.0
    seed: int | None = None
    #: Seconds of fio per boot; the run has max(2, minutes * 60 / io_seconds) boots.
    io_seconds: int = 30
    work_dir: Path | None = None
    keep: bool = False
    say: Callable[[str], None] = print

    @property
    def boots(self) -> int:
        return max(2, math.ceil(self.minutes * 60 / self.io_seconds))


@dataclass
class FaultWindow:
    """Media errors on ``first``..``first + size`` (bytes) from ``start`` to ``end`` seconds after
    the boot's I/O began; ``applied`` / ``removed``: when the control socket said ok."""

    start: float
    end: float
    first: int
    size: int
    applied: float | None = None
    removed: float | None = None
    errors: int = 0

    @property
    def lbas(self) -> str:
        return f"{self.first // LBA_BYTES}-{(self.first + self.size) // LBA_BYTES - 1}"

    def covers(self, offset: int, length: int) -> bool:
        return offset < self.first + self.size and self.first < offset + length


@dataclass
class BootPlan:
    index: int
    seed: int
    resets: list[float]
    windows: list[FaultWindow]


def plan_boot(rng: random.Random, index: int, io_seconds: int) -> BootPlan:
    """Reset times and fault windows of one boot, all inside its I/O time.

    One reset per 15 s (at least one); one fault window per 10 s (at least one), each in its own
    slot of the I/O time and on its own range, 3 to 6 s long."""
    usable = (3.0, io_seconds - 5.0)
    resets = sorted(round(rng.uniform(*usable), 1) for _ in range(max(1, io_seconds // 15)))
    count = max(1, io_seconds // 10)
    ranges = rng.sample(range(FAULT_AREA[1] // FAULT_RANGE), count)
    slot = (usable[1] - usable[0]) / count
    windows = []
    for n, which in enumerate(ranges):
        length = rng.uniform(3.0, min(6.0, slot))
        start = usable[0] + n * slot + rng.uniform(0.0, slot - length)
        windows.append(
            FaultWindow(
                round(start, 1), round(start + length, 1), FAULT_AREA[0] + which * FAULT_RANGE, FAULT_RANGE
            )
        )
    return BootPlan(index, rng.randrange(1 << 31), resets, windows)


class _Conductor(threading.Thread):
    """Turns the boot's fault windows on and off once its I/O starts, and stops a guest that
    hangs. The guest's lines arrive through :meth:`on_line` (the boot loop's thread)."""

    def __init__(self, plan: BootPlan, control: str, guest: Guest, say: Callable[[str], None]) -> None:
        super().__init__(daemon=True)
        self.plan = plan
        self.control = control
        self.guest = guest
        self.say = say
        self.hang: str | None = None
        self.control_errors: list[str] = []
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._io_start: float | None = None
        self._io_end: float | None = None
        self._last_line = time.monotonic()
        self._last_progress = time.monotonic()
        self._progress: tuple[str, str] | None = None
        self._rule_ids: dict[int, str] = {}

    def on_line(self, line: str) -> None:
        now = time.monotonic()
        words = line.split()
        with self._lock:
            self._last_line = now
            if line.startswith("@@note io-start"):
                self._io_start = self._last_progress = now
            elif line.startswith("@@note io-end"):
                self._io_end = now
            elif line.startswith("@@note progress") and len(words) >= 5:
                counts = (words[3], words[4])
                if counts != self._progress:
                    self._progress, self._last_progress = counts, now

    def finish(self) -> None:
        self._done.set()
        self.join(30)

    def run(self) -> None:
        pending = sorted(
            [(w.start, True, w) for w in self.plan.windows] + [(w.end, False, w) for w in self.plan.windows],
            key=lambda item: item[0],
        )
        while not self._done.wait(0.1):
            now = time.monotonic()
            with self._lock:
                start, end = self._io_start, self._io_end
                silent = now - self._last_line
                stalled = now - self._last_progress
            if start is not None and end is None and stalled > HANG_SECONDS:
                self._stop_guest(f"no I/O progress for {stalled:.0f} s while fio runs")
                break
            if silent > SILENCE_SECONDS:
                self._stop_guest(f"no word from the guest for {silent:.0f} s")
                break
            while start is not None and pending and now - start >= pending[0][0]:
                _, on, window = pending.pop(0)
                self._switch(window, on, now - start)
        for window in self.plan.windows:  # the I/O ended early: nothing stays on
            if window.applied is not None and window.removed is None:
                self._switch(window, False, None)

    def _switch(self, window: FaultWindow, on: bool, at: float | None) -> None:
        if on:
            line = f"fault add nsid=1,lba={window.lbas},media-error=dnr"
        elif window.applied is None:
            return
        else:
            line = f"fault remove {self._rule_ids.pop(id(window))}"
        try:
            reply = request(self.control, line, timeout=10)
        except OSError as exc:
            self.control_errors.append(f"{line}: {exc}")
            return
        if not reply.startswith("ok"):
            self.control_errors.append(f"{line}: {reply}")
            return
        when = -1.0 if at is None else round(at, 1)
        if on:
            self._rule_ids[id(window)] = reply.split()[2].rstrip(":")
            window.applied = when
        else:
            window.removed = when
        self.say(f"[soak] boot {self.plan.index}: t={when:5.1f}s {line} -> {reply}")

    def _stop_guest(self, reason: str) -> None:
        self.hang = reason
        self.say(f"[soak] boot {self.plan.index}: HANG: {reason}; stopping the guest")
        proc = self.guest.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # the boot loop sees it exit, and reaps it


@dataclass
class BootReport:
    index: int
    seed: int
    seconds: float
    verify_ios: int = 0
    fault_job_ios: int = 0
    verify_mismatches: int = 0
    errors_inside: int = 0
    errors_outside: int = 0
    windows: list[dict[str, Any]] = field(default_factory=list)
    windows_unseen: int = 0
    resets_planned: int = 0
    resets_survived: int = 0
    sums_before: list[str] | None = None
    sums_after: list[str] | None = None
    sums_on_disk: list[str] | None = None
    hang: str | None = None
    io_timeouts: int = 0
    control_errors: list[str] = field(default_factory=list)
    server_internal_errors: int = 0
    problems: list[str] = field(default_factory=list)


@dataclass
class SoakReport:
    kernel: str
    qemu: str
    seed: int
    minutes: float
    io_seconds: int
    boots: list[BootReport]
    restarts: int
    restarts_verified: int
    seconds: float

    def total(self, name: str) -> int:
        return sum(int(getattr(boot, name)) for boot in self.boots)

    @property
    def hangs(self) -> int:
        return sum(1 for b in self.boots if b.hang) + self.total("io_timeouts")

    @property
    def problems(self) -> list[str]:
        return [f"boot {b.index}: {p}" for b in self.boots for p in b.problems]

    @property
    def passed(self) -> bool:
        return bool(self.boots) and not self.problems

    def summary(self) -> dict[str, Any]:
        windows = sum(len(b.windows) for b in self.boots)
        return {
            "ios": self.total("verify_ios") + self.total("fault_job_ios"),
            "verify_ios": self.total("verify_ios"),
            "fault_job_ios": self.total("fault_job_ios"),
            "verify_mismatches": self.total("verify_mismatches"),
            "errors_inside_fault_ranges": self.total("errors_inside"),
            "errors_outside_fault_ranges": self.total("errors_outside"),
            "fault_windows": windows,
            "fault_windows_without_errors": self.total("windows_unseen"),
            "resets_planned": self.total("resets_planned"),
            "resets_survived": self.total("resets_survived"),
            "restarts": self.restarts,
            "restarts_verified": self.restarts_verified,
            "hangs": self.hangs,
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "kernel": self.kernel,
            "qemu": self.qemu,
            "seed": self.seed,
            "minutes": self.minutes,
            "io_seconds_per_boot": self.io_seconds,
            "seconds": round(self.seconds, 1),
            "passed": self.passed,
            "summary": self.summary(),
            "problems": self.problems,
            "boots": [asdict(b) for b in self.boots],
        }


def region_sums(path: Path) -> list[str]:
    """The md5 of each verify region of the namespace's file, as the guest computes them."""
    sums = []
    with open(path, "rb") as f:
        for offset, size in REGIONS:
            f.seek(offset)
            sums.append(hashlib.md5(f.read(size)).hexdigest())
    return sums


def _notes(boot: BootResult, prefix: str) -> list[list[str]]:
    return [note.split()[1:] for note in boot.notes if note.split()[:1] == [prefix]]


def _fio_jobs(block: Block | None) -> list[dict[str, Any]]:
    if block is None:
        return []
    try:
        data = block.json()
    except ValueError:
        return []
    jobs = data.get("jobs", []) if isinstance(data, dict) else []
    return [job for job in jobs if isinstance(job, dict)]


def _ios(job: dict[str, Any]) -> int:
    return sum(int(job.get(d, {}).get("total_ios", 0)) for d in ("read", "write"))


def judge_boot(plan: BootPlan, boot: BootResult, conductor_hang: str | None, seconds: float) -> BootReport:
    """What one boot's blocks and notes say, against its plan."""
    report = BootReport(plan.index, plan.seed, round(seconds, 1), hang=conductor_hang)
    problems = report.problems
    if boot.timed_out and report.hang is None:
        report.hang = f"the boot did not end within its {boot.seconds:.0f} s"
    if report.hang:
        problems.append(f"hang: {report.hang}")
    verify = _fio_jobs(boot.block("verify-json"))
    if len(verify) != SMP:
        problems.append(f"{len(verify)} verify jobs reported, expected {SMP}")
    verify_err = boot.block("verify-stderr")
    err_text = verify_err.text if verify_err else ""
    report.verify_ios = sum(_ios(job) for job in verify)
    report.verify_mismatches = len(_VERIFY_FAILED.findall(err_text))
    if report.verify_mismatches == 0 and any(job.get("error") == _EILSEQ for job in verify):
        report.verify_mismatches = 1
    # A verify job's I/O error is outside every fault range by construction; fio logs the error
    # that ends a job and sets the job's error too: count it once.
    report.errors_outside += max(
        len(_FIO_ERROR.findall(err_text)), sum(1 for job in verify if job.get("error") not in (0, _EILSEQ))
    )
    faults = _fio_jobs(boot.block("faults-json"))
    report.fault_job_ios = sum(_ios(job) for job in faults)
    fault_err = boot.block("faults-stderr")
    applied = [w for w in plan.windows if w.applied is not None]
    logged = _FIO_ERROR.findall(fault_err.text if fault_err else "")
    for _, _, offset, length in logged:
        hit = [w for w in applied if w.covers(int(offset), int(length))]
        if hit:
            report.errors_inside += 1
            for window in hit:
                window.errors += 1
        else:
            report.errors_outside += 1
    report.windows = [asdict(w) | {"lbas": w.lbas} for w in plan.windows]
    report.windows_unseen = sum(1 for w in applied if w.errors == 0)
    counted = sum(int(job.get("total_err", 0)) for job in faults)
    if not faults:
        problems.append("the fault job reported nothing")
    elif counted != len(logged):
        problems.append(f"the fault job counted {counted} errors but logged {len(logged)}")
    if report.verify_mismatches:
        problems.append(f"{report.verify_mismatches} verify mismatch(es):\n{tail_lines(err_text, 6)}")
    if report.errors_outside:
        problems.append(f"{report.errors_outside} I/O error(s) outside the fault ranges")
    if report.windows_unseen:
        problems.append(f"{report.windows_unseen} fault window(s) that the guest never saw fail")
    if len(applied) != len(plan.windows):
        problems.append(f"{len(plan.windows) - len(applied)} fault window(s) never turned on")
    if report.verify_ios == 0:
        problems.append("the verify jobs did no I/O")
    report.resets_planned = len(plan.resets)
    report.resets_survived = sum(1 for words in _notes(boot, "reset") if words[1:2] == ["live"])
    if report.resets_survived != report.resets_planned:
        failed = [" ".join(w) for w in _notes(boot, "reset") if w[1:2] == ["failed"]]
        problems.append(f"{report.resets_survived}/{report.resets_planned} resets came back live {failed}")
    report.io_timeouts = len(_KERNEL_TIMEOUT.findall(boot.console))
    if report.io_timeouts:
        problems.append(f"{report.io_timeouts} I/O timeout(s) in the guest's kernel log")
    before, after = _notes(boot, "sums-before"), _notes(boot, "sums-after")
    report.sums_before = before[-1] if before else None
    report.sums_after = after[-1] if after else None
    if report.sums_after is None:
        problems.append("the guest took no checksums at the end")
    return report


def _say_lines(say: Callable[[str], None], index: int, conductor: _Conductor) -> Callable[[str], None]:
    started = time.monotonic()

    def on_line(line: str) -> None:
        conductor.on_line(line)
        if not line.startswith(("@@begin", "@@note progress")):  # progress: every 2 s, too many
            say(f"[soak] boot {index} {time.monotonic() - started:5.1f}s {line}")

    return on_line


def _remove_stale(path: str) -> None:
    """The socket a SIGKILLed server of ours left in our run folder (never anything else)."""
    try:
        if Path(path).is_socket():
            os.unlink(path)
    except FileNotFoundError:
        pass


def _one_boot(
    image: Image, options: SoakOptions, run_dir: Path, plan: BootPlan, disk: Path
) -> tuple[BootReport, list[str]]:
    """Start ``vnvme serve`` on ``disk``, boot one guest through ``plan``, SIGKILL the server;
    the boot's report and the regions' checksums in the file after the kill."""
    socket_path, control = str(run_dir / "vnvme.sock"), str(run_dir / "control.sock")
    for path in (socket_path, control):
        _remove_stale(path)
    server = ServerProcess(
        vnvme_serve_command(socket_path, "--quiet", "--control", control, "--namespace", f"file={disk}"),
        socket_path,
        None,
        ours=True,
    )
    stats: dict[str, Any] | None = None
    try:
        env = {
            "BOOT": str(plan.index),
            "IO_SECONDS": str(options.io_seconds),
            "SEED": str(plan.seed),
            "REGIONS": " ".join(f"{offset}:{size}" for offset, size in REGIONS),
            "FAULT_AREA": f"{FAULT_AREA[0]}:{FAULT_AREA[1]}",
            "RESETS": " ".join(map(str, plan.resets)),
            "CHECK_BEFORE": "1" if plan.index > 0 else "0",
        }
        guest = Guest(
            image,
            run_dir,
            f"soak{plan.index}",
            vfio_user_device(socket_path),
            env,
            smp=SMP,
            programs={"init": soak_init_script()},
        )
        conductor = _Conductor(plan, control, guest, options.say)
        conductor.start()
        try:
            boot = guest.boot(
                options.io_seconds + BOOT_SLACK_SECONDS, _say_lines(options.say, plan.index, conductor)
            )
        finally:
            conductor.finish()
        try:
            stats = server.counters()
        except BenchError as exc:
            options.say(f"[soak] boot {plan.index}: no statistics from the server: {exc}")
    finally:
        if server.proc.poll() is None:
            server.proc.send_signal(signal.SIGKILL)  # the point: no chance to flush or clean up
            server.proc.wait(30)
        server.stop()
    report = judge_boot(plan, boot, conductor.hang, boot.seconds)
    report.control_errors = conductor.control_errors
    if report.control_errors:
        report.problems.append(f"control socket: {'; '.join(report.control_errors)}")
    if stats is None:
        report.problems.append("the server did not report its statistics (it had exited)")
    else:
        report.server_internal_errors = int(stats.get("controller", {}).get("internal_errors", 0))
        if report.server_internal_errors:
            report.problems.append(f"{report.server_internal_errors} internal error(s) in the controller")
    if report.problems and boot.console:
        options.say(f"[soak] boot {plan.index}: the guest console ends with:\n{tail_lines(boot.console, 15)}")
    return report, region_sums(disk)


def run_soak(image: Image, options: SoakOptions) -> SoakReport:
    """Boot ``options.boots`` guests one after the other against a new ``vnvme serve`` each, on
    one file namespace, and judge every boot and every restart."""
    seed = options.seed if options.seed is not None else random.SystemRandom().randrange(1 << 32)
    rng = random.Random(seed)
    options.say(
        f"[soak] seed {seed} (--seed {seed} repeats this plan): {options.boots} boots of "
        f"{options.io_seconds} s of I/O, {SMP} vCPUs, kernel {image.kernel_version}"
    )
    run_dir = Path(tempfile.mkdtemp(prefix="vnvme-soak-", dir=options.work_dir))
    started = time.monotonic()
    boots: list[BootReport] = []
    restarts = verified = 0
    try:
        disk = run_dir / "soak.img"
        with open(disk, "wb") as f:
            f.truncate(NAMESPACE_BYTES)
        previous: list[str] | None = None  # the regions' checksums in the file after the last kill
        for index in range(options.boots):
            plan = plan_boot(rng, index, options.io_seconds)
            windows = ", ".join(f"LBAs {w.lbas} at {w.start}-{w.end}s" for w in plan.windows)
            options.say(
                f"[soak] boot {index}{' (after SIGKILL and restart of vnvme serve)' if index else ''}: "
                f"resets at {plan.resets} s; media errors: {windows}"
            )
            report, on_disk = _one_boot(image, options, run_dir, plan, disk)
            report.sums_on_disk = on_disk
            if report.sums_after is not None and report.sums_after != on_disk:
                report.problems.append(
                    f"the file after the SIGKILL {on_disk} differs from what the guest read last {report.sums_after}"
                )
            if index > 0:
                restarts += 1
                if report.sums_before == previous:
                    verified += 1
                else:
                    report.problems.append(
                        f"after the restart the guest reads {report.sums_before}, the file held {previous}"
                    )
            previous = on_disk
            boots.append(report)
            summary = "ok" if not report.problems else "; ".join(report.problems)
            options.say(
                f"[soak] boot {index}: {report.verify_ios} verify I/Os, {report.fault_job_ios} fault-job I/Os, "
                f"{report.errors_inside} errors inside / {report.errors_outside} outside the fault ranges, "
                f"{report.resets_survived}/{report.resets_planned} resets: {summary}"
            )
    finally:
        if options.keep:
            options.say(f"[soak] run folder kept: {run_dir}")
        else:
            shutil.rmtree(run_dir, ignore_errors=True)
    return SoakReport(
        kernel=image.kernel_version,
        qemu=image.qemu_version,
        seed=seed,
        minutes=options.minutes,
        io_seconds=options.io_seconds,
        boots=boots,
        restarts=restarts,
        restarts_verified=verified,
        seconds=time.monotonic() - started,
    )


def format_report(report: SoakReport) -> str:
    s = report.summary()
    lines = [
        f"vnvme vm soak: {len(report.boots)} boots in {report.seconds:.0f} s, seed {report.seed}, "
        f"kernel {report.kernel}, {report.qemu}",
        f"  I/Os                        {s['ios']} ({s['verify_ios']} verified jobs, {s['fault_job_ios']} fault job)",
        f"  verify mismatches           {s['verify_mismatches']}",
        f"  I/O errors in fault ranges  {s['errors_inside_fault_ranges']} "
        f"({s['fault_windows']} windows, {s['fault_windows_without_errors']} without an error)",
        f"  I/O errors elsewhere        {s['errors_outside_fault_ranges']}",
        f"  resets survived             {s['resets_survived']}/{s['resets_planned']}",
        f"  restarts survived           {s['restarts_verified']}/{s['restarts']} (SIGKILL, data verified after)",
        f"  hangs                       {s['hangs']}",
        "PASS" if report.passed else "FAIL",
    ]
    lines[-1:-1] = [f"  problem: {p}" for p in report.problems]
    return "\n".join(lines)
