"""100 controller resets and 100 client disconnect / reconnect cycles against ``vnvme serve``:
the server's open descriptors, guest-memory mappings and resident memory stay flat.

Measured from outside through /proc/PID: ``fd`` (descriptors), ``maps`` (the client's memfd
mapped by DMA_MAP shows as ``/memfd:vnvme-host``) and ``status`` (VmRSS). Every sample is taken
while a client is attached and has just had its last command completed, so the server is at
the same point of its loop each time (it finishes a disconnect before it accepts anyone).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from test_serve import Server
from vnvme.driver import NvmeDriver
from vnvme.driver.vfio_user import VfioUserTransport

CYCLES = 100
WARM_UP = 10
#: VmRSS may move by allocator noise (arenas, freelists); a per-cycle leak of one 4 KiB page,
#: one mapping or one descriptor would exceed this over 90 cycles.
RSS_TOLERANCE = 1 << 20


@dataclass(frozen=True)
class Sample:
    fds: int
    guest_mappings: int
    rss: int


def _sample(pid: int) -> Sample:
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    with open(f"/proc/{pid}/maps") as maps:
        guest = sum("/memfd:vnvme-host" in line for line in maps)
    with open(f"/proc/{pid}/status") as status:
        rss_kib = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    return Sample(fds, guest, rss_kib * 1024)


def _assert_flat(samples: list[Sample]) -> None:
    print(f"first {samples[0]}, after warm-up {samples[WARM_UP - 1]}, last {samples[-1]}")
    settled = samples[WARM_UP - 1]
    last = samples[-1]
    assert {s.fds for s in samples[WARM_UP - 1 :]} == {settled.fds}, [s.fds for s in samples]
    assert {s.guest_mappings for s in samples} == {1}, [s.guest_mappings for s in samples]
    assert last.rss - settled.rss <= RSS_TOLERANCE, (settled.rss, last.rss)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    s = Server(tmp_path, "--namespace", "ram,size=4M")
    try:
        yield s
    finally:
        s.kill()


def _connect(server: Server) -> tuple[VfioUserTransport, NvmeDriver]:
    transport = server.transport()
    driver = NvmeDriver(transport, io_queue_depth=32)
    driver.probe()
    return transport, driver


def test_100_controller_resets_leave_descriptors_mappings_and_memory_flat(server: Server) -> None:
    """Each cycle: a controller reset (CC.EN 1 -> 0; every fourth one a vfio-user DEVICE_RESET
    first), the driver's full bring-up with Doorbell Buffer Config, a verified write and read."""
    transport, driver = _connect(server)
    try:
        samples: list[Sample] = []
        for cycle in range(CYCLES):
            if cycle % 4 == 3:
                transport.client.reset()  # config space (Memory Space, Bus Master) survives it
            driver.reset_controller()
            assert driver.dbbuf_enabled
            data = bytes([cycle & 0xFF]) * 4096
            driver.write(1, cycle, data)
            assert driver.read(1, cycle, 8) == data
            samples.append(_sample(server.proc.pid))
        _assert_flat(samples)
        driver.close()
    finally:
        transport.close()
    code, out, err = server.stop()
    assert code == 0, err
    assert '"internal_errors": 0' in out


def test_100_disconnect_reconnect_cycles_leave_descriptors_mappings_and_memory_flat(server: Server) -> None:
    """Each cycle: connect, VERSION, DMA_MAP, SET_IRQS, bring-up, verified I/O, hang up (half of
    the time without a controller shutdown or any goodbye: the socket just closes)."""
    samples: list[Sample] = []
    for cycle in range(CYCLES):
        transport, driver = _connect(server)
        try:
            data = bytes([cycle & 0xFF, 0x5A]) * 2048
            driver.write(1, cycle, data)
            assert driver.read(1, cycle, 8) == data
            samples.append(_sample(server.proc.pid))
            if cycle % 2:
                driver.shutdown()
            driver.close()
        finally:
            transport.close()
    _assert_flat(samples)
    code, out, err = server.stop()
    assert code == 0, err
    assert f'"clients_served": {CYCLES}' in out
    assert '"internal_errors": 0' in out
