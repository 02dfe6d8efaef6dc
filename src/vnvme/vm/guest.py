"""Boot one guest under TCG and collect what its /init reports.

QEMU runs inside the provisioned root (:func:`vnvme.vm.provision.rooted`), with the run folder
bind-mounted at the same path, so the socket, the per-run initramfs and the serial logs have
one name on both sides. Serial port 0 carries the kernel's console, port 1 the scenario blocks
(see ``guest_init.sh``). Every wait has a timeout; only the QEMU process started here is ever
signalled, by its PID.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vnvme.bench.runner import process_tree_cpu_seconds
from vnvme.vm.cpio import CpioWriter
from vnvme.vm.provision import Image, mount_points, rooted

#: The QEMU guest memory must be shareable so that DMA_MAP carries file descriptors.
GUEST_MEMORY = "512M"
#: Trace events of QEMU's built-in nvme device that count doorbells, and the Get Features
#: (Number of Queues) the guest issues around every fio job to cut the trace (``mark``).
QEMU_DOORBELL_TRACE = ("pci_nvme_mmio_doorbell_sq", "pci_nvme_mmio_doorbell_cq", "pci_nvme_getfeat")


@dataclass
class Block:
    """The output of one command the guest ran, and its exit status."""

    name: str
    rc: int | None  # None: the block never ended (the guest stopped in the middle)
    text: str

    @property
    def ok(self) -> bool:
        return self.rc == 0

    def json(self) -> object:
        """The JSON document inside the output (fio and nvme-cli print a line or two first)."""
        start = self.text.find("{")
        end = self.text.rfind("}")
        if start < 0 or end < start:
            raise ValueError(f"{self.name}: no JSON in the output")
        return json.loads(self.text[start : end + 1])


@dataclass
class BootResult:
    name: str
    exit_code: int | None
    timed_out: bool
    seconds: float
    blocks: list[Block] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    console: str = ""
    trace: str = ""

    def block(self, name: str) -> Block | None:
        """The last block called ``name`` (a rebooted guest may run a step twice)."""
        found = [b for b in self.blocks if b.name == name]
        return found[-1] if found else None

    @property
    def boots(self) -> int:
        return sum(1 for note in self.notes if note.startswith("boot "))


def parse_results(text: str) -> tuple[list[Block], list[str]]:
    """Blocks and notes from the guest's result port."""
    blocks: list[Block] = []
    notes: list[str] = []
    current: Block | None = None
    lines: list[str] = []
    for raw in text.replace("\r", "").split("\n"):
        if raw.startswith("@@begin "):
            if current is not None:  # a block that never ended
                current.text = "\n".join(lines)
                blocks.append(current)
            current, lines = Block(raw[len("@@begin ") :].strip(), None, ""), []
        elif raw.startswith("@@end ") and current is not None:
            parts = raw.split()
            current.text = "\n".join(lines)
            current.rc = int(parts[2]) if len(parts) > 2 and parts[2].isdigit() else None
            blocks.append(current)
            current, lines = None, []
        elif raw.startswith("@@note "):
            notes.append(raw[len("@@note ") :].strip())
        elif current is not None:
            lines.append(raw)
    if current is not None:
        current.text = "\n".join(lines)
        blocks.append(current)
    return blocks, notes


def scenario_archive(variables: dict[str, str], programs: Mapping[str, bytes] | None = None) -> bytes:
    """A small uncompressed cpio with /scenario.env, appended to the cached initramfs;
    ``programs``: executables by path, which replace the cached image's files of that name (Linux
    unpacks the archives in order), e.g. another ``init`` for this boot."""
    buf = io.BytesIO()
    archive = CpioWriter(buf)
    text = "".join(f"{key}={_shell_quote(value)}\n" for key, value in variables.items())
    archive.file("scenario.env", text.encode())
    for path, data in (programs or {}).items():
        archive.file(path, data, mode=0o755)
    archive.close()
    return buf.getvalue()


def _shell_quote(value: str) -> str:
    return "'" + value.replace("'", "'\"'\"'") + "'"


def vfio_user_device(socket_path: str) -> list[str]:
    spec = {"driver": "vfio-user-pci", "socket": {"type": "unix", "path": socket_path}}
    return ["-device", json.dumps(spec, separators=(",", ":"))]


def builtin_nvme_device(size: int = 1 << 30) -> list[str]:
    """QEMU's own NVMe controller in the guest (null-co, read-zeroes): the reference device."""
    return [
        "-blockdev",
        f"driver=null-co,node-name=nul,read-zeroes=on,size={size}",
        "-device",
        "nvme,serial=qemu-nvme,drive=nul",
    ]


class Guest:
    """One QEMU process: a guest with the given devices and scenario, booted under TCG."""

    def __init__(
        self,
        image: Image,
        run_dir: Path,
        name: str,
        devices: Sequence[str],
        scenario: dict[str, str],
        *,
        allow_reboot: bool = False,
        trace_events: Sequence[str] = (),
        cpus: frozenset[int] | None = None,
        smp: int = 1,
        programs: Mapping[str, bytes] | None = None,
    ) -> None:
        self.image = image
        self.run_dir = run_dir
        self.name = name
        self.devices = list(devices)
        self.scenario = scenario
        self.allow_reboot = allow_reboot
        self.trace_events = list(trace_events)
        self.cpus = cpus
        self.smp = smp
        self.programs = dict(programs or {})
        self.console_path = run_dir / f"{name}.console.log"
        self.results_path = run_dir / f"{name}.results.log"
        self.trace_path = run_dir / f"{name}.trace.log"
        self.initrd_path = run_dir / f"{name}.initrd"
        self.proc: subprocess.Popen[str] | None = None

    def prepare(self) -> None:
        """The run's initramfs (the cached one plus this scenario), and no logs of an earlier boot."""
        base = self.image.host_path(self.image.initrd).read_bytes()
        # Linux looks for the next archive's header at a multiple of 4 bytes from the start.
        padding = b"\0" * (-len(base) % 4)
        self.initrd_path.write_bytes(base + padding + scenario_archive(self.scenario, self.programs))
        for path in (self.console_path, self.results_path, self.trace_path):
            path.unlink(missing_ok=True)

    def command(self) -> list[str]:
        argv = [
            "qemu-system-x86_64",
            "-accel",
            "tcg",
            "-machine",
            "q35,memory-backend=mem",
            "-object",
            f"memory-backend-memfd,id=mem,size={GUEST_MEMORY},share=on",
            "-m",
            GUEST_MEMORY,
            "-smp",
            str(self.smp),
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-monitor",
            "none",
            "-serial",
            f"file:{self.console_path}",
            "-serial",
            f"file:{self.results_path}",
            "-kernel",
            self.image.vmlinuz,
            "-initrd",
            str(self.initrd_path),
            "-append",
            "console=ttyS0 loglevel=5 panic=-1 nvme_core.io_timeout=60",
            *self.devices,
        ]
        if not self.allow_reboot:
            argv.append("-no-reboot")
        if self.trace_events:
            for event in self.trace_events:
                argv += ["-trace", event]
            argv += ["-D", str(self.trace_path)]
        return rooted(self.image.root, argv, binds=[self.run_dir])

    def boot(self, timeout: float, on_line: Callable[[str], None] | None = None) -> BootResult:
        """Boot, wait for the guest to power off (or ``timeout``), and parse what it said."""
        self.prepare()
        with mount_points(self.image.root, [self.run_dir]):
            exit_code, timed_out, qemu_output, seconds = self._run(timeout, on_line)
        text = _read(self.results_path)
        blocks, notes = parse_results(text)
        console = _read(self.console_path)
        if qemu_output.strip():
            console += "\n[qemu] " + qemu_output.strip().replace("\n", "\n[qemu] ")
        return BootResult(
            name=self.name,
            exit_code=exit_code,
            timed_out=timed_out,
            seconds=seconds,
            blocks=blocks,
            notes=notes,
            console=console,
            trace=_read(self.trace_path),
        )

    def _run(
        self, timeout: float, on_line: Callable[[str], None] | None
    ) -> tuple[int | None, bool, str, float]:
        """Start QEMU and wait until it exits or ``timeout`` (then stop it): (exit code, timed
        out, its output, seconds)."""
        started = time.monotonic()
        proc = self.proc = subprocess.Popen(
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        if self.cpus is not None:
            with contextlib.suppress(ProcessLookupError):
                os.sched_setaffinity(proc.pid, self.cpus)
        timed_out = False
        seen = 0
        deadline = started + timeout
        try:
            while proc.poll() is None:
                if time.monotonic() > deadline:
                    timed_out = True
                    self.stop()
                    break
                # short: the host samples CPU times at the guest's block boundaries
                time.sleep(0.05)
                if on_line is not None:
                    seen = self._follow(seen, on_line)
        finally:
            # an interrupted wait (Ctrl-C) must not leave QEMU running on the mount point
            self.stop()
        if on_line is not None:
            self._follow(seen, on_line)
        qemu_output = proc.stdout.read() if proc.stdout else ""
        if proc.stdout:
            proc.stdout.close()
        return proc.returncode, timed_out, qemu_output, time.monotonic() - started

    def _follow(self, seen: int, on_line: Callable[[str], None]) -> int:
        """Report new @@begin / @@end / @@note lines (progress while a long scenario runs, and the
        moments the host samples the server at); ``seen``: bytes of the file already read."""
        try:
            with open(self.results_path, "rb") as f:
                f.seek(seen)
                data = f.read()
        except FileNotFoundError:
            return seen
        for line in data.splitlines(keepends=True):
            if not line.endswith(b"\n"):
                break
            seen += len(line)
            if line.startswith((b"@@note", b"@@begin", b"@@end")):
                on_line(line.decode(errors="replace").strip())
        return seen

    def cpu_seconds(self) -> float | None:
        """CPU time of the QEMU process running this guest (``rooted``'s wrappers exec into it),
        all its threads; None before it starts and once it has exited."""
        proc = self.proc
        # poll() first: once QEMU is reaped its PID may name another process
        if proc is None or proc.poll() is not None:
            return None
        return process_tree_cpu_seconds(proc.pid)

    def stop(self) -> None:
        """Stop the QEMU process this guest started (SIGTERM, then SIGKILL), by its PID."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


_DOORBELL = re.compile(r"pci_nvme_mmio_doorbell_(sq|cq) (?:sq|cq)id (\d+)")
_GETFEAT_NUMQ = re.compile(r"pci_nvme_getfeat .*fid 0x7\b")


def trace_doorbells_between_marks(trace: str) -> list[dict[str, int]]:
    """QEMU's doorbell trace cut at the guest's marks: per interval, doorbells by kind."""
    intervals: list[dict[str, int]] = []
    current: dict[str, int] | None = None
    for line in trace.splitlines():
        if _GETFEAT_NUMQ.search(line):
            if current is not None:
                intervals.append(current)
            current = {"sq_io": 0, "cq_io": 0, "sq_admin": 0, "cq_admin": 0}
            continue
        match = _DOORBELL.search(line)
        if match and current is not None:
            kind = match.group(1) + ("_admin" if match.group(2) == "0" else "_io")
            current[kind] += 1
    return intervals
