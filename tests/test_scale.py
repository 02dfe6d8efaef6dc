"""Many queues and servers, the short forms (benchmarks/scale.py runs the long ones): 64 I/O
queues of depth 32 on one controller in-process and over vfio-user, fewer MSI-X vectors than
queues, and 4 ``vnvme serve`` processes with 4 clients at once."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from host import make_rig
from vnvme.bench import scale
from vnvme.bench.engine import JobSpec, run_job
from vnvme.controller.config import ControllerConfig
from vnvme.controller.controller import Controller
from vnvme.controller.namespace import Namespace, NullBackend, RamBackend
from vnvme.driver import HostMemory, InProcessTransport, NvmeDriver
from vnvme.memory import GuestMemory


def test_fewer_vectors_than_queues_the_queues_share_them() -> None:
    """4 MSI-X vectors, 9 I/O queues: the CQs take vectors 1-3 in turn (0 is the admin queue's)
    and every queue completes I/O by its interrupt."""
    r = make_rig(
        namespaces=[Namespace(1, RamBackend(1 << 20), 512)],
        config=ControllerConfig(interrupt_vectors=4),
        io_queues=9,
        io_queue_depth=8,
        trace=(),
    )
    try:
        assert [qp.vector for qp in r.driver.io] == [1, 2, 3] * 3
        for qp in r.driver.io:
            r.driver.write(1, qp.qid, bytes([qp.qid]) * 512, qid=qp.qid)
        for qp in r.driver.io:
            assert r.driver.read(1, qp.qid, 1, qid=(qp.qid % 9) + 1) == bytes([qp.qid]) * 512
        assert set(r.transport.fired) <= {0, 1, 2, 3}
    finally:
        r.close()
    one = make_rig(config=ControllerConfig(interrupt_vectors=1), io_queues=3, io_queue_depth=8, trace=())
    try:
        assert [qp.vector for qp in one.driver.io] == [0, 0, 0]  # one vector: everyone's
        assert one.driver.read(1, 0, 1, qid=3) == bytes(512)
    finally:
        one.close()


class _BehindTransport(InProcessTransport):
    """A device behind its host, as one in another process can be: it runs only while the host
    waits, ``budget`` commands at a time, taking the SQs in the order they were rung."""

    budget = 0

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        self._handle(self.controller.mmio_write(offset, size, value))

    def device_idle(self) -> None:
        self._handle(self.controller.process(self.clock(), budget=self.budget))


@pytest.mark.parametrize("budget", [10, 25, 50])
def test_engine_rounds_starve_no_queue_of_a_device_behind_the_host(budget: int) -> None:
    """8 jobs for 0.05 s of a clock that ticks 1 us per reading: every queue completes at least
    90% of the mean. With the same job always rung last in a round, its completions came after
    that round's reap had passed it and it ran 20-35% below the mean (vfio-user, 64 queues:
    the last two got 2,048 and 2,496 commands to the others' 3,936)."""
    controller = Controller(GuestMemory(), [Namespace(1, NullBackend(1 << 30), 4096)])
    memory = HostMemory(16 << 20)
    transport = _BehindTransport.attach(controller, memory)
    assert isinstance(transport, _BehindTransport)
    transport.budget = budget
    driver = NvmeDriver(transport, io_queues=8, io_queue_depth=9, shadow_doorbells=False)
    try:
        driver.probe()
        ticks = itertools.count(0, 1000)
        result = run_job(driver, JobSpec(iodepth=8, numjobs=8, runtime=0.05), clock=lambda: next(ticks))
        mean = result.ios / 8
        assert sum(result.job_ios) == result.ios
        assert min(result.job_ios) >= 0.9 * mean, result.job_ios
    finally:
        driver.close()
        transport.close()
        memory.close()
        controller.close()


def test_64_queues_at_depth_32_in_process_every_command_completes() -> None:
    """Number of Queues grants 64, every queue keeps 32 verified reads and writes in flight."""
    spec = scale.queue_spec(number_ios=64, rw="randrw", bs=512, verify="crc32c")  # a cheap CRC
    run = scale.run_queues_in_process(spec, namespace="ram,size=4M")
    assert run.queues == 64 and run.queue_vectors == tuple(range(1, 65))
    assert run.job_ios == (64,) * 64 and run.result.ios == 64 * 64
    assert run.result.verify_errors == 0 and run.result.verify_reads > 0
    assert run.fetched is not None and min(run.fetched) >= 64


def test_64_queues_over_vfio_user_with_8_vectors() -> None:
    """The same over a socket, the client taking 8 of the 65 vectors the function offers."""
    run = scale.run_queues_vfio_user(scale.queue_spec(number_ios=16), vectors=8)
    assert run.vectors == 8
    assert run.queue_vectors == tuple(1 + (qid - 1) % 7 for qid in range(1, 65))
    assert run.job_ios == (16,) * 64


def test_foreign_blocks_finds_another_clients_tags(tmp_path: Path) -> None:
    spec = scale.ServersSpec(tag_bytes=4 * 4096)
    image = tmp_path / "disk.img"
    blocks = [scale.tag_block(2, b, 4096) for b in range(4)]
    image.write_bytes(b"".join(blocks))
    assert scale._foreign_blocks(str(image), 2, spec) == 0
    blocks[3] = scale.tag_block(1, 3, 4096)  # client 1's block 3 in client 2's file
    image.write_bytes(b"".join(blocks))
    assert scale._foreign_blocks(str(image), 2, spec) == 1


def test_four_servers_four_clients_at_once(tmp_path: Path) -> None:
    """Each client its own server and file: all complete, no block reaches another server, and
    each server's descriptors are the same at the end of the I/O as at its start, and back to
    the idle count once its client has left."""
    spec = scale.ServersSpec(servers=4, size=4 << 20, tag_bytes=256 << 10, number_ios=200)
    runs = scale.run_servers(spec, str(tmp_path))
    assert len(runs) == 4
    for run in runs:
        assert run.client["job_ios"] == 200
        assert run.client["verify_errors"] == 0 and run.client["verify_reads"] > 0
        assert run.client["tag_mismatches"] == 0
        assert run.foreign_blocks == 0
        assert run.exit_status == 0
        assert run.samples["end"].fds == run.samples["start"].fds
        assert run.samples["after"].fds == run.samples["idle"].fds
        assert scale.server_run_ok(run)
    images = {(tmp_path / f"disk{i}.img").read_bytes()[: 256 << 10] for i in range(4)}
    assert len(images) == 4  # four different patterns, one per file
