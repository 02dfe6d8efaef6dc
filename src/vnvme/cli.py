"""The ``vnvme`` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from vnvme import __version__
from vnvme.trace import TRACE_EVENTS


def _depths(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of depths: {text!r}") from None
    if not values or any(v < 1 or v > 1023 for v in values):
        raise argparse.ArgumentTypeError("depths must be in 1..1023")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vnvme", description=__doc__)
    parser.add_argument("--version", action="version", version=f"vnvme {__version__}")
    commands = parser.add_subparsers(dest="command")
    demo = commands.add_parser(
        "demo",
        help="bring a controller up through the driver, enable shadow doorbells, do I/O, count doorbells",
    )
    demo.add_argument("--iodepth", type=_depths, default=[1, 2, 4, 8], help="depths, e.g. 1,2,4,8")
    demo.add_argument("--number-ios", type=int, default=20_000, help="I/Os per depth and variant")
    demo.add_argument("--bs", type=int, default=4096, help="block size in bytes (multiple of 512)")
    serve = commands.add_parser(
        "serve",
        help="serve the controller over vfio-user on a UNIX socket (QEMU vfio-user-pci, vnvme's client)",
        description="Serve an NVMe controller with shadow doorbells as a vfio-user PCI device.",
    )
    from vnvme.serve import add_arguments

    add_arguments(serve)
    bench = commands.add_parser(
        "bench",
        help="the shadow doorbell experiment: fio-style I/O through vfio-user, doorbells counted",
        description="Run the shadow doorbell experiment: vnvme serve in its own process, the host "
        "driver here over vfio-user, shadow doorbells off and on, depths 1, 2, 4, 8.",
    )
    from vnvme.bench.command import add_arguments as add_bench_arguments

    add_bench_arguments(bench)
    vm = commands.add_parser(
        "vm",
        help="a real Linux guest (QEMU vfio-user-pci, the nvme driver, fio, nvme-cli) against vnvme",
        description="Provision, boot and judge Linux guests against vnvme serve; compare with QEMU's nvme.",
    )
    from vnvme.vm.command import add_arguments as add_vm_arguments

    add_vm_arguments(vm)
    check = commands.add_parser(
        "check",
        help="conformance checks against a vfio-user NVMe server (vfio-user, NVMe, shadow doorbells)",
        description="Check a vfio-user NVMe server: each check prints PASS / FAIL / SKIP / INFO with its "
        "spec section and evidence; the exit status is 1 if any check FAILs.",
    )
    from vnvme.check.command import add_arguments as add_check_arguments

    add_check_arguments(check)
    trace = commands.add_parser("trace-events", help="list the declared trace events")
    trace.add_argument("pattern", nargs="?", default="*")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in (None, "demo"):
        from vnvme.demo import run_demo

        if args.command is None:
            return run_demo(sys.stdout)
        if args.bs < 512 or args.bs % 512:
            raise SystemExit("--bs must be a multiple of 512")
        return run_demo(sys.stdout, depths=args.iodepth, ios=args.number_ios, block_size=args.bs)
    if args.command == "serve":
        import logging

        from vnvme.serve import run

        logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
        try:
            return run(args)
        except (ValueError, OSError) as exc:  # bad options, namespaces, config: say so, no traceback
            print(f"vnvme serve: {exc}", file=sys.stderr)
            return 2
    if args.command == "bench":
        from vnvme.bench.command import run as run_bench_command

        try:
            return run_bench_command(args)
        except ValueError as exc:
            print(f"vnvme bench: {exc}", file=sys.stderr)
            return 2
    if args.command == "vm":
        from vnvme.vm.command import main as vm_main

        return vm_main(args)
    if args.command == "check":
        from vnvme.check.command import run as run_check

        try:
            return run_check(args)
        except ValueError as exc:
            print(f"vnvme check: {exc}", file=sys.stderr)
            return 2
    if args.command == "trace-events":
        import fnmatch

        for name, spec in TRACE_EVENTS.items():
            if fnmatch.fnmatch(name, args.pattern):
                print(f"{name}({', '.join(spec.args)})")
        return 0
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
