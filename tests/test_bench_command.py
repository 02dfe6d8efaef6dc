"""`vnvme bench` end to end, kept short: a smoke test of the command, never a timing assertion."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import cast

import pytest

from vnvme.bench.engine import JobResult
from vnvme.bench.runner import VARIANTS, BenchOptions, Point, placements, plot_figure


def _bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vnvme", "bench", *args], capture_output=True, text=True, timeout=300
    )


def test_bench_json_counts_doorbells_at_the_controller(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = _bench(
        "--number_ios",
        "200",
        "--iodepth",
        "1,2",
        "--cpu",
        "any",
        "--output-format",
        "json",
        "--output",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    jobs = {job["jobname"]: job for job in report["jobs"]}
    assert set(jobs) == {f"{v}/qd{d}/any" for v in ("no-dbbuf", "dbbuf") for d in (1, 2)}
    for job in jobs.values():
        assert job["read"]["total_ios"] == 200 and job["write"]["total_ios"] == 0
        assert job["read"]["iops"] > 0 and job["read"]["clat_ns"]["percentile"]["99.000000"] > 0
    points = {p["jobname"]: p for p in report["vnvme"]["points"]}
    # At depth 1 every command is alone: plain doorbells cost SQ + CQ, shadow doorbells only
    # the SQ (the CQ head stays in the shadow page, CQ EventIdx policy "never").
    assert points["no-dbbuf/qd1/any"]["doorbells_per_io"] == {
        "sq": 1.0,
        "cq": 1.0,
        "admin": 0.0,
        "mapped": 0.0,
    }
    shadow = points["dbbuf/qd1/any"]["doorbells_per_io"]
    assert {k: shadow[k] for k in ("cq", "admin", "mapped")} == {"cq": 0.0, "admin": 0.0, "mapped": 0.0}
    # A host on another CPU may store its next tail before the controller has published the
    # EventIdx of its rearm; then it does not ring, and the controller's re-read after the
    # fence takes the command (a lost rearm): a little under one doorbell per I/O, never more.
    assert 0.9 <= shadow["sq"] <= 1.0
    assert all(p["counted_by"] == "controller" for p in points.values())
    assert all(p["queue_ios"] == [200] for p in points.values())  # one job, its one queue
    assert points["dbbuf/qd2/any"]["doorbells_per_io"]["sq"] <= 1.0
    assert "depth   2" in proc.stderr  # progress lines


def test_bench_tables_and_variants(tmp_path: Path) -> None:
    proc = _bench(
        "--number_ios", "100", "--iodepth", "2", "--cpu", "any", "--variants", "dbbuf-poll,mappable"
    )
    assert proc.returncode == 0, proc.stderr
    assert "| IOPS, dbbuf, controller polls |" in proc.stdout
    assert "| mapped doorbell stores per IO, dbbuf, mappable doorbells |" in proc.stdout
    bad = _bench("--variants", "nonsense")
    assert bad.returncode == 2 and "unknown variant" in bad.stderr


def test_bench_repeat_interleaves_runs_and_reports_the_spread(tmp_path: Path) -> None:
    report_path = tmp_path / "bench.json"
    proc = _bench(
        "--number_ios",
        "100",
        "--iodepth",
        "1",
        "--cpu",
        "any",
        "--repeat",
        "3",
        "--json-output",
        str(report_path),
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(report_path.read_text())
    # Every run is a fio job; the rounds interleave the variants (drift moves them alike).
    names = [job["jobname"] for job in report["jobs"]]
    assert names == [f"{v}/qd1/any/r{r}" for r in (1, 2, 3) for v in ("no-dbbuf", "dbbuf")]
    iops = {job["jobname"]: job["read"]["iops"] for job in report["jobs"]}
    assert [p["repeat"] for p in report["vnvme"]["points"]] == [1, 1, 2, 2, 3, 3]
    summary = {(s["variant"], s["iodepth"]): s for s in report["vnvme"]["summary"]}
    assert set(summary) == {("no-dbbuf", 1), ("dbbuf", 1)}
    for variant in ("no-dbbuf", "dbbuf"):
        entry = summary[variant, 1]
        runs = [iops[f"{variant}/qd1/any/r{r}"] for r in (1, 2, 3)]
        assert entry["runs"] == 3 and entry["jobnames"] == [f"{variant}/qd1/any/r{r}" for r in (1, 2, 3)]
        assert entry["iops"] == {
            "median": sorted(runs)[1],
            "min": min(runs),
            "max": max(runs),
            "values": runs,
        }
    assert summary["dbbuf", 1]["doorbells_per_io"]["cq"] == 0.0  # medians of the counters too
    # The tables: the median with (min-max) across the runs.
    low, high = summary["dbbuf", 1]["iops"]["min"], summary["dbbuf", 1]["iops"]["max"]
    median = summary["dbbuf", 1]["iops"]["median"]
    assert f"| IOPS, dbbuf | {median / 1000:.1f}k ({low / 1000:.1f}k-{high / 1000:.1f}k) |" in proc.stdout
    assert f"| dbbuf | 1 | {median:.0f} ({low:.0f}-{high:.0f}) |" in proc.stdout
    assert "[any 3/3] dbbuf" in proc.stderr
    # benchmarks/results.py reads the medians from the summary.
    spec = importlib.util.spec_from_file_location(
        "results", Path(__file__).parent.parent / "benchmarks" / "results.py"
    )
    assert spec is not None and spec.loader is not None
    results = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(results)
    points = results.points(report)
    assert points["any", "dbbuf", 1]["iops"] == median
    assert points["any", "dbbuf", 1]["iops_min"] == low and points["any", "dbbuf", 1]["iops_max"] == high


def _point(variant: str, placement: str, depth: int, iops: float, repeat: int) -> Point:
    return Point(
        placement=placement,
        variant=variant,
        iodepth=depth,
        ios=100,
        seconds=1.0,
        iops=iops,
        sq_doorbells=1.0 / depth,
        cq_doorbells=0.0,
        admin_doorbells=0.0,
        mapped_doorbells=0.0,
        counted_by="controller",
        lat_p50_us=10.0,
        lat_p99_us=20.0,
        lat_p999_us=30.0,
        server_cpu_us=None,
        client_cpu_us=5.0,
        result=cast(JobResult, None),  # the plot reads none of it
        repeat=repeat,
    )


def test_plot_labels_both_axes_and_has_one_legible_legend() -> None:
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from vnvme.bench.engine import JobSpec

    options = BenchOptions(
        spec=JobSpec(number_ios=100),
        depths=[1, 2, 4],
        variants=["no-dbbuf", "dbbuf", "dbbuf-poll"],
        placements=placements(["any"]),
        repeat=2,
    )
    points = [
        _point(v, "any", d, 1000.0 * d * (i + 1) + r, r)
        for r in (1, 2)
        for i, v in enumerate(options.variants)
        for d in options.depths
    ]
    fig = plot_figure(points, options)
    try:
        panels = fig.get_axes()
        assert len(panels) == 2
        assert [ax.get_ylabel() for ax in panels] == ["IOPS", "doorbells per I/O"]
        assert all(ax.get_xlabel() == "iodepth" for ax in panels)
        # One legend for the figure naming every line of both panels, in a readable size.
        assert len(fig.legends) == 1 and not any(ax.get_legend() for ax in panels)
        texts = fig.legends[0].get_texts()
        assert [t.get_text() for t in texts] == [f"{VARIANTS[v].label} (any)" for v in options.variants]
        assert min(t.get_fontsize() for t in texts) >= 8
    finally:
        plt.close(fig)
