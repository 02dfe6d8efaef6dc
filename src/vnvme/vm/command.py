"""``vnvme vm provision | run | compare | soak``."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vnvme.bench.command import machine_description
from vnvme.bench.runner import BenchError
from vnvme.controller.variants import VM_COMPARE
from vnvme.paths import check_output_file, make_folder, write_output
from vnvme.vm.compare import DeviceColumn, compare, explanation, format_columns, vm_variant_problem
from vnvme.vm.provision import DEFAULT_KERNEL, KERNELS, MIRROR, Image, Provisioner, ProvisionError, cache_dir
from vnvme.vm.scenarios import VmOptions, git_describe, run_scenarios
from vnvme.vm.soak import SoakOptions, format_report, run_soak


def _depths(text: str) -> list[int]:
    values = [int(part) for part in text.split(",") if part.strip()]
    if not values or any(v < 1 or v > 1023 for v in values):
        raise argparse.ArgumentTypeError("depths must be in 1..1023")
    return values


def _variants(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise argparse.ArgumentTypeError("name at least one variant")
    for name in names:
        problem = vm_variant_problem(name)
        if problem is not None:
            raise argparse.ArgumentTypeError(problem)
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"{text!r}: a variant named twice")
    return names


def _ranged(number: Callable[[str], float], low: float, high: float, what: str) -> Callable[[str], float]:
    """An argparse type: ``number(text)`` with ``low <= value <= high`` (``low`` excluded when it
    is 0), else one line naming ``what`` and the range."""
    shown = f"({low:g}, {high:g}]" if low == 0 else f"{low:g}..{high:g}"

    def parse(text: str) -> float:
        try:
            value = number(text)
        except ValueError:
            value = low - 1
        if not (low < value if low == 0 else low <= value) or not value <= high:
            raise argparse.ArgumentTypeError(f"{text!r}: {what} must be in {shown}")
        return value

    return parse


_repeat = _ranged(int, 1, 20, "boots per column")
_minutes = _ranged(float, 0, 24 * 60, "minutes")
_io_seconds = _ranged(int, 15, 600, "seconds of I/O per boot")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="vm_command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--kernel", choices=sorted(KERNELS), default=DEFAULT_KERNEL, help="guest kernel (Debian)"
    )
    common.add_argument("--cache", type=Path, default=None, help=f"provisioning cache ({cache_dir()})")
    common.add_argument("--mirror", default=MIRROR, help="Debian mirror")
    sub.add_parser(
        "provision",
        parents=[common],
        help="build the cached trixie root (QEMU with vfio-user-pci), guest kernel and initramfs",
    )
    soak = sub.add_parser(
        "soak",
        parents=[common],
        help="a 2-vCPU guest runs fio with crc32c verify while the controller is reset, media "
        "errors come and go and vnvme serve is SIGKILLed and restarted between boots",
    )
    soak.add_argument(
        "--minutes", type=_minutes, default=1.0, help="minutes of guest I/O, in boots of --io-seconds (1)"
    )
    soak.add_argument(
        "--io-seconds", type=_io_seconds, default=30, help="seconds of fio per boot, 15..600 (30)"
    )
    soak.add_argument("--seed", type=int, default=None, help="repeat a run's plan (printed at its start)")
    soak.add_argument(
        "--work-dir", type=Path, default=None, help="where the run folder goes (a temporary folder)"
    )
    soak.add_argument(
        "--keep", action="store_true", help="keep the run folder (serial logs, the namespace file)"
    )
    soak.add_argument("--json", type=Path, default=None, help="write the report as JSON")
    runs = argparse.ArgumentParser(add_help=False, parents=[common])
    runs.add_argument("--iodepth", type=_depths, default=[1, 2, 4, 8], help="fio depths (1,2,4,8)")
    runs.add_argument("--runtime", type=int, default=3, help="seconds of fio per depth (3)")
    runs.add_argument("--ramp", type=int, default=1, help="fio ramp_time seconds (1)")
    runs.add_argument(
        "--timeout", type=float, default=900.0, help="seconds a guest may take before it is stopped"
    )
    runs.add_argument("--work-dir", type=Path, default=None, help="where run folders go (a temporary folder)")
    runs.add_argument("--keep", action="store_true", help="keep the run folder (serial logs, initramfs)")
    runs.add_argument("--json", type=Path, default=None, help="write the results as JSON")
    sub.add_parser(
        "run",
        parents=[runs],
        help="boot Linux guests against vnvme serve and run every scenario (pass/fail with evidence)",
    )
    cmp = sub.add_parser(
        "compare",
        parents=[runs],
        help="fio in the same guest against vnvme (dbbuf on/off), QEMU's built-in nvme and QEMU's nvme over vfio-user",
    )
    cmp.add_argument("--markdown", type=Path, default=None, help="write a VM-RESULTS.md style report")
    cmp.add_argument(
        "--no-qemu-vfio-user", action="store_true", help="leave out QEMU's vfio-user server column"
    )
    cmp.add_argument("--no-qemu", action="store_true", help="leave out both QEMU columns")
    cmp.add_argument(
        "--smp",
        type=int,
        choices=(1, 2),
        default=1,
        help="guest vCPUs (1); with 2: two I/O queues, one fio job per vCPU pinned to it, iodepth per job",
    )
    cmp.add_argument("--repeat", type=_repeat, default=1, help="boots per column: median and min-max (1)")
    cmp.add_argument(
        "--variants",
        type=_variants,
        default=list(VM_COMPARE),
        help=f"vnvme columns, by the names of vnvme.controller.variants ({','.join(VM_COMPARE)})",
    )


def _say(text: str) -> None:
    print(text, flush=True)


def _prepare_paths(args: argparse.Namespace) -> None:
    """Folders named are made (``mkdir -p``), files to write checked: before provisioning and
    booting, not after a run whose results would be lost. ValueError: one line."""
    for option in ("--cache", "--work-dir"):
        folder = getattr(args, option[2:].replace("-", "_"), None)
        if folder is not None:
            make_folder(option, folder)
    for option in ("--json", "--markdown"):
        path = getattr(args, option[2:], None)
        if path is not None:
            check_output_file(option, path)


def main(args: argparse.Namespace) -> int:
    try:
        _prepare_paths(args)
    except ValueError as exc:
        print(f"vnvme vm {args.vm_command}: {exc}", file=sys.stderr)
        return 2
    provisioner = Provisioner(args.cache, mirror=args.mirror, say=_say)
    try:
        image = provisioner.image(args.kernel)
    except ProvisionError as exc:
        print(f"vnvme vm: provisioning failed: {exc}", file=sys.stderr)
        return 2
    if args.vm_command == "provision":
        return 0
    if args.vm_command == "soak":
        return _soak(image, args)
    options = VmOptions(
        depths=args.iodepth,
        runtime=args.runtime,
        ramp=args.ramp,
        boot_timeout=args.timeout,
        work_dir=args.work_dir,
        keep=args.keep,
        say=_say,
    )
    if args.vm_command == "run":
        return _run(image, options, args.json)
    options.smp = args.smp
    options.repeat = args.repeat
    options.variants = tuple(args.variants)
    return _compare(image, options, args)


def _soak(image: Image, args: argparse.Namespace) -> int:
    options = SoakOptions(
        minutes=args.minutes,
        seed=args.seed,
        io_seconds=args.io_seconds,
        work_dir=args.work_dir,
        keep=args.keep,
        say=_say,
    )
    try:
        report = run_soak(image, options)
    except (BenchError, OSError) as exc:  # a server that would not start, a run folder not made
        print(f"vnvme vm soak: {exc}", file=sys.stderr)
        return 1
    print()
    print(format_report(report))
    if args.json and not _written("soak", "--json", args.json, json.dumps(report.to_json(), indent=2) + "\n"):
        return 1
    return 0 if report.passed else 1


def _written(command: str, option: str, path: Path, text: str) -> bool:
    """Write a report after the run: False (and one line) if it could not be."""
    try:
        write_output(option, path, text)
    except ValueError as exc:
        print(f"vnvme vm {command}: {exc}", file=sys.stderr)
        return False
    return True


def _run(image: Image, options: VmOptions, json_path: Path | None) -> int:
    report = run_scenarios(image, options)
    print()
    for scenario in report.scenarios:
        mark = "PASS" if scenario.passed else "FAIL"
        print(f"{mark}  {scenario.name}")
        for line in scenario.evidence.splitlines():
            print(f"      {line}")
    print(f"\n{sum(s.passed for s in report.scenarios)}/{len(report.scenarios)} scenarios passed")
    print()
    for paragraph in explanation(options.smp)[:2]:  # what the fio line's doorbells/IO count
        print(textwrap.fill(paragraph, 100))
    if json_path and not _written("run", "--json", json_path, json.dumps(report.to_json(), indent=2) + "\n"):
        return 1
    return 0 if report.passed else 1


def _compare(image: Image, options: VmOptions, args: argparse.Namespace) -> int:
    try:
        columns = compare(
            image, options, include_qemu=not args.no_qemu, include_qemu_vfio_user=not args.no_qemu_vfio_user
        )
    except RuntimeError as exc:  # a guest that did not finish, a server that would not start
        print(f"vnvme vm compare: {exc}", file=sys.stderr)
        return 1
    table = format_columns(columns, options.depths, options.smp)
    print()
    print(table)
    print()
    for paragraph in explanation(options.smp):
        print(textwrap.fill(paragraph, 100))
    written = True
    if args.json:
        text = json.dumps(compare_json(image, options, columns), indent=2) + "\n"
        written &= _written("compare", "--json", args.json, text)
    if args.markdown:
        argv = " ".join(sys.argv[1:])
        text = _markdown(image.kernel_version, image.qemu_version, options, columns, table, argv)
        written &= _written("compare", "--markdown", args.markdown, text)
    return 0 if written else 1


def compare_json(image: Image, options: VmOptions, columns: list[DeviceColumn]) -> dict[str, Any]:
    """``vnvme vm compare --json``: the setting, every repeat's results and the medians."""
    return {
        "kernel": image.kernel_version,
        "qemu": image.qemu_version,
        "smp": options.smp,
        "numjobs": options.smp,
        "depths": options.depths,
        "runtime": options.runtime,
        "ramp": options.ramp,
        "repeat": options.repeat,
        "variants": list(options.variants),
        "columns": [column.to_json(options.depths) for column in columns],
        "explanation": explanation(options.smp),
    }


def _markdown(
    kernel: str, qemu: str, options: VmOptions, columns: list[DeviceColumn], table: str, argv: str
) -> str:
    jobs = f"{options.smp} jobs (one per vCPU, pinned)" if options.smp > 1 else "1 job"
    boots = (
        f"median of {options.repeat} boots per column (min-max beside)"
        if options.repeat > 1
        else "one boot per column"
    )
    lines = [
        "# vnvme in a real Linux guest: side by side",
        "",
        f"Regenerated by `vnvme {argv}` (commit {git_describe()}, {time.strftime('%Y-%m-%d')}).",
        "",
        f"- Host: {machine_description()}; guest: Debian kernel {kernel}, {options.smp} vCPU under TCG, {qemu}.",
        f"- fio in the guest: randread, 4k, libaio, direct, {jobs}, iodepth per job, runtime "
        f"{options.runtime} s (ramp {options.ramp} s) per depth, on a 1 GiB namespace that reads "
        f"zeroes; {boots}.",
        "",
        table,
        "",
        *(f"- {paragraph}" for paragraph in explanation(options.smp)),
        "",
        "Devices:",
        "",
    ]
    lines += [f"- **{c.name}**: {c.description}" for c in columns]
    lines.append("")
    return "\n".join(lines)
