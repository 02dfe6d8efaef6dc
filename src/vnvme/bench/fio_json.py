"""Engine results in the shape of ``fio --output-format=json``.

Top level: "fio version", "timestamp", "timestamp_ms", "time", "global options", "jobs" and a
"vnvme" block (whatever the caller passes as ``extra``). Each job carries "jobname", "groupid",
"error", "eta", "elapsed", "job options" (fio option names, values as strings), "read", "write"
and "trim" blocks with fio's field names, "job_runtime", and a per-job "vnvme" block with the
doorbell counters and verify results fio has no place for.

Units follow fio: bytes and KiB, "bw" in KiB/s, "bw_bytes" in bytes/s, "runtime" in ms,
latencies in ns. Each engine result is one fio job entry (numjobs aggregated, as fio's
group_reporting does); results run one after another, so each gets its own group. The engine
measures one latency per I/O (submit to reap): "clat_ns" and "lat_ns" both hold it and
"slat_ns" is zero. Percentiles are exact nearest-rank values rather than fio's histogram bins.
"""

from __future__ import annotations

import time

import vnvme
from vnvme.bench.engine import DirectionStats, JobResult, JobSpec, LatencyStats


def _duration(seconds: float) -> str:
    """A time option as fio accepts it: seconds when whole, else ms or us."""
    if float(seconds).is_integer():
        return str(int(seconds))
    ms = seconds * 1000
    if abs(ms - round(ms)) < 1e-9:
        return f"{round(ms)}ms"
    return f"{round(seconds * 1e6)}us"


def job_options(spec: JobSpec, name: str) -> dict[str, str]:
    """The job's options under fio's names, as fio lists them (strings)."""
    options = {
        "name": name,
        "rw": spec.rw,
        "bs": str(spec.bs),
        "iodepth": str(spec.iodepth),
        "numjobs": str(spec.numjobs),
        "rwmixread": str(spec.rwmixread),
        "offset": str(spec.offset),
        "ramp_time": _duration(spec.ramp_time),
        "verify": spec.verify or "0",
        "randseed": str(spec.seed),
    }
    if spec.size is not None:
        options["size"] = str(spec.size)
    if spec.runtime is not None:
        options["runtime"] = _duration(spec.runtime)
        options["time_based"] = "1"
    if spec.number_ios is not None:
        options["number_ios"] = str(spec.number_ios)
    return options


def _latency(stats: LatencyStats, *, percentiles: bool = True) -> dict[str, object]:
    block: dict[str, object] = {
        "min": stats.min,
        "max": stats.max,
        "mean": stats.mean,
        "stddev": stats.stddev,
        "N": stats.n,
    }
    if percentiles and stats.n:
        block["percentile"] = {f"{p:f}": value for p, value in stats.percentiles}
    return block


_ZERO_LATENCY = LatencyStats(0, 0, 0, 0.0, 0.0, ())


def _direction(stats: DirectionStats | None, elapsed_ns: int) -> dict[str, object]:
    if stats is None or stats.ios == 0:
        stats = DirectionStats(0, 0, 0.0, 0.0, _ZERO_LATENCY)
        runtime_ms = 0
    else:
        runtime_ms = round(elapsed_ns / 1e6)
    bw_bytes = round(stats.bw_bytes)
    return {
        "io_bytes": stats.bytes,
        "io_kbytes": stats.bytes // 1024,
        "bw_bytes": bw_bytes,
        "bw": bw_bytes // 1024,
        "iops": stats.iops,
        "runtime": runtime_ms,
        "total_ios": stats.ios,
        "short_ios": 0,
        "drop_ios": 0,
        "slat_ns": _latency(_ZERO_LATENCY),
        "clat_ns": _latency(stats.clat),
        "lat_ns": _latency(stats.clat),
    }


def _vnvme_job(result: JobResult) -> dict[str, object]:
    return {
        "elapsed_ns": result.elapsed_ns,
        "offset": result.offset,
        "size": result.size,
        "ramp_ios": result.ramp_ios,
        "sq_doorbell_mmio": result.sq_doorbell_mmio,
        "cq_doorbell_mmio": result.cq_doorbell_mmio,
        "doorbells_skipped": result.doorbells_skipped,
        "interrupts": result.interrupts,
        "sq_doorbells_per_io": result.sq_doorbells_per_io,
        "cq_doorbells_per_io": result.cq_doorbells_per_io,
        "doorbells_per_io": result.doorbells_per_io,
        "verify_errors": result.verify_errors,
        "verify_reads": result.verify_reads,
    }


def to_fio_json(
    results: list[tuple[str, JobSpec, JobResult]],
    *,
    extra: dict[str, object] | None = None,
    timestamp: float | None = None,
) -> dict[str, object]:
    """A ``json.dumps``-able dict shaped like fio's JSON output, one job per result."""
    now = time.time() if timestamp is None else timestamp
    jobs: list[dict[str, object]] = []
    for groupid, (name, spec, result) in enumerate(results):
        jobs.append(
            {
                "jobname": name,
                "groupid": groupid,
                "error": 0,
                "eta": 0,
                "elapsed": round(result.elapsed),
                "job options": job_options(spec, name),
                "read": _direction(result.read, result.elapsed_ns),
                "write": _direction(result.write, result.elapsed_ns),
                "trim": _direction(None, result.elapsed_ns),
                "job_runtime": round(result.elapsed_ns / 1e6),
                "vnvme": _vnvme_job(result),
            }
        )
    return {
        "fio version": f"vnvme-{vnvme.__version__}",
        "timestamp": int(now),
        "timestamp_ms": int(now * 1000),
        "time": time.ctime(now),
        "global options": {"ioengine": "vnvme"},
        "jobs": jobs,
        "vnvme": dict(extra) if extra is not None else {},
    }
