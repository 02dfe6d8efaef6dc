"""``vnvme vm provision | run | compare``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from vnvme.bench.command import machine_description
from vnvme.vm.provision import DEFAULT_KERNEL, KERNELS, MIRROR, Provisioner, ProvisionError, cache_dir
from vnvme.vm.scenarios import (
    DeviceColumn,
    VmOptions,
    compare,
    format_columns,
    git_describe,
    run_scenarios,
)


def _depths(text: str) -> list[int]:
    values = [int(part) for part in text.split(",") if part.strip()]
    if not values or any(v < 1 or v > 1023 for v in values):
        raise argparse.ArgumentTypeError("depths must be in 1..1023")
    return values


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


def _say(text: str) -> None:
    print(text, flush=True)


def main(args: argparse.Namespace) -> int:
    provisioner = Provisioner(args.cache, mirror=args.mirror, say=_say)
    try:
        image = provisioner.image(args.kernel)
    except ProvisionError as exc:
        print(f"vnvme vm: provisioning failed: {exc}", file=sys.stderr)
        return 2
    if args.vm_command == "provision":
        return 0
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
        report = run_scenarios(image, options)
        print()
        for scenario in report.scenarios:
            mark = "PASS" if scenario.passed else "FAIL"
            print(f"{mark}  {scenario.name}")
            for line in scenario.evidence.splitlines():
                print(f"      {line}")
        print(f"\n{sum(s.passed for s in report.scenarios)}/{len(report.scenarios)} scenarios passed")
        if args.json:
            args.json.write_text(json.dumps(report.to_json(), indent=2) + "\n")
        return 0 if report.passed else 1
    columns = compare(image, options, include_qemu_vfio_user=not args.no_qemu_vfio_user)
    table = format_columns(columns, options.depths)
    print()
    print(table)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "kernel": image.kernel_version,
                    "qemu": image.qemu_version,
                    "depths": options.depths,
                    "runtime": options.runtime,
                    "columns": [
                        {
                            "name": c.name,
                            "description": c.description,
                            "server_cpu_us": c.server_cpu_us,
                            "results": [r.__dict__ for r in c.results],
                        }
                        for c in columns
                    ],
                },
                indent=2,
            )
            + "\n"
        )
    if args.markdown:
        args.markdown.write_text(
            _markdown(
                image.kernel_version, image.qemu_version, options, columns, table, " ".join(sys.argv[1:])
            )
        )
    return 0


def _markdown(
    kernel: str, qemu: str, options: VmOptions, columns: list[DeviceColumn], table: str, argv: str
) -> str:
    lines = [
        "# vnvme in a real Linux guest: side by side",
        "",
        f"Regenerated by `vnvme {argv}` (commit {git_describe()}, {time.strftime('%Y-%m-%d')}).",
        "",
        f"- Host: {machine_description()}; guest: Debian kernel {kernel}, 1 vCPU under TCG, {qemu}.",
        f"- fio in the guest: randread, 4k, libaio, direct, 1 job, runtime {options.runtime} s "
        f"(ramp {options.ramp} s) per depth, on a 1 GiB namespace that reads zeroes.",
        "- Doorbells per I/O are I/O-queue doorbell writes that reached the controller, divided by "
        "the I/O commands: vnvme's from its own counters (vendor log page C0h, read by the guest "
        "before and after each job, no tracing); QEMU's from its `pci_nvme_mmio_doorbell_*` trace "
        "events in a separate traced pass (ramp 0) cut at the guest's marks.",
        "",
        table,
        "",
        "Under TCG the guest's one vCPU does all of the guest's work, so IOPS are bounded by what each I/O costs the guest: a doorbell write is an exit to QEMU in every column, but only QEMU's built-in device handles it inside the guest's own process; vnvme and QEMU's controller over vfio-user pay a socket message for it (posted: QEMU's client does not wait for a reply). Doorbell counts are exact; IOPS come from one run on a shared 2-CPU machine.",
        "",
        "Devices:",
        "",
    ]
    lines += [f"- **{c.name}**: {c.description}" for c in columns]
    lines.append("")
    return "\n".join(lines)
