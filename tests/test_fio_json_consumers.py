"""vnvme's fio JSON read by fio's own consumers (issue "first hour" item 12): the fields they read
(usr_cpu, sys_cpu, ctx, latency_ns / latency_us / latency_ms, the json+ histogram "bins"), by
hand, then through ``fio_jsonplus_clat2csv`` (Debian's fio package), ``fio-plot`` (PyPI) and
against real fio's own output. .ci/run installs the three; the tests that need one skip only
when it is not installed."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from host import Rig
from vnvme.bench.engine import JobSpec, LatencyStats, run_job
from vnvme.bench.fio_json import fio_bin, latency_ranges, to_fio_json

#: What fio writes per job that vnvme does not measure (see vnvme.bench.fio_json).
NOT_MEASURED = {"iodepth_level", "iodepth_submit", "iodepth_complete"}


def test_fio_bins_by_hand() -> None:
    # exact below 128 ns; above, 64 bins per power of two, each named by its midpoint
    assert [fio_bin(v) for v in (0, 1, 127)] == [0, 1, 127]
    assert [fio_bin(v) for v in (128, 129, 130, 255, 256, 259, 260)] == [129, 129, 131, 255, 258, 258, 262]
    assert fio_bin(5795) == 5792  # a real fio run: clat max 5795 ns, its last bin "5792"
    # the last bin takes everything beyond 2**34 ns (fio_jsonplus_clat2csv's largest value)
    assert fio_bin(1 << 40) == fio_bin(17_112_760_320) == 17_112_760_320


def test_latency_ranges_by_hand() -> None:
    samples = [1, 2, 15, 999, 1000, 1999, 999_999, 1_000_000, 1_999_999_999, 2_000_000_000]
    ranges = latency_ranges(LatencyStats.from_samples(samples))
    nonzero = {name: {k: v for k, v in block.items() if v} for name, block in ranges.items()}
    assert nonzero == {
        "latency_ns": {"2": 10.0, "4": 10.0, "20": 10.0, "1000": 10.0},
        "latency_us": {"2": 20.0, "1000": 10.0},
        "latency_ms": {"2": 10.0, "2000": 10.0, ">=2000": 10.0},
    }
    assert list(ranges["latency_ms"])[-3:] == ["1000", "2000", ">=2000"]


def _one_job(report: dict[str, object]) -> Any:
    (job,) = json.loads(json.dumps(report))["jobs"]
    return job


def test_cpu_and_latency_fields_come_from_the_run(rig: Rig) -> None:
    spec = JobSpec(rw="randread", iodepth=4, number_ios=3000, nsid=2)
    result = run_job(rig.driver, spec)
    assert result.user_cpu_ns + result.system_cpu_ns > 0  # the engine's thread did the work
    job = _one_job(to_fio_json([("j", spec, result)], bins=True))
    window = result.elapsed_ns
    assert job["usr_cpu"] == pytest.approx(100 * result.user_cpu_ns / window)
    assert job["sys_cpu"] == pytest.approx(100 * result.system_cpu_ns / window)
    assert job["ctx"] == result.context_switches >= 0
    assert (job["majf"], job["minf"]) == (result.major_faults, result.minor_faults)
    shares = [v for name in ("latency_ns", "latency_us", "latency_ms") for v in job[name].values()]
    assert sum(shares) == pytest.approx(100.0)
    bins = job["read"]["clat_ns"]["bins"]
    assert sum(bins.values()) == job["read"]["total_ios"] == 3000
    assert [int(k) for k in bins] == sorted(int(k) for k in bins)
    assert all(fio_bin(int(k)) == int(k) for k in bins)
    assert "bins" not in job["write"]["clat_ns"]  # no I/O, no histogram (as fio)
    plain = _one_job(to_fio_json([("j", spec, result)]))
    assert "bins" not in plain["read"]["clat_ns"]  # json, not json+


@pytest.fixture(scope="module")
def vnvme_json(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``vnvme bench --output-format json+``: one job, as fio-plot wants one depth per file."""
    folder = tmp_path_factory.mktemp("vnvme-json")
    out = folder / "randread-iodepth-2-numjobs-1.json"
    proc = subprocess.run(
        [sys.executable, "-m", "vnvme", "bench", "--variants", "dbbuf", "--cpu", "any", "--iodepth", "2"]
        + ["--number_ios", "2000", "--output-format", "json+", "--output", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return out


def test_bench_json_carries_measured_cpu_and_context_switches(vnvme_json: Path) -> None:
    (job,) = json.loads(vnvme_json.read_text())["jobs"]
    assert job["usr_cpu"] + job["sys_cpu"] > 0
    # the client waits in poll() for the server's replies: it sleeps, voluntarily
    assert job["ctx"] > 0


def _clat2csv() -> list[str]:
    script = shutil.which("fio_jsonplus_clat2csv")
    if script is None:
        pytest.skip("fio_jsonplus_clat2csv is not installed (Debian's fio package)")
    if importlib.util.find_spec("six") is None:
        pytest.skip("fio_jsonplus_clat2csv needs the six module")
    return [sys.executable, script]


def test_fio_jsonplus_clat2csv_reads_the_histogram(vnvme_json: Path, tmp_path: Path) -> None:
    tool = _clat2csv()
    (job,) = json.loads(vnvme_json.read_text())["jobs"]
    dest = tmp_path / "lat.csv"
    done = subprocess.run([*tool, str(vnvme_json), str(dest)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    with open(tmp_path / "lat_job0.csv") as f:
        rows = [[cell.strip() for cell in row] for row in csv.reader(f)]
    header, body = rows[0], rows[1:]
    count = header.index("read_clat_ns_count")
    counts = [int(row[count]) for row in body if row[count]]
    assert sum(counts) == job["read"]["total_ios"] == 2000
    last = body[-1]
    assert int(last[count + 1]) == 2000 and float(last[count + 2]) == 1.0  # cumulative, percentile
    clat = job["read"]["clat_ns"]
    assert (int(body[0][0]), int(last[0])) == (fio_bin(clat["min"]), fio_bin(clat["max"]))
    check = subprocess.run(
        [*tool, str(vnvme_json), str(dest), "--validate"], capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0 and "lat_job0.csv validated" in check.stdout, check.stdout + check.stderr


def test_fio_plot_reads_vnvme_json(vnvme_json: Path, tmp_path: Path) -> None:
    if importlib.util.find_spec("fio_plot") is None:
        pytest.skip("fio-plot is not installed (pip install fio-plot)")
    env = dict(os.environ, MPLBACKEND="Agg")
    base = [sys.executable, "-m", "fio_plot", "-i", str(vnvme_json.parent), "-T", "vnvme", "-s", "vnvme"]
    base += ["-r", "randread", "-d", "2", "-n", "1"]
    for graph, extra in (("bars", ["-l", "--show-cpu"]), ("histogram", ["-H"])):
        png = tmp_path / f"{graph}.png"
        done = subprocess.run(
            [*base, *extra, "-o", str(png)],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
            cwd=tmp_path,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert png.stat().st_size > 0


def _fields(block: dict[str, Any]) -> set[str]:
    return set(block)


def test_every_field_fio_writes_is_there(vnvme_json: Path, tmp_path: Path) -> None:
    if shutil.which("fio") is None:
        pytest.skip("fio is not installed")
    done = subprocess.run(
        ["fio", "--name=x", "--ioengine=null", "--size=4M", "--rw=randread", "--output-format=json+"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    (fio_job,) = json.loads(done.stdout)["jobs"]
    (ours,) = json.loads(vnvme_json.read_text())["jobs"]
    assert _fields(fio_job) - _fields(ours) == NOT_MEASURED
    for direction in ("read", "write", "trim"):
        assert _fields(fio_job[direction]) <= _fields(ours[direction]), direction
    assert _fields(fio_job["read"]["clat_ns"]) <= _fields(ours["read"]["clat_ns"])
    assert _fields(fio_job["sync"]) <= _fields(ours["sync"])
    for name in ("latency_ns", "latency_us", "latency_ms"):
        assert list(fio_job[name]) == list(ours[name])
    # fio's bins are named as vnvme names them
    assert all(fio_bin(int(k)) == int(k) for k in fio_job["read"]["clat_ns"]["bins"])
