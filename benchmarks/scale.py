"""Many queues on one controller, many servers at once (RELIABILITY.md, "Many queues and servers").

    PYTHONPATH=src python benchmarks/scale.py queues --transport both --queues 64 --iodepth 32 --runtime 5
    PYTHONPATH=src python benchmarks/scale.py queues --transport vfio-user --vectors 9 --runtime 5
    PYTHONPATH=src python benchmarks/scale.py queues --transport vfio-user --serve-arg=--poll --runtime 5
    PYTHONPATH=src python benchmarks/scale.py servers --servers 4 --runtime 10

``queues``: one job per I/O queue (the workload engine of ``vnvme bench``), all against one
controller; per queue the commands completed in the window and the IOPS, then min / max and
the total. ``--vectors``: fewer MSI-X vectors than queues (they share them). Exit status 1 if a
command failed or a verify check did not hold.

``servers``: N ``vnvme serve`` processes, N clients at once, one per server, each with its own
file namespace and its own pattern; per server the client's I/Os and checks, the blocks in its
file that are not its client's, and the server's descriptors and memory over the run. Exit
status 1 on any mismatch, foreign block, or descriptor left behind.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

from vnvme.bench import scale
from vnvme.controller.namespace import parse_size


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    q = sub.add_parser("queues", help="many I/O queues against one controller")
    q.add_argument("--transport", choices=["in-process", "vfio-user", "both"], default="both")
    q.add_argument("--queues", type=int, default=scale.QUEUES)
    q.add_argument("--iodepth", type=int, default=scale.IODEPTH)
    q.add_argument("--runtime", type=float, help="seconds of measured I/O (instead of --number_ios)")
    q.add_argument("--number_ios", type=int, default=200, help="I/Os per queue (200)")
    q.add_argument("--rw", default="randread")
    q.add_argument("--bs", type=parse_size, default=4096)
    q.add_argument("--verify", choices=["crc32c"])
    q.add_argument("--namespace", default="null,size=1G")
    q.add_argument("--vectors", type=int, help="MSI-X vectors the host takes (default: all offered)")
    q.add_argument(
        "--serve-arg", action="append", default=[], help="pass to vnvme serve, repeatable: --serve-arg=--poll"
    )
    s = sub.add_parser("servers", help="many vnvme serve processes, one client each, at once")
    s.add_argument("--servers", type=int, default=4)
    s.add_argument("--runtime", type=float, help="seconds of each client's job (instead of --number_ios)")
    s.add_argument("--number_ios", type=int, default=300, help="I/Os of each client's job (300)")
    s.add_argument("--iodepth", type=int, default=8)
    s.add_argument("--size", type=parse_size, default=16 << 20, help="bytes of each file namespace (16M)")
    args = parser.parse_args(argv)
    print(f"commit {_commit()}")
    failed = False
    try:
        if args.what == "queues":
            spec = scale.queue_spec(
                args.queues,
                args.iodepth,
                runtime=args.runtime,
                number_ios=None if args.runtime else args.number_ios,
                rw=args.rw,
                bs=args.bs,
                verify=args.verify,
            )
            transports = ["in-process", "vfio-user"] if args.transport == "both" else [args.transport]
            for name in transports:
                if name == "in-process":
                    run = scale.run_queues_in_process(spec, namespace=args.namespace, vectors=args.vectors)
                else:
                    run = scale.run_queues_vfio_user(
                        spec, namespace=args.namespace, vectors=args.vectors, serve_args=args.serve_arg
                    )
                scale.format_queue_run(run, sys.stdout)
                failed |= run.result.verify_errors > 0
        else:
            spec_s = scale.ServersSpec(
                servers=args.servers,
                size=args.size,
                iodepth=args.iodepth,
                number_ios=None if args.runtime else args.number_ios,
                runtime=args.runtime,
            )
            runs = scale.run_servers(spec_s)
            scale.format_server_runs(runs, sys.stdout)
            failed = any(not scale.server_run_ok(run) for run in runs)
    except (RuntimeError, ValueError, OSError) as exc:
        print(f"scale: {exc}", file=sys.stderr)
        return 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
