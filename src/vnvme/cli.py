"""The ``vnvme`` command."""

from __future__ import annotations

import argparse
import os
import select
import signal
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


DESCRIPTION = (
    "vnvme: an NVMe controller with shadow doorbell buffers (Doorbell Buffer Config), emulated in "
    "Python, served over vfio-user, and the host driver and benchmark that measure it. Without a "
    "command: vnvme demo. 'vnvme COMMAND --help' describes each command."
)

SERVE_EPILOG = """\
output:
  stdout  the banner and the statistics, one JSON line each time: on SIGUSR1 and at exit
          (--quiet: only those asked for with SIGUSR1)
  stderr  errors, warnings and trace events (unless --trace-file)
"""


class _HelpFormatter(argparse.HelpFormatter):
    """Wraps one-paragraph text (descriptions) as usual; text with line breaks (the epilogs'
    tables of exit statuses and output streams) is printed as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" not in text:
            return super()._fill_text(text, width, indent)
        return "".join(indent + line for line in text.splitlines(keepends=True))


def _stdout_gone() -> bool:
    """Whether nobody reads our stdout any more (a pipe whose reader exited polls as POLLERR)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), 0)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (OSError, ValueError):
        return False


def _stdout_closed() -> int:
    """The reader of stdout went away (``vnvme trace-events | head``): stop quietly, as a tool
    killed by SIGPIPE does, and keep Python's exit-time flush from failing again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 128 + signal.SIGPIPE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vnvme", description=DESCRIPTION)
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
        epilog=SERVE_EPILOG,
        formatter_class=_HelpFormatter,
    )
    from vnvme.serve import add_arguments

    add_arguments(serve)
    bench = commands.add_parser(
        "bench",
        help="the shadow doorbell experiment: fio-style I/O through vfio-user, doorbells counted",
        description="Run the shadow doorbell experiment: vnvme serve in its own process, the host "
        "driver here over vfio-user, shadow doorbells off and on, depths 1, 2, 4, 8. Progress goes to "
        "stderr, the report to stdout (or --output).",
        formatter_class=_HelpFormatter,
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
    ctl = commands.add_parser(
        "ctl",
        help="send one request to a running vnvme serve --control socket (fault rules)",
        description="Send one request to the control socket of a running 'vnvme serve --control PATH' "
        "and print its reply: 'fault add SPEC' (SPEC as --fault takes it), 'fault remove ID', "
        "'fault clear', 'fault list', 'help'. Exit status 0 for an 'ok' reply, 1 for an 'error' "
        "reply, 2 if the socket cannot be reached.",
    )
    ctl.add_argument("--control", required=True, metavar="PATH", help="the server's --control socket")
    ctl.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the reply (10)")
    ctl.add_argument("words", nargs="+", metavar="REQUEST", help="e.g. fault add lba=0-7,media-error=dnr")
    trace = commands.add_parser("trace-events", help="list the declared trace events")
    trace.add_argument("pattern", nargs="?", default="*", help="only the events matching this glob (*)")
    return parser


class _Terminated(KeyboardInterrupt):
    """SIGTERM, unwinding as Ctrl-C does: every guest and server started is stopped on the way."""


def _terminate(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the unwinding short
    raise _Terminated


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "vm":
        # Its guests' QEMUs and servers are our children: SIGTERM's default (die at once) would
        # leave them running, and the run folder behind. (serve and bench handle it their way.)
        signal.signal(signal.SIGTERM, _terminate)
    try:
        return _run(args)
    except _Terminated:
        print(f"vnvme {args.command}: interrupted by SIGTERM", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:  # everything started has been unwound on the way here
        print(f"vnvme {args.command or 'demo'}: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    except BrokenPipeError:
        if not _stdout_gone():
            raise  # a pipe or socket of the command's own, not our reader: that is a failure
        return _stdout_closed()


def _run(args: argparse.Namespace) -> int:
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
        from vnvme.bench.command import EXIT_USAGE
        from vnvme.bench.command import run as run_bench_command

        try:
            return run_bench_command(args)
        except ValueError as exc:
            print(f"vnvme bench: {exc}", file=sys.stderr)
            return EXIT_USAGE
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
    if args.command == "ctl":
        from vnvme.control import request

        try:
            reply = request(args.control, " ".join(args.words), args.timeout)
        except (OSError, ValueError) as exc:
            print(f"vnvme ctl: {exc}", file=sys.stderr)
            return 2
        print(reply)
        return 0 if reply.startswith("ok") else 1
    if args.command == "trace-events":
        import fnmatch

        for name, spec in TRACE_EVENTS.items():
            if fnmatch.fnmatch(name, args.pattern):
                print(f"{name}({', '.join(spec.args)})")
        return 0
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
