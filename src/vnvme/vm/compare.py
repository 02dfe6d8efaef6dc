"""``vnvme vm compare``: the same guest and fio jobs against several devices, side by side.

Columns: vnvme serve in each chosen doorbell variant (``vnvme.controller.variants``), QEMU's
built-in ``-device nvme`` (null-co, read-zeroes) and, when built, QEMU's own NVMe controller
exported over vfio-user (``../shared/tools/qemu-vfio-user-server``). Every column boots
``repeat`` times, the repeats interleaved across columns so that the machine's slow minutes are
shared; a vnvme column gets a fresh server per boot. What is measured per job, and how, is
``vnvme.vm.measure``'s docstring. QEMU's doorbells come from its trace events, in one extra
traced boot per QEMU column, so that tracing does not distort the IOPS.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vnvme.bench.runner import ServerProcess
from vnvme.controller.variants import VARIANTS
from vnvme.vm.guest import QEMU_DOORBELL_TRACE, BootResult, Guest, builtin_nvme_device, vfio_user_device
from vnvme.vm.measure import CpuWindows, DepthResult, depth_results
from vnvme.vm.provision import Image
from vnvme.vm.scenarios import VmOptions, boot_with_progress, scenario_env, tail_lines, vnvme_serve_command

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


def vm_variant_problem(name: str) -> str | None:
    """Why ``name`` cannot be a ``vnvme vm compare`` column, or None if it can."""
    variant = VARIANTS.get(name)
    if variant is None:
        return f"unknown variant {name!r} (one of: {', '.join(VARIANTS)})"
    if variant.posted:
        # QEMU's vfio-user-pci decides how it writes BAR0: it posts (x-no-posted-writes=off)
        return f"{name}: posted writes are the host's choice, and QEMU's vfio-user-pci posts them in every column"
    return None


@dataclass(frozen=True)
class Spread:
    """The median of the repeats, and their least and greatest value."""

    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: Sequence[float | None]) -> Spread | None:
        known = [v for v in values if v is not None]
        if not known:
            return None
        return cls(statistics.median(known), min(known), max(known))


#: What a column reports per depth, each as a :class:`Spread` over the repeats.
METRICS = (
    "iops",
    "doorbells",
    "sq_doorbells",
    "cq_doorbells",
    "mapped_doorbells",
    "interrupts",
    "server_cpu_us",
    "guest_qemu_cpu_us",
    "machine_busy_cpus",
    "lat_p50_us",
    "lat_p99_us",
)


@dataclass
class DeviceColumn:
    name: str
    description: str
    #: The variant's name in ``vnvme.controller.variants`` (None: a QEMU device).
    variant: str | None = None
    #: One list of per-depth results per boot.
    repeats: list[list[DepthResult]] = field(default_factory=list)

    def spread(self, depth: int, metric: str) -> Spread | None:
        values = [getattr(r, metric) for boot in self.repeats for r in boot if r.depth == depth]
        return Spread.of(values)

    def summary(self, depths: Sequence[int]) -> list[dict[str, Any]]:
        """Per depth, every metric's median, min and max (None where nothing was measured)."""
        out: list[dict[str, Any]] = []
        for depth in depths:
            row: dict[str, Any] = {"depth": depth}
            for metric in METRICS:
                spread = self.spread(depth, metric)
                row[metric] = (
                    None
                    if spread is None
                    else {"median": spread.median, "min": spread.low, "max": spread.high}
                )
            out.append(row)
        return out

    def to_json(self, depths: Sequence[int]) -> dict[str, Any]:
        return {
            "name": self.name,
            "variant": self.variant,
            "description": self.description,
            "repeats": [[{**asdict(r), "doorbells": r.doorbells} for r in boot] for boot in self.repeats],
            "median": self.summary(depths),
        }


def _tag(repeat: int | None) -> str:
    return "traced" if repeat is None else f"r{repeat + 1}"


class _Boots:
    """Boots the guests of one comparison in ``run_dir``."""

    def __init__(self, image: Image, options: VmOptions, run_dir: Path) -> None:
        self.image = image
        self.options = options
        self.run_dir = run_dir

    def boot(
        self,
        name: str,
        devices: list[str],
        env: dict[str, str],
        *,
        trace_events: Sequence[str] = (),
        server: ServerProcess | None = None,
    ) -> tuple[BootResult, CpuWindows]:
        """The boot, and the CPU time of its QEMU, of ``server`` and of the machine per fio job."""
        guest = Guest(
            self.image, self.run_dir, name, devices, env, trace_events=trace_events, smp=self.options.smp
        )
        cpu = CpuWindows.around_guest(guest.cpu_seconds, server.cpu_seconds if server is not None else None)
        what = f"for fio ({self.options.smp} vCPU{'s' if self.options.smp > 1 else ''})"
        boot = boot_with_progress(guest, self.options, what, cpu.on_line)
        probe = boot.block("probe")
        if boot.timed_out or probe is None or not probe.ok:
            raise RuntimeError(f"{name}: the guest did not finish:\n{tail_lines(boot.console, 20)}")
        return boot, cpu

    def vnvme(self, name: str, repeat: int) -> list[DepthResult]:
        """One boot against a fresh ``vnvme serve`` running variant ``name``."""
        socket_path = str(self.run_dir / "vnvme.sock")
        command = vnvme_serve_command(socket_path, *VARIANTS[name].serve_args())
        server = ServerProcess(command, socket_path, None, ours=True)
        try:
            env = scenario_env(self.options, "bench")
            boot, cpu = self.boot(
                f"vnvme-{name}-r{repeat + 1}", vfio_user_device(socket_path), env, server=server
            )
        finally:
            server.stop()
        return depth_results(boot, self.options.depths, cpu=cpu)

    def qemu_builtin(self, repeat: int | None) -> tuple[BootResult, CpuWindows]:
        """QEMU's built-in nvme; ``repeat`` None: the traced boot."""
        traced = repeat is None
        env = scenario_env(self.options, "bench", COUNTERS="0", **({"RAMP": "0"} if traced else {}))
        name = f"qemu-builtin-{_tag(repeat)}"
        return self.boot(name, builtin_nvme_device(), env, trace_events=QEMU_DOORBELL_TRACE if traced else ())

    def qemu_vfio_user(self, script: Path, repeat: int | None) -> tuple[BootResult, CpuWindows]:
        """QEMU's nvme over vfio-user (a fresh server per boot: it serves one client);
        ``repeat`` None: the traced boot."""
        traced = repeat is None
        tag = _tag(repeat)
        socket_path = str(self.run_dir / f"qemu-vfu-{tag}.sock")
        trace_file = self.run_dir / "qemu-vfu-trace.log"
        extra: list[str] = []
        if traced:
            for event in QEMU_DOORBELL_TRACE:
                extra += ["--trace", event]
            extra += ["-D", str(trace_file)]
        server = ServerProcess(["bash", str(script), socket_path, *extra], socket_path, None, ours=False)
        try:
            env = scenario_env(self.options, "bench", COUNTERS="0", **({"RAMP": "0"} if traced else {}))
            boot, cpu = self.boot(f"qemu-vfu-{tag}", vfio_user_device(socket_path), env, server=server)
        finally:
            server.stop()
        if traced:
            boot.trace = trace_file.read_text(errors="replace") if trace_file.exists() else ""
        return boot, cpu


def _vnvme_column(name: str) -> DeviceColumn:
    variant = VARIANTS[name]
    options = "".join(" " + arg for arg in variant.serve_args())
    return DeviceColumn(f"vnvme {variant.label}", f"vnvme serve{options} ({name})", name)


def compare(
    image: Image, options: VmOptions, *, include_qemu: bool = True, include_qemu_vfio_user: bool = True
) -> list[DeviceColumn]:
    """Every column booted ``options.repeat`` times, per depth what ``measure`` describes."""
    run_dir = Path(tempfile.mkdtemp(prefix="vnvme-vm-compare-", dir=options.work_dir))
    try:
        return _compare(_Boots(image, options, run_dir), include_qemu, include_qemu_vfio_user)
    finally:
        if not options.keep:
            shutil.rmtree(run_dir, ignore_errors=True)
        else:
            options.say(f"[vm] run folder kept: {run_dir}")


def _compare(boots: _Boots, include_qemu: bool, include_qemu_vfio_user: bool) -> list[DeviceColumn]:
    options = boots.options
    columns = [_vnvme_column(name) for name in options.variants]
    script = qemu_vfio_user_run_script() if include_qemu and include_qemu_vfio_user else None
    if include_qemu and include_qemu_vfio_user and script is None:
        options.say(
            "[vm] QEMU's vfio-user server is not built (../shared/tools/qemu-vfio-user-server/build.sh): column skipped"
        )
    builtin: list[tuple[BootResult, CpuWindows]] = []
    vfu: list[tuple[BootResult, CpuWindows]] = []
    for repeat in range(options.repeat):
        for column in columns:
            assert column.variant is not None
            column.repeats.append(boots.vnvme(column.variant, repeat))
        if include_qemu:
            builtin.append(boots.qemu_builtin(repeat))
        if script is not None:
            vfu.append(boots.qemu_vfio_user(script, repeat))
    if include_qemu:
        traced, _ = boots.qemu_builtin(None)
        column = DeviceColumn(
            "QEMU built-in nvme",
            f"-device nvme, null-co read-zeroes ({boots.image.qemu_version}); doorbells from one traced boot",
        )
        column.repeats = [depth_results(b, options.depths, traced=traced, cpu=cpu) for b, cpu in builtin]
        columns.append(column)
    if script is not None:
        traced, _ = boots.qemu_vfio_user(script, None)
        column = DeviceColumn(
            "QEMU nvme over vfio-user",
            "QEMU's hw/nvme as a vfio-user server (shared/tools/qemu-vfio-user-server); doorbells from one traced boot",
        )
        column.repeats = [depth_results(b, options.depths, traced=traced, cpu=cpu) for b, cpu in vfu]
        columns.append(column)
    return columns


# -- the table


def _cell(spread: Spread | None, show: str, scale: float = 1.0, unit: str = "") -> str:
    """The median, and the min-max of the repeats when they differ."""
    if spread is None:
        return "n/a"

    def one(value: float) -> str:
        return format(value * scale, show) + unit

    text = one(spread.median)
    if spread.low != spread.high:
        text += f" ({one(spread.low)}-{one(spread.high)})"
    return text


def _row(column: DeviceColumn, depth: int) -> str:
    def get(metric: str) -> Spread | None:
        return column.spread(depth, metric)

    sq, cq = get("sq_doorbells"), get("cq_doorbells")
    doorbells = _cell(get("doorbells"), ".3f")
    if sq is not None and cq is not None:
        doorbells += f" = {sq.median:.3f} + {cq.median:.3f}"
    mapped = get("mapped_doorbells")
    if mapped is not None and mapped.high > 0:
        doorbells += f", {mapped.median:.3f} mapped"
    p50, p99 = get("lat_p50_us"), get("lat_p99_us")
    latency = "n/a" if p50 is None or p99 is None else f"{p50.median:.0f} / {p99.median:.0f}"
    busy = _cell(get("machine_busy_cpus"), ".2f")
    cpus = max((r.machine_cpus or 0 for boot in column.repeats for r in boot if r.depth == depth), default=0)
    if busy != "n/a" and cpus:
        busy += f" / {cpus}"
    cells = [
        _cell(get("iops"), ".2f", 1e-3, "k"),
        doorbells,
        _cell(get("interrupts"), ".3f"),
        _cell(get("server_cpu_us"), ".0f"),
        _cell(get("guest_qemu_cpu_us"), ".0f"),
        busy,
        latency,
    ]
    return f"| {column.name} | " + " | ".join(cells) + " |"


def format_columns(columns: Sequence[DeviceColumn], depths: Sequence[int], smp: int = 1) -> str:
    """One table per depth: a row per device; medians over the repeats, (min-max) beside."""
    jobs = f"{smp} jobs x " if smp > 1 else ""
    sections = []
    for depth in depths:
        rows = [
            f"fio randread 4k, {jobs}iodepth {depth}:",
            "",
            "| device | IOPS | doorbells/IO = SQ + CQ | guest IRQs/IO | server CPU/IO (us) "
            "| guest QEMU CPU/IO (us) | host CPUs busy | p50 / p99 latency (us) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        rows += [_row(column, depth) for column in columns]
        sections.append("\n".join(rows))
    return "\n\n".join(sections)


def explanation(smp: int) -> list[str]:
    """What the numbers count and how this tool's host submits (printed under the tables)."""
    per_cpu = (
        f"{smp} fio jobs, one per vCPU and pinned to it, each with its own I/O queue"
        if smp > 1
        else "1 fio job"
    )
    return [
        "doorbells/IO: writes to the I/O queues' SQ tail and CQ head doorbells that trapped to the "
        "controller, divided by the I/O commands (vnvme: its own counters, log page C0h, read by "
        "the guest around each job; QEMU: its trace events, from one separate traced boot). With "
        "dbbuf the Linux driver stores every new tail / head in the shadow doorbell buffer and "
        "writes the doorbell only when it passes the controller's EventIdx: those stores are not counted.",
        f"The host is the guest's Linux nvme driver under fio ({per_cpu}, libaio, 1 io_submit per "
        "I/O): it rings the SQ doorbell once per submission call and the CQ doorbell once per "
        "interrupt, after reaping every completion it finds. So doorbells/IO count how many I/Os "
        "the guest places and reaps per ring: 1.0 when it submits, is interrupted and reaps one at a time.",
        "guest IRQs/IO: interrupts on the nvme I/O queues' vectors in the guest's /proc/interrupts "
        "(all CPUs), per read the block device completed; server CPU/IO: CPU time of the server "
        "process tree during the job, per read (n/a for QEMU's built-in device: it runs in the "
        "guest's own QEMU); latency: fio's completion latency percentiles (clat).",
        "guest QEMU CPU/IO: CPU time (user + system, every thread) of the qemu-system process that "
        "runs the guest, over the same window and per the same reads as the server's: the vCPUs "
        "under TCG, so the guest's driver, block layer and fio, and QEMU's vfio-user client or, in "
        "the built-in column, the device itself. host CPUs busy: the whole machine's busy time "
        "over the window (/proc/stat: user, nice, system, irq, softirq), in CPUs out of all it "
        "has; anything else running on the host counts too. When it stays under all of them, no "
        "one waits for a CPU, and at iodepth 1, where each job's I/Os pass one at a time through "
        "the guest's QEMU and the server, their CPU per I/O sits inside each I/O's latency.",
    ]
