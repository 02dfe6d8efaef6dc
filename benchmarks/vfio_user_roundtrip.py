"""Cost of a trapped doorbell and IOPS over vfio-user, server and driver in separate processes.

    python benchmarks/vfio_user_roundtrip.py [--cpu same|split|any] [--ios N]

Starts ``vnvme serve`` (ram namespace), pins both processes as asked, measures the round trip of
one synchronous REGION_WRITE to a doorbell, then 4k random reads at depth 1 and 8 with shadow
doorbells off and on. A stand-in until ``vnvme bench`` (issue 4) does this properly.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

from vnvme.bench.engine import JobSpec, run_job
from vnvme.driver import NvmeDriver
from vnvme.driver.vfio_user import VfioUserTransport
from vnvme.spec import registers as regs


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cpu", choices=["same", "split", "any"], default="same")
    parser.add_argument("--ios", type=int, default=5000)
    args = parser.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    server_cpu = {"same": {cpus[0]}, "split": {cpus[-1]}, "any": set(cpus)}[args.cpu]
    client_cpu = {cpus[0]} if args.cpu != "any" else set(cpus)
    path = os.path.join(tempfile.mkdtemp(), "bench.sock")
    server = subprocess.Popen(
        [sys.executable, "-m", "vnvme", "serve", "--socket", path, "--quiet", "--namespace", "ram,size=64M"]
    )
    try:
        os.sched_setaffinity(server.pid, server_cpu)
        os.sched_setaffinity(0, client_cpu)
        while not os.path.exists(path):
            time.sleep(0.02)
        print(f"placement: server on CPUs {sorted(server_cpu)}, driver on CPUs {sorted(client_cpu)}")
        for shadow in (False, True):
            transport = VfioUserTransport(path)
            driver = NvmeDriver(transport, shadow_doorbells=shadow)
            driver.probe()
            if not shadow:
                # The admin CQ head doorbell, rewritten with its current value: a no-op write.
                db = regs.cq_head_doorbell(0, 0)
                head = driver.admin.cq_head if driver.admin else 0
                n = 5000
                start = time.perf_counter()
                for _ in range(n):
                    transport.mmio_write(db, 4, head)
                elapsed = time.perf_counter() - start
                print(f"synchronous trapped doorbell (REGION_WRITE + reply): {elapsed / n * 1e6:.1f} us")
            for depth in (1, 8):
                result = run_job(driver, JobSpec(iodepth=depth, number_ios=args.ios, iodepth_batch_submit=0))
                per_io = (result.sq_doorbells + result.cq_doorbells) / result.ios
                print(
                    f"shadow doorbells {'on ' if shadow else 'off'} depth {depth}: "
                    f"{result.iops:8.0f} IOPS, {per_io:.2f} doorbells/IO"
                )
            driver.close()
            transport.close()
    finally:
        server.terminate()
        server.wait(10)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
