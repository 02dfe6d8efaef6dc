#!/usr/bin/env python3
"""Long fuzz campaigns: every fuzz property runs N examples; prints the inputs each executed.

    python scripts/fuzz.py --examples 20000              # vfio-user messages + guest input
    python scripts/fuzz.py --examples 5000 --only vfio-user --fresh

The properties: tests/vfio_user/test_vu_fuzz.py (raw vfio-user messages, region accesses, DMA
map / unmap against a model) and tests/test_robustness.py (random register accesses, admin and
I/O commands with PRPs anywhere, scribbled shadow doorbell / EventIdx pages). Default: the same
derandomized series CI runs, only longer; ``--fresh`` draws new random examples (hypothesis'
``dev`` profile; a failure is saved in .hypothesis/ and replayed first next time). A failing
input is shrunk and printed by pytest, and the exit status is pytest's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUITES = {
    "vfio-user": ["tests/vfio_user/test_vu_fuzz.py"],
    "guest": ["tests/test_robustness.py"],
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--examples", type=int, default=20000, help="examples per property (20000)")
    parser.add_argument("--only", choices=sorted(SUITES), help="one group of properties")
    parser.add_argument("--fresh", action="store_true", help="new random examples, not CI's series")
    parser.add_argument("-k", metavar="EXPR", help="pytest -k: a subset of the properties")
    args = parser.parse_args(argv)
    if args.examples < 1:
        parser.error("--examples must be at least 1")
    files = SUITES[args.only] if args.only else [f for group in SUITES.values() for f in group]
    with tempfile.TemporaryDirectory() as tmp:
        counts_file = os.path.join(tmp, "counts.json")
        env = dict(os.environ)
        env["VNVME_FUZZ_EXAMPLES"] = str(args.examples)
        env["VNVME_FUZZ_COUNTS"] = counts_file
        env["HYPOTHESIS_PROFILE"] = "dev" if args.fresh else "ci"
        src = str(ROOT / "src")
        env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        command = [sys.executable, "-m", "pytest", "-q", *files]
        if args.k:
            command += ["-k", args.k]
        # Only the fuzz properties: the other tests of these modules are examples, not fuzzing.
        else:
            command += ["-k", "random or region_accesses or interleaving or scribbled"]
        started = time.monotonic()
        result = subprocess.run(command, cwd=ROOT, env=env, check=False)
        elapsed = time.monotonic() - started
        try:
            with open(counts_file) as f:
                counts: dict[str, int] = json.load(f)
        except FileNotFoundError:
            counts = {}
    print(
        f"\nfuzz campaign: {args.examples} examples per property, "
        f"{'fresh random' if args.fresh else 'derandomized (CI series)'}, {elapsed:.0f} s, "
        f"pytest exit {result.returncode}"
    )
    width = max((len(name) for name in counts), default=10)
    for name, count in sorted(counts.items()):
        print(f"  {name:<{width}}  {count:>9} inputs executed")
    print(f"  {'total':<{width}}  {sum(counts.values()):>9} inputs executed")
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
