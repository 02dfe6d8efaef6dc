#!/usr/bin/env python3
"""Long fuzz campaigns: hypothesis properties (the default engine) or coverage-guided harnesses.

    python scripts/fuzz.py --examples 20000              # vfio-user messages + guest input
    python scripts/fuzz.py --examples 5000 --only vfio-user --fresh
    python scripts/fuzz.py --engine atheris --harness controller --minutes 30

``--engine atheris`` (``pip install '.[fuzz]'``) runs one harness of fuzz/ (controller,
vfio_user, dataptr, parsers) under libFuzzer for ``--minutes`` (or ``--runs`` inputs), starting
from its seeds in fuzz/corpus/NAME and the inputs earlier runs kept in .fuzz/corpus/NAME; a
crashing input is saved in .fuzz/artifacts/NAME/. It prints executions, executions per second,
CPU time and coverage (libFuzzer's ``cov``: instrumented edges of the vnvme package reached;
``ft``: features), and exits with libFuzzer's status (0: nothing found).

The properties: tests/vfio_user/test_vu_fuzz.py (raw vfio-user messages, region accesses, DMA
map / unmap against a model) and tests/test_robustness.py (random register accesses, admin and
I/O commands with PRPs anywhere, scribbled shadow doorbell / EventIdx pages). Default: the same
derandomized series CI runs, only longer; ``--fresh`` draws new random examples (hypothesis'
``dev`` profile; a failure is saved in .hypothesis/ and replayed first next time). A failing
input is shrunk and printed by pytest, and the exit status is pytest's.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SUITES = {
    "vfio-user": ["tests/vfio_user/test_vu_fuzz.py"],
    "guest": ["tests/test_robustness.py"],
}
HARNESSES = sorted(p.stem.removeprefix("harness_") for p in (ROOT / "fuzz").glob("harness_*.py"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--examples", type=int, default=20000, help="examples per property (20000)")
    parser.add_argument("--only", choices=sorted(SUITES), help="one group of properties")
    parser.add_argument("--fresh", action="store_true", help="new random examples, not CI's series")
    parser.add_argument("-k", metavar="EXPR", help="pytest -k: a subset of the properties")
    parser.add_argument("--engine", choices=["hypothesis", "atheris"], default="hypothesis")
    parser.add_argument("--harness", choices=HARNESSES, help="atheris: the harness (fuzz/harness_NAME.py)")
    parser.add_argument("--minutes", type=float, help="atheris: how long to fuzz")
    parser.add_argument("--runs", type=int, help="atheris: how many inputs to run (instead of --minutes)")
    parser.add_argument(
        "--line-coverage",
        action="store_true",
        help="atheris: instead of fuzzing, replay the harness's corpus and print the lines of each "
        "vnvme module it reached (no atheris needed)",
    )
    args = parser.parse_args(argv)
    if args.engine == "atheris" and args.line_coverage:
        if not args.harness:
            parser.error("--line-coverage needs --harness")
        return _line_coverage(args.harness)
    if args.engine == "atheris":
        return _atheris(parser, args)
    if args.harness or args.minutes is not None or args.runs is not None or args.line_coverage:
        parser.error("--harness, --minutes, --runs and --line-coverage go with --engine atheris")
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


_FINAL = re.compile(r"^#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+) corp: (\d+)/")


def _atheris(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if not args.harness:
        parser.error(f"--engine atheris needs --harness ({', '.join(HARNESSES)})")
    if (args.minutes is None) == (args.runs is None):
        parser.error("--engine atheris needs one of --minutes or --runs")
    if (args.minutes is not None and args.minutes <= 0) or (args.runs is not None and args.runs < 1):
        parser.error("--minutes and --runs must be positive")
    try:
        import atheris  # noqa: F401
    except ImportError:
        parser.error("atheris is not installed: pip install '.[fuzz]'")
    corpus = ROOT / ".fuzz" / "corpus" / args.harness
    artifacts = ROOT / ".fuzz" / "artifacts" / args.harness
    corpus.mkdir(parents=True, exist_ok=True)
    artifacts.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        str(ROOT / "fuzz" / f"harness_{args.harness}.py"),
        "-print_final_stats=1",
        "-timeout=60",  # one input taking a minute is a hang
        "-rss_limit_mb=4096",
        "-max_len=4096",
        f"-artifact_prefix={artifacts}/",
        f"-max_total_time={round(args.minutes * 60)}" if args.minutes is not None else f"-runs={args.runs}",
        str(corpus),  # new inputs go to the first directory
        str(ROOT / "fuzz" / "corpus" / args.harness),
    ]
    before = set(artifacts.iterdir())
    started = time.monotonic()
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    # libFuzzer reports on stderr: echo it and keep the last status line and the final stats.
    process = subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE, text=True, errors="replace")
    assert process.stderr is not None
    last: re.Match[str] | None = None
    stats: dict[str, str] = {}
    for line in process.stderr:
        sys.stderr.write(line)
        if match := _FINAL.match(line):
            last = match
        elif line.startswith("stat::"):
            key, _, value = line[len("stat::") :].partition(":")
            stats[key.strip()] = value.strip()
    returncode = process.wait()
    elapsed = time.monotonic() - started
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    executions = int(stats.get("number_of_executed_units", last.group(1) if last else 0))
    found = sorted(set(artifacts.iterdir()) - before)
    print(f"\nfuzz campaign: atheris, harness {args.harness}, {elapsed:.0f} s, libFuzzer exit {returncode}")
    print(f"  executions      {executions}")
    print(f"  exec/s          {executions / elapsed if elapsed else 0:.0f} (wall clock)")
    print(f"  CPU time        {cpu:.0f} s")
    if last is not None:
        print(
            f"  coverage        cov {last.group(2)} edges, ft {last.group(3)} features, corpus {last.group(4)} inputs"
        )
    print(f"  findings        {len(found)}" + "".join(f"\n    {path}" for path in found))
    return returncode


def _executable_lines(path: str) -> set[int]:
    with open(path) as f:
        code = compile(f.read(), path, "exec")
    lines: set[int] = set()
    stack = [code]
    while stack:
        co = stack.pop()
        lines.update(line for _, _, line in co.co_lines() if line is not None)
        stack.extend(c for c in co.co_consts if isinstance(c, types.CodeType))
    return lines


def _line_coverage(harness: str) -> int:
    """Replay the seeds and the kept corpus through the harness, tracing vnvme's lines."""
    package = str(ROOT / "src" / "vnvme")
    reached: dict[str, set[int]] = {}

    def local(frame: types.FrameType, event: str, arg: Any) -> Any:
        if event == "line":
            reached[frame.f_code.co_filename].add(frame.f_lineno)
        return local

    def calls(frame: types.FrameType, event: str, arg: Any) -> Any:
        filename = frame.f_code.co_filename
        if not filename.startswith(package):
            return None
        reached.setdefault(filename, set()).add(frame.f_lineno)
        return local

    sys.path.insert(0, str(ROOT / "fuzz"))
    inputs = [
        path
        for directory in (ROOT / "fuzz" / "corpus" / harness, ROOT / ".fuzz" / "corpus" / harness)
        if directory.is_dir()
        for path in sorted(directory.iterdir())
    ]
    sys.settrace(calls)  # before the import: module-level lines count as reached
    try:
        one_input = importlib.import_module(f"harness_{harness}").one_input
        for path in inputs:
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                continue  # a running campaign replaced it with a smaller one
            one_input(data)
    finally:
        sys.settrace(None)
    print(
        f"line coverage of vnvme by the {len(inputs)} inputs of fuzz/corpus/{harness} and .fuzz/corpus/{harness}:"
    )
    total_hit = total_lines = 0
    for filename in sorted(reached):
        lines = _executable_lines(filename)
        hit = len(reached[filename] & lines)
        total_hit, total_lines = total_hit + hit, total_lines + len(lines)
        name = os.path.relpath(filename, ROOT / "src")
        print(f"  {name:<40} {hit:>5} / {len(lines):<5} {100 * hit / len(lines):5.1f} %")
    print(
        f"  {'modules reached, together':<40} {total_hit:>5} / {total_lines:<5} {100 * total_hit / total_lines:5.1f} %"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
