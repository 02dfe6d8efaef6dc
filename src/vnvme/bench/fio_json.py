"""Engine results in the shape of ``fio --output-format=json`` (and ``json+``).

Top level: "fio version", "timestamp", "timestamp_ms", "time", "global options", "jobs" and a
"vnvme" block (whatever the caller passes as ``extra``). Each job carries "jobname", "groupid",
"error", "eta", "elapsed", "job options" (fio option names, values as strings), "read", "write",
"trim" and "sync" blocks with fio's field names, "job_runtime", "usr_cpu" / "sys_cpu" (percent
of the measured window), "ctx", "majf", "minf" (the engine thread's getrusage over the window),
"latency_ns" / "latency_us" / "latency_ms" (percent of I/Os per latency range, fio's ranges),
fio's latency-target fields at their defaults, and a per-job "vnvme" block with the doorbell
counters and verify results fio has no place for. With ``bins`` (fio's json+), "clat_ns" also
holds fio's latency histogram: "bins" maps a bin's value in ns to its count, binned as fio bins.

Units follow fio: bytes and KiB, "bw" in KiB/s, "bw_bytes" in bytes/s, "runtime" in ms,
latencies in ns. Each engine result is one fio job entry (numjobs aggregated, as fio's
group_reporting does); results run one after another, so each gets its own group. The engine
measures one latency per I/O (submit to reap): "clat_ns" and "lat_ns" both hold it and
"slat_ns" is zero. Percentiles are exact nearest-rank values rather than fio's histogram bins.
The engine takes no periodic bandwidth samples (fio's bw_avg_time / iops_avg_time windows), so
"bw_samples" and "iops_samples" are 0 with their statistics, as fio reports for a job shorter
than one window; fio's "iodepth_level" / "iodepth_submit" / "iodepth_complete" are not given.
"""

from __future__ import annotations

import bisect
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


#: fio's latency histogram (its stat.h): below 2 ** (_PLAT_BITS + 1) ns every value has a bin;
#: above, each power of two is cut into 2 ** _PLAT_BITS bins, the last bin takes what is beyond.
_PLAT_BITS = 6
_PLAT_VAL = 1 << _PLAT_BITS
_PLAT_NR = 29 * _PLAT_VAL


def fio_bin(ns: int) -> int:
    """The value fio's json+ "bins" lists the latency ``ns`` under (its bin's midpoint)."""
    if ns < 2 * _PLAT_VAL:
        return ns
    error_bits = ns.bit_length() - 1 - _PLAT_BITS  # the low bits the bin does not keep
    index = min(((error_bits + 1) << _PLAT_BITS) + ((ns >> error_bits) & (_PLAT_VAL - 1)), _PLAT_NR - 1)
    error_bits = (index >> _PLAT_BITS) - 1
    return (1 << (error_bits + _PLAT_BITS)) + int((index % _PLAT_VAL + 0.5) * (1 << error_bits))


def fio_bins(stats: LatencyStats) -> dict[str, int]:
    bins: dict[int, int] = {}
    for value, count in stats.counts:
        key = fio_bin(value)
        bins[key] = bins.get(key, 0) + count
    return {str(key): count for key, count in sorted(bins.items())}


#: fio's latency ranges: key k counts latencies from the key before it up to below k, in ns,
#: then us, then ms (from 1 us and 1 ms); ">=2000" ms takes the rest.
_RANGE_KEYS = (2, 4, 10, 20, 50, 100, 250, 500, 750, 1000)


def latency_ranges(stats: LatencyStats) -> dict[str, dict[str, float]]:
    """ "latency_ns", "latency_us" and "latency_ms": percent of the samples in each range."""
    counts = {
        "latency_ns": [0] * len(_RANGE_KEYS),
        "latency_us": [0] * len(_RANGE_KEYS),
        "latency_ms": [0] * (len(_RANGE_KEYS) + 2),
    }
    for ns, count in stats.counts:
        if ns < 1000:
            name, value = "latency_ns", ns
        elif ns < 1_000_000:
            name, value = "latency_us", ns // 1000
        else:
            name, value = "latency_ms", ns // 1_000_000
        index = bisect.bisect_right(_RANGE_KEYS, value)
        if name == "latency_ms" and value >= 1000:
            index = len(_RANGE_KEYS) if value < 2000 else len(_RANGE_KEYS) + 1
        counts[name][index] += count
    labels = [str(k) for k in _RANGE_KEYS]
    keys = {"latency_ns": labels, "latency_us": labels, "latency_ms": [*labels, "2000", ">=2000"]}
    total = stats.n or 1
    return {
        name: {key: 100.0 * c / total for key, c in zip(keys[name], counts[name], strict=True)}
        for name in counts
    }


def _latency(stats: LatencyStats, *, percentiles: bool = True, bins: bool = False) -> dict[str, object]:
    block: dict[str, object] = {
        "min": stats.min,
        "max": stats.max,
        "mean": stats.mean,
        "stddev": stats.stddev,
        "N": stats.n,
    }
    if percentiles and stats.n:
        block["percentile"] = {f"{p:f}": value for p, value in stats.percentiles}
    if bins and stats.n:
        block["bins"] = fio_bins(stats)
    return block


_ZERO_LATENCY = LatencyStats(0, 0, 0, 0.0, 0.0, ())


def _direction(stats: DirectionStats | None, elapsed_ns: int, *, bins: bool) -> dict[str, object]:
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
        "clat_ns": _latency(stats.clat, bins=bins),
        "lat_ns": _latency(stats.clat),
        # no periodic samples (see the module's docstring)
        "bw_min": 0,
        "bw_max": 0,
        "bw_agg": 0.0,
        "bw_mean": 0.0,
        "bw_dev": 0.0,
        "bw_samples": 0,
        "iops_min": 0,
        "iops_max": 0,
        "iops_mean": 0.0,
        "iops_stddev": 0.0,
        "iops_samples": 0,
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
    bins: bool = False,
) -> dict[str, object]:
    """A ``json.dumps``-able dict shaped like fio's JSON output, one job per result; with
    ``bins``, like fio's json+ (the completion latency histogram in every "clat_ns")."""
    now = time.time() if timestamp is None else timestamp
    jobs: list[dict[str, object]] = []
    for groupid, (name, spec, result) in enumerate(results):
        window = result.elapsed_ns
        jobs.append(
            {
                "jobname": name,
                "groupid": groupid,
                "error": 0,
                "eta": 0,
                "elapsed": round(result.elapsed),
                "job options": job_options(spec, name),
                "read": _direction(result.read, window, bins=bins),
                "write": _direction(result.write, window, bins=bins),
                "trim": _direction(None, window, bins=bins),
                "sync": {"total_ios": 0, "lat_ns": _latency(_ZERO_LATENCY)},
                "job_runtime": round(window / 1e6),
                "usr_cpu": 100.0 * result.user_cpu_ns / window if window else 0.0,
                "sys_cpu": 100.0 * result.system_cpu_ns / window if window else 0.0,
                "ctx": result.context_switches,
                "majf": result.major_faults,
                "minf": result.minor_faults,
                **latency_ranges(result.clat),
                # fio's latency target (latency_target=0: off) and the depth it ran at
                "latency_depth": spec.iodepth,
                "latency_target": 0,
                "latency_percentile": 100.0,
                "latency_window": 0,
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
