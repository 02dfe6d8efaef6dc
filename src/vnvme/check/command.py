"""``vnvme check``: run the registered checks against a vfio-user NVMe server and report them."""

from __future__ import annotations

import argparse
import fnmatch
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass
from typing import TextIO

from vnvme.bench.command import machine_description
from vnvme.check.registry import CHECKS, Check, Fail, Outcome, Skip, Verdict, failed
from vnvme.check.target import Context, Options, Target, Unusable

MAX_EVIDENCE = 2000
NAME_WIDTH = max(len(c.name) for c in CHECKS)


@dataclass(frozen=True)
class Result:
    check: Check
    outcome: Outcome
    seconds: float

    def as_json(self) -> dict[str, object]:
        return {
            "name": self.check.name,
            "group": self.check.group,
            "section": self.check.section,
            "summary": self.check.summary,
            "verdict": self.outcome.verdict.value,
            "evidence": self.outcome.evidence,
            "seconds": round(self.seconds, 3),
        }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--socket", metavar="PATH", help="the server's UNIX socket (where --server-cmd listens, if given)"
    )
    parser.add_argument(
        "--server-cmd",
        metavar="CMD",
        help="start the server with CMD ('{socket}' is replaced by the socket path) whenever a check needs "
        "a fresh one, e.g. 'vnvme serve --socket {socket} --quiet' or "
        "'../shared/tools/qemu-vfio-user-server/run.sh {socket}'",
    )
    parser.add_argument("--json", action="store_true", help="print the results as one JSON document")
    parser.add_argument(
        "--check",
        action="append",
        default=[],
        metavar="GLOB",
        help="run only checks whose name matches (repeatable), e.g. 'dbbuf.*'",
    )
    parser.add_argument("--list", action="store_true", help="list the checks and exit")
    parser.add_argument(
        "--allow-writes",
        action="store_true",
        help="also run checks that write to the first namespace (its data is overwritten)",
    )
    parser.add_argument(
        "--timeout", type=float, default=5.0, help="seconds to wait for any reply or completion (5)"
    )
    parser.add_argument(
        "--ios", type=int, default=500, help="reads per depth in each shadow doorbell need_event check (500)"
    )


def selected(patterns: list[str]) -> list[Check]:
    if not patterns:
        return list(CHECKS)
    chosen = [c for c in CHECKS if any(fnmatch.fnmatchcase(c.name, p) for p in patterns)]
    if not chosen:
        raise ValueError(f"no check matches {', '.join(patterns)} (vnvme check --list)")
    return chosen


def run_one(check: Check, target: Target, options: Options) -> Result:
    ctx = Context(target, options)
    start = time.monotonic()
    try:
        outcome = check.function(ctx)
    except Unusable:
        raise
    except Skip as exc:
        outcome = Outcome(Verdict.SKIP, str(exc))
    except Fail as exc:
        outcome = failed(str(exc))
    except Exception as exc:  # the peer misbehaved in a way the check did not expect: its evidence
        outcome = failed(f"{type(exc).__name__}: {exc}")
    finally:
        ctx.close()
    target.after_check()
    if len(outcome.evidence) > MAX_EVIDENCE:  # the peer's words are in there: bounded
        outcome = Outcome(outcome.verdict, outcome.evidence[:MAX_EVIDENCE] + "...")
    return Result(check, outcome, time.monotonic() - start)


def run_checks(
    checks: list[Check], target: Target, options: Options, progress: TextIO | None = None
) -> list[Result]:
    results = []
    for check in checks:
        result = run_one(check, target, options)
        results.append(result)
        if progress is not None:
            print(format_result(result), file=progress, flush=True)
    return results


def format_result(result: Result) -> str:
    c = result.check
    return f"{result.outcome.verdict.value:<4}  {c.name:<{NAME_WIDTH}} [{c.section}]\n      {result.outcome.evidence}"


def summary(results: list[Result]) -> str:
    counts = Counter(r.outcome.verdict for r in results)
    return ", ".join(f"{counts[v]} {v.value}" for v in Verdict)


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = sys.stdout if out is None else out
    if args.list:
        for c in CHECKS:
            print(f"{c.name:<{NAME_WIDTH}} [{c.section}]\n      {c.summary}", file=out)
        return 0
    if args.timeout <= 0 or args.ios < 1:
        raise ValueError("--timeout and --ios must be positive")
    checks = selected(args.check)
    options = Options(timeout=args.timeout, allow_writes=args.allow_writes, ios_per_depth=args.ios)
    target = Target(args.socket, args.server_cmd)
    started = time.monotonic()
    try:
        if not args.json:
            count = f"{len(checks)} check{'s' if len(checks) != 1 else ''}"
            print(f"vnvme check: {count} against {target.describe()}", file=out, flush=True)
        results = run_checks(checks, target, options, None if args.json else out)
    except Unusable as exc:
        print(f"vnvme check: {exc}", file=sys.stderr)
        return 2
    finally:
        target.close()
    seconds = time.monotonic() - started
    if args.json:
        document = {
            "target": target.describe(),
            "machine": machine_description(),
            "servers_started": target.starts,
            "server_exits_on_hangup": target.exits_on_hangup,
            "seconds": round(seconds, 2),
            "summary": {v.value: sum(r.outcome.verdict == v for r in results) for v in Verdict},
            "checks": [r.as_json() for r in results],
        }
        json.dump(document, out, indent=2)
        out.write("\n")
    else:
        started_note = f", {target.starts} server start(s)" if target.server_cmd else ""
        print(f"summary: {summary(results)} in {seconds:.1f} s{started_note}", file=out)
    return 1 if any(r.outcome.verdict == Verdict.FAIL for r in results) else 0
