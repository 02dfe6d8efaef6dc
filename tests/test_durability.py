"""Acknowledged data survives the server: ``vnvme serve`` killed with SIGKILL, started again on
the same file, reads back every write the host saw completed after a Flush, as a FUA write, or
with the volatile write cache turned off.

SIGKILL ends the process, not the machine: the kernel's page cache survives it. What these tests
prove end to end is that a completion is only posted once the data has left the process (no
user-space cache, nothing acknowledged early). That Flush calls fdatasync and that FUA writes and
writes without the write cache use RWF_DSYNC is checked at the system-call level in
test_backends.py (test_flush_calls_fdatasync, test_fua_writes_reach_stable_storage,
test_write_cache_feature_controls_syncing_on_a_file).
"""

from __future__ import annotations

import hashlib
import signal
from pathlib import Path

import pytest

from test_serve import Server
from vnvme.driver import NvmeDriver, NvmeError
from vnvme.driver.vfio_user import VfioUserTransport
from vnvme.spec.commands import FeatureId
from vnvme.spec.status import Status

_LBAS = range(0, 512, 8)  # 64 writes of 4 KiB (8 x 512-byte LBAs) over a 8 MiB file


def _pattern(lba: int, generation: int) -> bytes:
    """4 KiB that name their LBA and generation: a misplaced or stale block cannot match."""
    seed = hashlib.sha256(f"{generation}:{lba}".encode()).digest()
    return (seed * 128)[:4096]


def _driver(transport: VfioUserTransport) -> NvmeDriver:
    driver = NvmeDriver(transport, io_queue_depth=64)
    driver.probe()
    return driver


def _kill(server: Server, driver: NvmeDriver, transport: VfioUserTransport) -> None:
    server.proc.send_signal(signal.SIGKILL)
    code, _, _ = server.stop(None)
    assert code == -signal.SIGKILL
    driver.close()  # host-side memory only: no message goes out
    transport.close()


@pytest.mark.parametrize("how", ["flush", "fua", "write-cache-off"])
def test_acknowledged_writes_survive_sigkill_of_the_server(tmp_path: Path, how: str) -> None:
    disk = tmp_path / "disk.img"
    spec = f"file={disk},size=8M"
    first = Server(tmp_path, "--namespace", spec, "--quiet")
    try:
        transport = first.transport()
        driver = _driver(transport)
        assert driver.controller_info["vwc"] & 1  # a file: writes sit in the page cache
        if how == "write-cache-off":
            driver.set_features(FeatureId.VOLATILE_WRITE_CACHE, 0)
            assert driver.get_features(FeatureId.VOLATILE_WRITE_CACHE) == 0
        for generation in (1, 2):  # overwrite once: the second generation must win
            for lba in _LBAS:
                driver.write(1, lba, _pattern(lba, generation), fua=how == "fua")
        if how == "flush":
            driver.flush(1)
        # No shutdown, no close: the server dies right after the last completion it posted.
        _kill(first, driver, transport)
    finally:
        first.kill()
    second = Server(tmp_path, "--namespace", spec, "--quiet")
    try:
        transport = second.transport()
        try:
            driver = _driver(transport)
            for lba in _LBAS:
                assert driver.read(1, lba, 8) == _pattern(lba, 2), f"LBA {lba}"
            driver.close()
        finally:
            transport.close()
        code, _, err = second.stop()
        assert code == 0, err
    finally:
        second.kill()
    data = disk.read_bytes()
    for lba in _LBAS:
        assert data[lba * 512 : lba * 512 + 4096] == _pattern(lba, 2)


@pytest.mark.parametrize(
    ("namespaces", "cache"),
    [(["file={disk},size=1M"], True), (["ram,size=1M"], False), (["null,size=1M"], False)],
)
def test_volatile_write_cache_feature_reflects_the_backend(
    tmp_path: Path, namespaces: list[str], cache: bool
) -> None:
    """Identify Controller VWC bit 0 (§5.15.2) says whether a volatile write cache is present:
    a file backend completes writes into the page cache (present, enabled at reset, Get
    Features 06h = 1, switchable off); ram and null namespaces have no cache in front of their
    medium (absent: Get Features 06h = 0, and Set Features 06h is Invalid Field, §5.21.1.6)."""
    args = [a for spec in namespaces for a in ("--namespace", spec.format(disk=tmp_path / "d.img"))]
    s = Server(tmp_path, *args, "--quiet")
    try:
        transport = s.transport()
        try:
            driver = _driver(transport)
            assert bool(driver.controller_info["vwc"] & 1) == cache
            assert driver.get_features(FeatureId.VOLATILE_WRITE_CACHE) == int(cache)
            if cache:
                driver.set_features(FeatureId.VOLATILE_WRITE_CACHE, 0)
                assert driver.get_features(FeatureId.VOLATILE_WRITE_CACHE) == 0
                driver.set_features(FeatureId.VOLATILE_WRITE_CACHE, 1)
                assert driver.get_features(FeatureId.VOLATILE_WRITE_CACHE) == 1
            else:
                with pytest.raises(NvmeError) as failure:
                    driver.set_features(FeatureId.VOLATILE_WRITE_CACHE, 1)
                assert failure.value.status & 0xFF == Status.INVALID_FIELD
            driver.close()
        finally:
            transport.close()
        code, _, err = s.stop()
        assert code == 0, err
    finally:
        s.kill()
