"""A workload engine in fio's vocabulary (jobs, rw modes, iodepth, latency percentiles, fio JSON)."""
