"""The fio-style workload engine (vnvme.bench.engine), its CRC-32C and its fio JSON output."""

from __future__ import annotations

import errno
import json
import math
import random
import statistics
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from host import Rig, make_rig
from vnvme.bench.crc32c import crc32c
from vnvme.bench.engine import (
    FIO_PERCENTILES,
    VERIFY_HEADER_SIZE,
    JobResult,
    JobSpec,
    LatencyStats,
    check_verify_block,
    fill_verify_block,
    percentile_nearest_rank,
    run_job,
)
from vnvme.bench.fio_json import to_fio_json
from vnvme.controller.config import ControllerConfig, CqEventIdxPolicy, SqEventIdxPolicy
from vnvme.controller.namespace import Namespace, NullBackend, RamBackend
from vnvme.driver import NvmeError
from vnvme.spec.commands import Sqe

KIB = 1024


class RecordingRam(RamBackend):
    """A RAM backend that remembers every access as (kind, offset, length), in order."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.log: list[tuple[str, int, int]] = []

    def read_into(self, offset: int, dest: memoryview) -> None:
        self.log.append(("read", offset, len(dest)))
        super().read_into(offset, dest)

    def write(self, offset: int, src: memoryview, *, sync: bool) -> None:
        self.log.append(("write", offset, len(src)))
        super().write(offset, src, sync=sync)

    def offsets(self, kind: str) -> list[int]:
        return [offset for what, offset, _ in self.log if what == kind]


class CorruptingRam(RamBackend):
    """Stores one byte of every write that covers ``target`` flipped: silent media corruption."""

    def __init__(self, size: int, target: int) -> None:
        super().__init__(size)
        self.target = target
        self.corrupted = 0

    def write(self, offset: int, src: memoryview, *, sync: bool) -> None:
        super().write(offset, src, sync=sync)
        if offset <= self.target < offset + len(src):
            stored = bytearray(1)
            self.read_into(self.target, memoryview(stored))
            super().write(self.target, memoryview(bytes([stored[0] ^ 0x40])), sync=sync)
            self.corrupted += 1


class FailingRam(RamBackend):
    """Reads of the block at ``target`` fail with EIO (an Unrecovered Read Error)."""

    def __init__(self, size: int, target: int) -> None:
        super().__init__(size)
        self.target = target

    def read_into(self, offset: int, dest: memoryview) -> None:
        if offset <= self.target < offset + len(dest):
            raise OSError(errno.EIO, "media error")
        super().read_into(offset, dest)


class FakeClock:
    """Nanoseconds that advance by ``step`` on every reading (the first reading is ``step``)."""

    def __init__(self, step: int = 1000) -> None:
        self.step = step
        self.now = 0
        self.calls = 0

    def __call__(self) -> int:
        self.now += self.step
        self.calls += 1
        return self.now


@contextmanager
def ram_rig(backend: RamBackend, *, lba_size: int = 512, **options: Any) -> Iterator[Rig]:
    r = make_rig(namespaces=[Namespace(1, backend, lba_size)], trace=(), **options)
    try:
        yield r
    finally:
        r.close()


def io_counts(r: Rig) -> dict[str, int]:
    return dict(r.controller.statistics().io_commands)


def expected_reads(seed: int, rwmixread: int, ios: int, job: int = 0) -> int:
    """The engine's documented read/write choice, computed independently."""
    rng = random.Random(f"vnvme-rw:{seed}:{job}")
    return sum(rng.randrange(100) < rwmixread for _ in range(ios))


# Section: CRC-32C


def test_crc32c_check_value_and_rfc3720_vectors() -> None:
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"") == 0
    assert crc32c(bytes(32)) == 0x8A9136AA
    assert crc32c(b"\xff" * 32) == 0x62A8AB43
    assert crc32c(bytes(range(32))) == 0x46DD794E
    assert crc32c(bytes(range(31, -1, -1))) == 0x113FDB5C


def test_crc32c_chains_and_takes_every_buffer_kind() -> None:
    data = bytes(random.Random(5).getrandbits(8) for _ in range(4099))
    whole = crc32c(data)
    for cut in (0, 1, 7, 8, 9, 1000, 4098, 4099):
        assert crc32c(data[cut:], crc32c(data[:cut])) == whole
    assert crc32c(bytearray(data)) == whole
    assert crc32c(memoryview(data)) == whole
    assert crc32c(memoryview(data[:4096]).cast("I")) == crc32c(data[:4096])


# Section: statistics


def test_percentiles_nearest_rank_by_hand() -> None:
    samples = [70, 10, 100, 40, 20, 90, 30, 60, 50, 80]  # 10 samples, unsorted
    stats = LatencyStats.from_samples(samples)
    assert (stats.n, stats.min, stats.max, stats.mean) == (10, 10, 100, 55.0)
    assert stats.stddev == pytest.approx(math.sqrt(8250 / 9))  # sample standard deviation
    assert stats.stddev == pytest.approx(statistics.stdev(samples))
    # rank = ceil(p / 100 * 10): 1 % .. 10 % -> rank 1; 20 % -> 2; ... 90 % -> 9; above -> 10.
    expected = {
        1.0: 10,
        5.0: 10,
        10.0: 10,
        20.0: 20,
        30.0: 30,
        40.0: 40,
        50.0: 50,
        60.0: 60,
        70.0: 70,
        80.0: 80,
        90.0: 90,
        95.0: 100,
        99.0: 100,
        99.5: 100,
        99.9: 100,
        99.95: 100,
        99.99: 100,
    }
    assert dict(stats.percentiles) == expected
    assert [p for p, _ in stats.percentiles] == list(FIO_PERCENTILES)


def test_percentile_ranks_are_exact_decimals() -> None:
    ordered = list(range(1, 2001))  # value == rank
    assert percentile_nearest_rank(ordered, 99.95) == 1999  # 0.9995 * 2000 is exactly 1999
    assert percentile_nearest_rank(ordered, 99.9) == 1998
    assert percentile_nearest_rank(ordered, 99.99) == 2000  # 1999.8 -> 2000
    assert percentile_nearest_rank(ordered, 95.0) == 1900
    assert percentile_nearest_rank(list(range(1, 21)), 95.0) == 19
    assert percentile_nearest_rank([7], 0.0) == 7
    with pytest.raises(ValueError):
        percentile_nearest_rank([], 50.0)
    empty = LatencyStats.from_samples([])
    assert (empty.n, empty.min, empty.max, empty.mean, empty.stddev, empty.percentiles) == (
        0,
        0,
        0,
        0.0,
        0.0,
        (),
    )
    single = LatencyStats.from_samples([42])
    assert single.stddev == 0.0 and single.percentile(99.99) == 42


# Section: validation


@pytest.mark.parametrize(
    "options",
    [
        {"rw": "randtrim"},
        {"rw": "rw"},
        {"rwmixread": 101},
        {"rwmixread": -1},
        {"bs": 0},
        {"bs": 4096.0},
        {"iodepth": 0},
        {"iodepth": True},
        {"numjobs": 0},
        {"runtime": None, "number_ios": None},
        {"runtime": 0},
        {"runtime": -1.0},
        {"runtime": math.inf},
        {"number_ios": 0},
        {"ramp_time": -0.5},
        {"size": 0},
        {"size": 512, "bs": 4096},
        {"offset": -512},
        {"verify": "md5"},
        {"verify": "crc32c", "bs": 32},
        {"nsid": 0},
        {"seed": 1.5},
    ],
)
def test_jobspec_rejects_bad_options(options: dict[str, Any]) -> None:
    arguments: dict[str, Any] = {"number_ios": 10}
    arguments.update(options)
    with pytest.raises(ValueError):
        JobSpec(**arguments)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"nsid": 3}, "namespace 3"),
        ({"nsid": 2, "bs": 512}, "multiple of the LBA size"),
        ({"offset": 100}, "offset"),
        ({"offset": 16 << 20}, "beyond"),
        ({"offset": 8 << 20, "size": 9 << 20}, "exceeds"),
        ({"offset": (16 << 20) - 512, "bs": 4096}, "no block"),
        ({"numjobs": 2}, "numjobs"),
        ({"iodepth": 1024}, "iodepth"),
        ({"bs": 1 << 20}, "MDTS"),
        ({"verify": "crc32c", "size": 8 * 4096, "iodepth": 8}, "verify"),
    ],
)
def test_run_job_checks_the_spec_against_the_driver(rig: Rig, options: dict[str, Any], message: str) -> None:
    arguments: dict[str, Any] = {"number_ios": 10}
    arguments.update(options)
    before = rig.host_memory.bytes_allocated
    with pytest.raises(ValueError, match=message):
        run_job(rig.driver, JobSpec(**arguments))
    assert rig.host_memory.bytes_allocated == before
    assert io_counts(rig) == {}


# Section: rw modes and offsets


@pytest.mark.parametrize(
    ("rw", "reads", "writes"),
    [("randread", 300, 0), ("read", 300, 0), ("randwrite", 0, 300), ("write", 0, 300)],
)
def test_each_mode_issues_its_commands(rig: Rig, rw: str, reads: int, writes: int) -> None:
    result = run_job(rig.driver, JobSpec(rw=rw, iodepth=4, number_ios=300))
    expected = {name: n for name, n in (("read", reads), ("write", writes)) if n}
    assert io_counts(rig) == expected
    assert rig.controller.smart.host_read_commands == reads
    assert rig.controller.smart.host_write_commands == writes
    assert (result.read.ios, result.write.ios, result.ios) == (reads, writes, 300)
    assert result.read.bytes == reads * 4096 and result.write.bytes == writes * 4096
    assert result.verify_errors == result.verify_reads == 0


def test_randrw_mix_is_exactly_the_documented_draws(rig: Rig) -> None:
    seed, ios = 7, 2000
    reads = expected_reads(seed, 70, ios)
    assert 0.65 * ios < reads < 0.75 * ios
    result = run_job(rig.driver, JobSpec(rw="randrw", rwmixread=70, iodepth=8, number_ios=ios, seed=seed))
    assert io_counts(rig) == {"read": reads, "write": ios - reads}
    assert (result.read.ios, result.write.ios) == (reads, ios - reads)
    assert result.read.clat.n == reads and result.write.clat.n == ios - reads
    assert result.clat.n == ios


@pytest.mark.parametrize("rwmixread", [0, 100])
def test_randrw_extremes(rig: Rig, rwmixread: int) -> None:
    result = run_job(rig.driver, JobSpec(rw="randrw", rwmixread=rwmixread, number_ios=50))
    assert (result.read.ios, result.write.ios) == ((50, 0) if rwmixread else (0, 50))


@pytest.mark.parametrize(("rw", "kind"), [("read", "read"), ("write", "write")])
@pytest.mark.parametrize("iodepth", [1, 3])
def test_sequential_modes_walk_the_range_in_order_and_wrap(rw: str, kind: str, iodepth: int) -> None:
    backend = RecordingRam(1 << 20)
    with ram_rig(backend) as r:
        result = run_job(
            r.driver, JobSpec(rw=rw, bs=4096, offset=8192, size=5 * 4096, iodepth=iodepth, number_ios=12)
        )
        assert result.ios == 12 and result.size == 5 * 4096 and result.offset == 8192
        assert backend.offsets(kind) == [8192 + (i % 5) * 4096 for i in range(12)]
        assert all(length == 4096 for _, _, length in backend.log)


def test_random_modes_stay_in_the_range_and_follow_the_seed() -> None:
    backend = RecordingRam(1 << 20)
    with ram_rig(backend) as r:
        offset, size, bs, seed = 64 * KIB, 40 * KIB + 512, 8 * KIB, 3  # 5 whole blocks; the rest unused
        run_job(
            r.driver,
            JobSpec(rw="randwrite", bs=bs, offset=offset, size=size, iodepth=4, number_ios=200, seed=seed),
        )
        rng = random.Random(f"vnvme-offset:{seed}:0")
        expected = [offset + rng.randrange(5) * bs for _ in range(200)]
        # One backend write per command (an 8 KiB buffer is two contiguous pages), in submission order.
        assert backend.log == [("write", o, bs) for o in expected]
        assert set(expected) == {offset + k * bs for k in range(5)}  # every block, none beyond


def test_whole_namespace_is_the_default_range() -> None:
    backend = RecordingRam(64 * KIB)
    with ram_rig(backend) as r:
        result = run_job(r.driver, JobSpec(rw="read", bs=4096, offset=16 * KIB, number_ios=13))
        assert result.size == 48 * KIB
        assert backend.offsets("read") == [16 * KIB + (i % 12) * 4096 for i in range(13)]


# Section: stopping rules and timing (fake clock)


def test_ramp_time_is_excluded() -> None:
    backend = RecordingRam(1 << 20)
    with ram_rig(backend) as r:
        clock = FakeClock(1000)
        # start = 1000, ramp ends at 21000; depth 1 alternates submit / reap readings.
        result = run_job(r.driver, JobSpec(rw="randread", ramp_time=20e-6, number_ios=10), clock=clock)
        assert result.ramp_ios == 10  # submitted at 2000, 4000, ... 20000
        assert io_counts(r) == {"read": 20}
        assert result.read.ios == 10
        assert result.elapsed_ns == 41000 - 22000  # first measured submit to last reap
        assert result.read.clat.min == result.read.clat.max == 1000
        assert result.read.iops == pytest.approx(10 / 19e-6)
        # Doorbells are counted from the first measured command on: 10 SQ rings.
        assert result.sq_doorbell_mmio == 10


@pytest.mark.parametrize(("number_ios", "expected"), [(30, 30), (1000, 50), (None, 50)])
def test_runtime_and_number_ios_whichever_ends_first(rig: Rig, number_ios: int | None, expected: int) -> None:
    clock = FakeClock(1000)
    # start = 1000, deadline = 101000: the reap of I/O k reads 1000 + 2000 k; k = 50 stops it.
    spec = JobSpec(rw="randread", runtime=100e-6, number_ios=number_ios)
    result = run_job(rig.driver, spec, clock=clock)
    assert result.read.ios == expected
    assert io_counts(rig) == {"read": expected}
    assert result.elapsed_ns == 2000 * expected - 1000
    assert result.ramp_ios == 0


def test_runtime_with_real_clock_stops_and_drains(rig: Rig) -> None:
    result = run_job(rig.driver, JobSpec(rw="randrw", iodepth=8, runtime=0.05))
    assert result.ios > 0
    # The deadline counts from the start of the run and the window from the first command's
    # clock reading, a few microseconds later: allow that gap, nothing more.
    assert 0.045 <= result.elapsed < 2.0
    assert rig.driver.queue(1).outstanding == 0
    assert io_counts(rig) == {"read": result.read.ios, "write": result.write.ios}


def test_number_ios_is_per_job() -> None:
    r = make_rig(io_queues=3, trace=())
    try:
        result = run_job(r.driver, JobSpec(rw="randread", iodepth=3, numjobs=3, number_ios=101))
        assert result.read.ios == 303
    finally:
        r.close()


def test_qid_runs_the_one_job_on_that_queue() -> None:
    r = make_rig(io_queues=3, trace=())
    try:
        result = run_job(r.driver, JobSpec(rw="randread", iodepth=2, number_ios=50, qid=2))
        assert result.read.ios == 50
        fetched = {s.qid: s.entries for s in r.controller.queue_statistics() if not s.is_cq and s.qid}
        assert fetched == {1: 0, 2: 50, 3: 0}
        with pytest.raises(ValueError, match="names the queue of one job"):
            run_job(r.driver, JobSpec(rw="randread", numjobs=2, number_ios=1, qid=2))
    finally:
        r.close()


def test_latency_is_submit_to_reap() -> None:
    with ram_rig(RamBackend(1 << 20)) as r:
        # Depth 4: four submit readings (2000..5000), one reap reading (6000), and again.
        result = run_job(r.driver, JobSpec(rw="randread", iodepth=4, number_ios=8), clock=FakeClock(1000))
        assert sorted(result.read.clat.percentiles)[0] == (1.0, 1000)
        assert (result.read.clat.min, result.read.clat.max) == (1000, 4000)
        assert result.read.clat.mean == 2500.0
        assert result.elapsed_ns == 11000 - 2000


# Section: queue depth, doorbells, jobs


@pytest.mark.parametrize("iodepth", [1, 3, 8])
def test_iodepth_is_honoured(rig: Rig, monkeypatch: pytest.MonkeyPatch, iodepth: int) -> None:
    qp = rig.driver.queue(1)
    seen: list[int] = []
    original: Callable[[Sqe], int] = qp.submit

    def submit(sqe: Sqe) -> int:
        cid = original(sqe)
        seen.append(qp.outstanding)
        return cid

    monkeypatch.setattr(qp, "submit", submit)
    run_job(rig.driver, JobSpec(rw="randread", iodepth=iodepth, number_ios=200))
    assert len(seen) == 200
    assert max(seen) == iodepth


def _shadow_rig(cq_policy: CqEventIdxPolicy = CqEventIdxPolicy.NEVER) -> Rig:
    return make_rig(
        namespaces=[Namespace(1, NullBackend(1 << 30), 4096)],
        config=ControllerConfig(sq_eventidx=SqEventIdxPolicy.EAGER, cq_eventidx=cq_policy),
        trace=(),
    )


@pytest.mark.parametrize("iodepth", [1, 2, 4, 8])
def test_shadow_doorbells_per_io_are_one_per_batch(iodepth: int) -> None:
    """As in test_shadow_doorbells: one SQ doorbell per batch of `iodepth`, no CQ doorbell."""
    r = _shadow_rig()
    try:
        ios = 64 * iodepth
        before = r.controller.statistics()
        spec = JobSpec(rw="randread", iodepth=iodepth, number_ios=ios, iodepth_batch_submit=0)
        result = run_job(r.driver, spec)
        after = r.controller.statistics()
        assert result.ios == ios
        assert result.sq_doorbell_mmio == 64 == after.doorbell_sq_io - before.doorbell_sq_io
        assert result.cq_doorbell_mmio == 0 == after.doorbell_cq_io - before.doorbell_cq_io
        assert result.sq_doorbells_per_io == 1 / iodepth
        assert result.cq_doorbells_per_io == 0.0
        assert result.doorbells_per_io == 1 / iodepth
        assert result.doorbells_skipped == 64  # every CQ head update stayed in memory
        assert result.interrupts == 64
        assert (result.total_ios, result.sq_doorbells, result.cq_doorbells) == (ios, 64, 0)
    finally:
        r.close()


def test_eager_cq_policy_rings_the_cq_once_per_batch() -> None:
    r = _shadow_rig(CqEventIdxPolicy.EAGER)
    try:
        spec = JobSpec(rw="randwrite", iodepth=4, number_ios=256, iodepth_batch_submit=0)
        result = run_job(r.driver, spec)
        assert (result.sq_doorbell_mmio, result.cq_doorbell_mmio) == (64, 64)
        assert result.doorbells_per_io == 0.5
    finally:
        r.close()


def test_without_shadow_doorbells_every_batch_rings_both() -> None:
    r = make_rig(shadow_doorbells=False, trace=())
    try:
        result = run_job(r.driver, JobSpec(rw="randread", iodepth=4, number_ios=256, iodepth_batch_submit=0))
        assert (result.sq_doorbell_mmio, result.cq_doorbell_mmio, result.doorbells_skipped) == (64, 64, 0)
    finally:
        r.close()


@pytest.mark.parametrize(("batch", "expected"), [(1, 256), (2, 128), (0, 64)])
def test_iodepth_batch_submit_sets_how_often_the_tail_is_published(batch: int, expected: int) -> None:
    """fio's default (1) updates the tail for every command; in-process the controller consumes
    each at once, so each one crosses EventIdx and rings."""
    r = _shadow_rig()
    try:
        spec = JobSpec(rw="randread", iodepth=4, number_ios=256, iodepth_batch_submit=batch)
        result = run_job(r.driver, spec)
        assert result.sq_doorbell_mmio == expected
    finally:
        r.close()


def test_two_jobs_use_two_queue_pairs() -> None:
    r = make_rig(io_queues=2, trace=())
    try:
        seed, ios = 11, 400
        result = run_job(
            r.driver,
            JobSpec(
                rw="randrw",
                rwmixread=60,
                numjobs=2,
                iodepth=4,
                number_ios=ios,
                seed=seed,
                iodepth_batch_submit=0,
            ),
        )
        queues = [q for q in r.controller.queue_statistics() if q.qid]
        # Completions posted per I/O CQ, and one SQ doorbell per batch of 4 on each SQ.
        assert {q.qid: q.entries for q in queues if q.is_cq} == {1: ios, 2: ios}
        assert {q.qid: q.entries for q in queues if not q.is_cq} == {1: ios, 2: ios}  # fetched
        assert {q.qid: q.mmio_doorbell_writes for q in queues if not q.is_cq} == {1: ios // 4, 2: ios // 4}
        reads = expected_reads(seed, 60, ios, 0) + expected_reads(seed, 60, ios, 1)
        assert (result.read.ios, result.write.ios) == (reads, 2 * ios - reads)
        assert result.sq_doorbell_mmio == 2 * (ios // 4)
    finally:
        r.close()


# Section: verify


def test_verify_block_format() -> None:
    block = memoryview(bytearray(4096))
    fill_verify_block(block, 1234, 5)
    assert bytes(block[:4]) == b"VNVB" and VERIFY_HEADER_SIZE == 32
    assert check_verify_block(block, 1234, 5)
    assert not check_verify_block(block, 1235, 5)  # another block's data
    assert not check_verify_block(block, 1234, 4)  # a stale write
    other = memoryview(bytearray(4096))
    fill_verify_block(other, 1234, 6)
    assert bytes(other[VERIFY_HEADER_SIZE:]) != bytes(block[VERIFY_HEADER_SIZE:])
    block[2000] ^= 1
    assert not check_verify_block(block, 1234, 5)


@pytest.mark.parametrize(
    "spec",
    [
        JobSpec(rw="randrw", iodepth=4, number_ios=300, size=64 * KIB, verify="crc32c", seed=2),
        JobSpec(rw="randrw", iodepth=4, numjobs=2, number_ios=200, size=64 * KIB, verify="crc32c"),
        JobSpec(rw="write", iodepth=4, numjobs=2, number_ios=50, size=64 * KIB, verify="crc32c"),
        JobSpec(rw="randwrite", iodepth=8, number_ios=100, size=256 * KIB, verify="crc32c"),
        JobSpec(rw="randread", iodepth=4, number_ios=100, size=32 * KIB, verify="crc32c"),
        JobSpec(rw="read", bs=8192, iodepth=2, number_ios=20, size=80 * KIB, verify="crc32c"),
    ],
    ids=["randrw", "randrw-2jobs", "write-2jobs", "randwrite", "randread", "read-8k"],
)
def test_verify_passes_on_healthy_media(spec: JobSpec) -> None:
    with ram_rig(RamBackend(1 << 20), io_queues=2) as r:
        result = run_job(r.driver, spec)
        assert result.verify_errors == 0
        assert result.verify_reads > 0
        counts = io_counts(r)
        if spec.rw in ("read", "randread"):
            blocks = spec.size // spec.bs if spec.size else 0
            assert counts == {"write": blocks, "read": result.read.ios}  # the fill, then the job
            assert result.verify_reads == result.read.ios
        else:
            assert counts["write"] == result.write.ios
            # In-run reads plus one read-back of every block written.
            assert counts["read"] == result.verify_reads >= result.read.ios


def test_verify_catches_a_corrupted_block() -> None:
    backend = CorruptingRam(1 << 20, target=5 * 4096 + 100)
    with ram_rig(backend) as r:
        spec = JobSpec(rw="write", bs=4096, size=16 * 4096, iodepth=4, number_ios=16, verify="crc32c")
        result = run_job(r.driver, spec)
        assert backend.corrupted == 1
        assert result.write.ios == 16
        assert result.verify_reads == 16  # the read-back of every written block
        assert result.verify_errors == 1
        assert result.read.ios == 0  # the read-back is not measured


def test_verify_read_job_catches_corruption_of_its_fill() -> None:
    backend = CorruptingRam(1 << 20, target=3 * 4096)  # the header's first byte: the magic
    with ram_rig(backend) as r:
        spec = JobSpec(rw="read", bs=4096, size=10 * 4096, iodepth=2, number_ios=20, verify="crc32c")
        result = run_job(r.driver, spec)
        assert result.verify_reads == 20
        assert result.verify_errors == 2  # two laps over the corrupted block


# Section: robustness


def test_buffers_are_allocated_once_and_freed(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    memory = rig.host_memory
    before = memory.bytes_allocated
    allocations: list[int] = []
    original = memory.alloc

    def alloc(size: int, *, zero: bool = True) -> Any:
        allocations.append(size)
        return original(size, zero=zero)

    monkeypatch.setattr(memory, "alloc", alloc)
    run_job(rig.driver, JobSpec(rw="randrw", iodepth=6, number_ios=500))
    assert allocations == [4096] * 6
    assert memory.bytes_allocated == before


def test_io_error_raises_and_frees_the_buffers() -> None:
    with ram_rig(FailingRam(1 << 20, target=7 * 4096), io_queues=2) as r:
        before = r.host_memory.bytes_allocated
        with pytest.raises(NvmeError, match="bench read I/O"):
            run_job(r.driver, JobSpec(rw="read", numjobs=2, iodepth=4, number_ios=100))
        assert r.host_memory.bytes_allocated == before
        for qp in r.driver.io:
            assert qp.outstanding == 0
        # The driver still works.
        r.driver.write(1, 0, b"\x5a" * 512)
        assert r.driver.read(1, 0, 1) == b"\x5a" * 512


# Section: fio JSON


def _fio_result(r: Rig, spec: JobSpec) -> JobResult:
    return run_job(r.driver, spec, clock=FakeClock(1_000_000))  # 1 ms per reading


def test_fio_json_shape_and_consistency(rig: Rig) -> None:
    specs = [
        ("mixed", JobSpec(rw="randrw", rwmixread=70, iodepth=4, number_ios=2000, seed=1)),
        ("reads", JobSpec(rw="read", iodepth=2, number_ios=500, ramp_time=0.005, offset=4096, size=1 << 20)),
    ]
    results = [(name, spec, _fio_result(rig, spec)) for name, spec in specs]
    out = to_fio_json(results, extra={"sq_doorbell_mmio": 1, "note": "x"}, timestamp=1_700_000_000.5)
    text = json.dumps(out)
    back = json.loads(text)
    assert back["fio version"] == "vnvme-0.1.0"
    assert back["timestamp"] == 1_700_000_000 and back["timestamp_ms"] == 1_700_000_000_500
    assert isinstance(back["time"], str) and "2023" in back["time"]
    assert isinstance(back["global options"], dict)
    assert back["vnvme"] == {"sq_doorbell_mmio": 1, "note": "x"}
    assert [job["jobname"] for job in back["jobs"]] == ["mixed", "reads"]
    for job, (_, spec, result) in zip(back["jobs"], results, strict=True):
        assert job["error"] == 0 and isinstance(job["groupid"], int)
        options = job["job options"]
        assert all(isinstance(v, str) for v in options.values())
        assert options["rw"] == spec.rw and options["bs"] == str(spec.bs)
        assert options["iodepth"] == str(spec.iodepth) and options["numjobs"] == "1"
        assert options["rwmixread"] == str(spec.rwmixread) and options["verify"] == "0"
        assert options["offset"] == str(spec.offset)
        assert job["sync"] == {
            "total_ios": 0,
            "lat_ns": {"min": 0, "max": 0, "mean": 0.0, "stddev": 0.0, "N": 0},
        }
        for direction in ("read", "write", "trim"):
            block = job[direction]
            for key in ("io_bytes", "io_kbytes", "bw_bytes", "bw", "iops", "runtime", "total_ios"):
                assert key in block
            assert block["short_ios"] == block["drop_ios"] == 0
            assert block["slat_ns"] == {"min": 0, "max": 0, "mean": 0.0, "stddev": 0.0, "N": 0}
            assert block["io_kbytes"] == block["io_bytes"] // 1024
            assert block["bw"] == block["bw_bytes"] // 1024
            assert block["clat_ns"]["N"] == block["total_ios"]
            if block["total_ios"]:
                assert block["runtime"] > 0
                assert block["iops"] * block["runtime"] / 1000 == pytest.approx(block["total_ios"], rel=0.01)
                assert block["bw_bytes"] == pytest.approx(block["iops"] * spec.bs, rel=1e-6)
                for lat in ("clat_ns", "lat_ns"):
                    stats = block[lat]
                    values = list(stats["percentile"].values())
                    assert list(stats["percentile"]) == [f"{p:f}" for p in FIO_PERCENTILES]
                    assert "50.000000" in stats["percentile"] and "99.990000" in stats["percentile"]
                    assert values == sorted(values)
                    assert stats["min"] <= values[0] and values[-1] <= stats["max"]
                    assert stats["min"] <= stats["mean"] <= stats["max"]
            else:
                assert block["iops"] == 0 and block["runtime"] == 0 and "percentile" not in block["clat_ns"]
        assert job["read"]["total_ios"] == result.read.ios
        assert job["write"]["total_ios"] == result.write.ios
        assert job["trim"]["total_ios"] == 0
        assert job["vnvme"]["sq_doorbell_mmio"] == result.sq_doorbell_mmio
    mixed = back["jobs"][0]
    assert mixed["read"]["total_ios"] + mixed["write"]["total_ios"] == 2000
    assert back["jobs"][1]["job options"]["ramp_time"] == "5ms"
    assert results[1][2].ramp_ios > 0
    assert back["jobs"][1]["job options"]["size"] == str(1 << 20)


def test_fio_json_time_options() -> None:
    from vnvme.bench.fio_json import job_options

    spec = JobSpec(runtime=10, ramp_time=2.5, verify="crc32c", number_ios=5, seed=9)
    options = job_options(spec, "j")
    assert options["runtime"] == "10" and options["time_based"] == "1"
    assert options["ramp_time"] == "2500ms"
    assert options["verify"] == "crc32c" and options["number_ios"] == "5" and options["randseed"] == "9"
    assert job_options(JobSpec(runtime=0.000002), "j")["runtime"] == "2us"
