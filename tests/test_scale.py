"""Many queues and servers, the short forms (benchmarks/scale.py runs the long ones): 64 I/O
queues of depth 32 on one controller in-process and over vfio-user, fewer MSI-X vectors than
queues, and 4 ``vnvme serve`` processes with 4 clients at once."""

from __future__ import annotations

from pathlib import Path

from host import make_rig
from vnvme.bench import scale
from vnvme.controller.config import ControllerConfig
from vnvme.controller.namespace import Namespace, RamBackend


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
