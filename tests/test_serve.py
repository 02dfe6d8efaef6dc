"""End to end: ``vnvme serve`` in its own process, the host driver in this one, over vfio-user."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from vnvme.bench.engine import JobSpec, run_job
from vnvme.driver import NvmeDriver
from vnvme.driver.vfio_user import VfioUserTransport
from vnvme.spec.commands import FeatureId
from vnvme.spec.registers import CSTS, Reg


class Server:
    def __init__(self, tmp: Path, *args: str) -> None:
        self.socket = str(tmp / "vnvme.sock")
        # A server killed with SIGKILL leaves its socket behind: without this, the wait below
        # would see the old file and connect while the new server is still replacing it.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vnvme", "serve", "--socket", self.socket, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 20
        while not os.path.exists(self.socket):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                out, err = self.proc.communicate(timeout=5)
                raise RuntimeError(f"server did not start: {out}{err}")
            time.sleep(0.02)

    def transport(self, **options: object) -> VfioUserTransport:
        return VfioUserTransport(self.socket, memory_size=8 << 20, **options)  # type: ignore[arg-type]

    def kill(self) -> None:
        """End the server if a test left it running (by its PID: only what we started)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate(timeout=10)

    def stop(self, sig: int | None = signal.SIGTERM) -> tuple[int, str, str]:
        """Signal the server (unless ``sig`` is None: already signalled) and collect its output."""
        if sig is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
        out, err = self.proc.communicate(timeout=20)
        return self.proc.returncode, out, err

    def serve_one_driver(self, job: Callable[[NvmeDriver], None], **transport: object) -> dict[str, Any]:
        """One client: a probed driver runs ``job`` and closes; then the server is stopped and
        its statistics returned (killed if anything failed on the way)."""
        try:
            connection = self.transport(**transport)
            try:
                driver = _driver(connection)
                job(driver)
                driver.close()
            finally:
                connection.close()
            return self.stop_for_statistics()
        finally:
            self.kill()

    def stop_for_statistics(self) -> dict[str, Any]:
        """SIGTERM; the server must exit 0 and print its statistics (JSON) as its last line."""
        code, out, err = self.stop()
        assert code == 0, err
        stats: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        return stats


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    s = Server(tmp_path, "--namespace", "ram,size=8M", "--namespace", f"file={tmp_path / 'disk.img'},size=8M")
    try:
        yield s
    finally:
        s.kill()


def _driver(transport: VfioUserTransport, **options: object) -> NvmeDriver:
    driver = NvmeDriver(transport, io_queue_depth=64, **options)  # type: ignore[arg-type]
    driver.probe()
    return driver


def _settled_driver(transport: VfioUserTransport) -> NvmeDriver:
    """A probed driver whose last admin command (the Asynchronous Event Request, rung without
    waiting) has been fetched: a synchronous command behind it completes only after it."""
    driver = _driver(transport)
    driver.get_features(FeatureId.NUMBER_OF_QUEUES)
    return driver


def test_second_process_brings_up_the_controller_and_does_verified_io(server: Server, tmp_path: Path) -> None:
    assert stat.S_IMODE(os.stat(server.socket).st_mode) == 0o600  # owner-only socket
    transport = server.transport()
    try:
        driver = _driver(transport)
        assert driver.dbbuf_enabled
        assert sorted(driver.namespaces) == [1, 2]
        for nsid in (1, 2):
            for lba in range(0, 64, 8):
                driver.write(nsid, lba, bytes([nsid, lba]) * 2048)
            for lba in range(0, 64, 8):
                assert driver.read(nsid, lba, 8) == bytes([nsid, lba]) * 2048
        result = run_job(driver, JobSpec(iodepth=8, number_ios=400, iodepth_batch_submit=0))
        assert result.ios == 400
        # Shadow doorbells work across processes: far fewer than 2 doorbells per I/O.
        assert (result.sq_doorbells + result.cq_doorbells) / result.ios <= 0.5
        driver.reset_controller()  # Doorbell Buffer Config again after the reset
        assert driver.dbbuf_enabled
        assert driver.read(1, 8, 8) == bytes([1, 8]) * 2048
        driver.shutdown()
        driver.close()
    finally:
        transport.close()
    stats = server.stop_for_statistics()
    assert stats["controller"]["dbbuf_configs"] == 2
    assert stats["messages"]["REGION_WRITE"] > 0 and stats["clients_served"] == 1


def test_reconnect_second_client_refused_and_posted_writes(server: Server) -> None:
    first = server.transport()
    try:
        driver = _driver(first)
        driver.write(1, 0, b"\x42" * 512)
        # A second client while one is attached: accepted and closed at once.
        intruder = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        intruder.settimeout(5)
        intruder.connect(server.socket)
        assert intruder.recv(16) == b""
        intruder.close()
        assert driver.read(1, 0, 1) == b"\x42" * 512
        driver.close()
    finally:
        first.close()
    # The client went away: the device was reset as on a bus reset; a new one starts afresh.
    second = server.transport(posted_writes=True)
    try:
        driver = _driver(second)
        assert driver.read(1, 0, 1) == b"\x42" * 512  # ram namespace content survives
        run_job(driver, JobSpec(iodepth=4, number_ios=200, iodepth_batch_submit=0))
        driver.close()
    finally:
        second.close()
    stats = server.stop_for_statistics()
    assert stats["clients_served"] == 2
    assert stats["message_errors"] == {"second_client": 1}


def test_unmapping_memory_under_live_queues_is_fatal_once_used(server: Server) -> None:
    transport = server.transport()
    try:
        driver = _settled_driver(transport)
        memory = transport.memory
        transport.client.dma_unmap(memory.base, memory.size)
        # Not fatal yet: a client may be remapping in several steps. Using a queue is.
        assert not CSTS.CFS.get(driver.read_reg(Reg.CSTS))
        qp = driver.queue(1)
        transport.mmio_write(qp.sq_db, 4, 1)  # a doorbell of I/O SQ 1: the queue is used
        assert CSTS.CFS.get(driver.read_reg(Reg.CSTS))
        transport.client.dma_map(memory.base, memory.size, memory.fd)
        driver.reset_controller()
        driver.write(1, 3, b"\x07" * 512)
        assert driver.read(1, 3, 1) == b"\x07" * 512
        driver.close()
    finally:
        transport.close()
    code, _, err = server.stop()
    assert code == 0, err


def test_memory_taken_away_and_given_back_between_accesses_is_not_fatal(server: Server) -> None:
    """QEMU remaps guest memory in several DMA_UNMAP / DMA_MAP messages whenever the guest's
    memory layout changes (SeaBIOS does it while a controller it set up is live)."""
    transport = server.transport()
    try:
        driver = _settled_driver(transport)
        driver.write(1, 5, b"\x11" * 512)
        memory = transport.memory
        half = memory.size // 2
        transport.client.dma_unmap(memory.base, memory.size)
        transport.client.dma_map(memory.base, half, memory.fd)  # part of it back...
        transport.client.dma_map(memory.base + half, memory.size - half, memory.fd, offset=half)
        assert not CSTS.CFS.get(driver.read_reg(Reg.CSTS))
        for lba in range(8):  # ...all of it: queues, shadow doorbells and data work on
            driver.write(1, lba, bytes([lba + 1]) * 512)
            assert driver.read(1, lba, 1) == bytes([lba + 1]) * 512
        assert not CSTS.CFS.get(driver.read_reg(Reg.CSTS))
        driver.close()
    finally:
        transport.close()
    stats = server.stop_for_statistics()
    assert stats["controller"]["internal_errors"] == 0


def test_sigusr1_statistics_and_sigterm_keeps_completed_writes(server: Server, tmp_path: Path) -> None:
    transport = server.transport()
    try:
        driver = _driver(transport)
        for lba in range(32):
            driver.write(2, lba, bytes([lba + 1]) * 512)  # completed writes on the file namespace
        server.proc.send_signal(signal.SIGUSR1)
        # Writes keep flowing while SIGTERM arrives; only completed ones are promised.
        server.proc.send_signal(signal.SIGTERM)
        try:
            for lba in range(32, 64):
                driver.write(2, lba, b"\xee" * 512)
        except Exception:  # noqa: BLE001 - the server is going away under us
            pass
        driver.close()
    finally:
        transport.close()
    code, out, err = server.stop(None)  # SIGTERM was sent above
    assert code == 0, err
    # Both reports, SIGUSR1's then the exit's, on stdout (vnvme serve --help says so); none on stderr.
    reports = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert len(reports) == 2 and reports[0]["controller"]["dbbuf_configs"] == 1
    assert "dbbuf_configs" not in err
    disk = (tmp_path / "disk.img").read_bytes()
    for lba in range(32):
        assert disk[lba * 512 : (lba + 1) * 512] == bytes([lba + 1]) * 512
    assert not os.path.exists(server.socket)


def test_mappable_doorbells_cost_no_messages(tmp_path: Path) -> None:
    s = Server(tmp_path, "--mappable-doorbells", "--namespace", "ram,size=8M", "--poll-passes", "200")
    try:
        transport = s.transport(mapped_doorbells=True)
        try:
            driver = _driver(transport)
            driver.write(1, 0, b"\x99" * 4096)
            assert driver.read(1, 0, 8) == b"\x99" * 4096
            requests = transport.client.stats.requests
            result = run_job(driver, JobSpec(iodepth=4, number_ios=300, iodepth_batch_submit=0))
            # Doorbells are stores into the shared page: not one message per I/O.
            assert transport.client.stats.requests == requests
            assert transport.mapped_doorbell_writes > 0 and result.ios == 300
            driver.reset_controller()  # the page starts from zero after the reset
            assert driver.read(1, 0, 8) == b"\x99" * 4096
            driver.close()
        finally:
            transport.close()
        stats = s.stop_for_statistics()
        assert stats["controller"]["mapped_doorbell_updates"] > 0
        assert stats["controller"]["doorbell_sq_io"] == 0  # nothing trapped
    finally:
        s.kill()


def test_polling_controller_from_a_toml_file_with_a_trace_file(tmp_path: Path) -> None:
    config = tmp_path / "vnvme.toml"
    # A whole CPU of polling budget and passes enough never to sleep during the job: a server
    # that sleeps (its budget spent, or its idle passes up while a loaded machine delays the
    # host) asks the host to ring.
    config.write_text('namespace = ["ram,size=8M"]\npoll = true\npoll_passes = 1000000\npoll_budget = 1.0\n')
    trace = tmp_path / "trace.jsonl"
    s = Server(
        tmp_path, "--config", str(config), "--trace", "pci_nvme_dbbuf_config", "--trace-file", str(trace)
    )
    try:
        transport = s.transport()
        try:
            driver = _driver(transport)
            result = run_job(driver, JobSpec(iodepth=2, number_ios=300, iodepth_batch_submit=0))
            # The controller polls the shadow tails: the host rings (next to) nothing.
            assert result.sq_doorbells + result.cq_doorbells <= 2
            driver.close()
        finally:
            transport.close()
        code, _, err = s.stop()
        assert code == 0, err
        records = [json.loads(line) for line in trace.read_text().splitlines()]
        assert [r["event"] for r in records] == ["pci_nvme_dbbuf_config"]
        assert records[0]["dbs_addr"] % 4096 == 0
    finally:
        s.kill()


def test_serve_refuses_bad_options(tmp_path: Path) -> None:
    created = tmp_path / "new.img"
    for args in (
        ["--namespace", "tape,size=1G"],
        ["--trace", "pci_nvme_nothing_like_this"],
        ["--handshake-timeout", "-1"],
        ["--poll", "--poll-max", "-1"],
        # Refused before the namespace's file is created.
        ["--namespace", f"file={created},size=1M", "--message-timeout", "nan"],
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "vnvme", "serve", "--socket", str(tmp_path / "x.sock"), *args],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert proc.returncode == 2
        assert proc.stderr.startswith("vnvme serve: ") and "Traceback" not in proc.stderr
        assert not (tmp_path / "x.sock").exists()
        assert not created.exists()
    help_text = subprocess.run(
        [sys.executable, "-m", "vnvme", "serve", "--help"], capture_output=True, text=True, timeout=30
    ).stdout
    options = (
        "--mappable-doorbells",
        "--cq-eventidx",
        "--poll",
        "--trace-file",
        "--namespace",
        "--message-timeout",
    )
    for option in (*options, "--handshake-timeout"):
        assert option in help_text


def test_memory_without_a_file_descriptor_is_reached_by_dma_messages(server: Server) -> None:
    """QEMU without share=on: DMA_MAP carries no fd; the device uses DMA_READ / DMA_WRITE."""
    transport = server.transport(share_memory=False)
    try:
        driver = _driver(transport)  # admin and I/O queues, shadow pages: all in message memory
        assert driver.dbbuf_enabled
        driver.write(1, 40, bytes(range(256)) * 16)
        assert driver.read(1, 40, 8) == bytes(range(256)) * 16
        run_job(driver, JobSpec(iodepth=4, number_ios=100, iodepth_batch_submit=0))
        assert transport.client.dma_requests_served > 100
        driver.reset_controller()
        assert driver.read(1, 40, 8) == bytes(range(256)) * 16
        driver.close()
    finally:
        transport.close()
    stats = server.stop_for_statistics()
    assert stats["controller"]["internal_errors"] == 0


def test_transport_trace_events(tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    s = Server(tmp_path, "--namespace", "ram,size=8M", "--trace", "vfio_user_*", "--trace-file", str(trace))
    try:
        transport = s.transport()
        try:
            with pytest.raises(OSError):
                transport.client.region_read(9, 0, 4)  # no such region: refused, traced
            driver = _driver(transport)
            driver.close()
        finally:
            transport.close()
        code, _, err = s.stop()
        assert code == 0, err
    finally:
        s.kill()
    records = [json.loads(line) for line in trace.read_text().splitlines()]
    names = [r["event"] for r in records]
    for expected in ("vfio_user_connect", "vfio_user_version", "vfio_user_set_irqs", "vfio_user_dma_map"):
        assert expected in names
    assert names[-2:] == ["vfio_user_disconnect", "vfio_user_dma_unmap"]
    refused = [r for r in records if r["event"] == "vfio_user_err_message"]
    assert len(refused) == 1 and refused[0]["command"] == "REGION_READ" and refused[0]["errno"] == 22
    assert not any(n.startswith("pci_nvme_") for n in names)
