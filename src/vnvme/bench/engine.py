"""A closed-loop workload engine in fio's vocabulary, driving :class:`NvmeDriver` queue pairs.

The one workload engine (``vnvme bench``, ``vnvme demo``, tests): ``numjobs`` jobs, each with its own I/O
queue pair (``driver.io[j]``), keep ``iodepth`` commands in flight. A round submits on every job
(as many commands as its free slots allow) and rings each SQ once (blk-mq ``commit_rqs``), then
reaps whatever every queue has ready (one CQ head update per reap); when nothing is ready
anywhere it blocks on the first queue with I/O outstanding (:meth:`QueuePair.wait`). Each
measured round starts one job later than the one before, so no queue is always rung last.

Clock: ``clock()`` (nanoseconds) is read once when the run starts, once per submitted command
(after its buffer is prepared, just before it is placed in the SQ) and once per reaped batch
(the unmeasured verify phases read it only per reaped batch).
A command's latency is its reap reading minus its submit reading. A command is *measured* when
its submit reading is at or after ``start + ramp_time``; the measured window runs from the first
measured submit to the reap of the last measured completion. ``runtime`` ends submission at the
first reap reading at or after ``start + ramp_time + runtime``; ``number_ios`` caps each job's
measured submissions. What is in flight when submission stops still completes and is counted.

Offsets: the range is ``[offset, offset + size)`` cut into ``size // bs`` blocks of ``bs`` bytes.
Random modes pick blocks uniformly with replacement (fio ``norandommap``); sequential modes walk
the blocks in order from the first and wrap around. Every job has two private generators: job
``j``'s read/write choices (randrw) are ``random.Random(f"vnvme-rw:{seed}:{j}").randrange(100) <
rwmixread`` (a read), one draw per command in submission order; block choices come from
``random.Random(f"vnvme-offset:{seed}:{j}")``.

Verify (``verify="crc32c"``): every written block starts with a 32-byte header (magic, CRC-32C of
the rest of the block, its SLBA, a per-run generation number, bs) followed by a fill derived from
(SLBA, generation). The engine remembers the generation each block last got; a read of a block
checks magic, SLBA, generation and CRC, and counts one verify error per bad block. Then:

- no two commands in flight ever touch the same block (a busy block is skipped: sequential modes
  move on to the next one, random modes draw again);
- randrw reads only target blocks already written in this run; a read that finds none (or only
  busy ones, 16 draws) is issued as a write instead;
- read / randread first write every block of the range once (a fill phase, not measured);
- after the measured phase every block written in the run is read back once and checked, as fio
  does after a verify write job (the read-back is not measured either).

Any error status on an I/O raises :class:`NvmeError`.
"""

from __future__ import annotations

import itertools
import math
import random
import resource
import struct
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Final

from vnvme.bench.crc32c import crc32c
from vnvme.driver.driver import NvmeDriver, NvmeError, QueuePair
from vnvme.driver.transport import PAGE_SIZE, DmaBuffer
from vnvme.spec.commands import Cqe, NvmOpcode
from vnvme.spec.registers import CAP

RW_MODES: Final = ("read", "write", "randread", "randwrite", "randrw")
VERIFY_MODES: Final = ("crc32c",)
#: The completion latency percentiles fio reports by default.
FIO_PERCENTILES: Final = (
    1.0,
    5.0,
    10.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    70.0,
    80.0,
    90.0,
    95.0,
    99.0,
    99.5,
    99.9,
    99.95,
    99.99,
)

#: Verify header: magic, CRC-32C of bytes [8, bs), SLBA, generation, bs, reserved.
VERIFY_MAGIC: Final = b"VNVB"
_HEADER: Final = struct.Struct("<4sIQQI4x")
VERIFY_HEADER_SIZE: Final = _HEADER.size
_CRC: Final = struct.Struct("<I")
_WORD: Final = struct.Struct("<Q")
_MASK64: Final = (1 << 64) - 1
_READ: Final = int(NvmOpcode.READ)
_WRITE: Final = int(NvmOpcode.WRITE)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_seconds(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class JobSpec:
    """One fio-style job description (option names as in fio)."""

    rw: str = "randread"
    bs: int = 4096
    iodepth: int = 1
    numjobs: int = 1
    #: Percentage of reads for ``randrw``.
    rwmixread: int = 50
    #: Seconds of measured I/O per run (after ``ramp_time``).
    runtime: float | None = None
    #: Measured I/Os per job.
    number_ios: int | None = None
    #: Seconds of I/O before measuring starts.
    ramp_time: float = 0.0
    #: Bytes of the range; default: the namespace from ``offset`` to its end.
    size: int | None = None
    offset: int = 0
    verify: str | None = None
    nsid: int = 1
    seed: int = 0
    #: Commands placed before the SQ tail doorbell is updated (fio's iodepth_batch_submit): 1,
    #: fio's default, rings for every command as libaio + blk-mq do; 0 means the whole batch.
    iodepth_batch_submit: int = 1
    #: The I/O queue of a single job (numjobs 1); by default job ``j`` runs on ``driver.io[j]``.
    qid: int | None = None

    def __post_init__(self) -> None:
        if self.rw not in RW_MODES:
            raise ValueError(f"rw must be one of {', '.join(RW_MODES)}, not {self.rw!r}")
        if not _is_int(self.rwmixread) or not 0 <= self.rwmixread <= 100:
            raise ValueError(f"rwmixread must be an integer in 0..100, not {self.rwmixread!r}")
        if not _is_int(self.bs) or self.bs <= 0:
            raise ValueError(f"bs must be a positive integer number of bytes, not {self.bs!r}")
        if not _is_int(self.iodepth) or self.iodepth < 1:
            raise ValueError(f"iodepth must be a positive integer, not {self.iodepth!r}")
        if not _is_int(self.numjobs) or self.numjobs < 1:
            raise ValueError(f"numjobs must be a positive integer, not {self.numjobs!r}")
        if self.runtime is None and self.number_ios is None:
            raise ValueError("give runtime or number_ios (or both: whichever ends first)")
        if self.runtime is not None and (not _is_seconds(self.runtime) or self.runtime <= 0):
            raise ValueError(f"runtime must be a positive number of seconds, not {self.runtime!r}")
        if self.number_ios is not None and (not _is_int(self.number_ios) or self.number_ios < 1):
            raise ValueError(f"number_ios must be a positive integer, not {self.number_ios!r}")
        if not _is_seconds(self.ramp_time) or self.ramp_time < 0:
            raise ValueError(f"ramp_time must be a non-negative number of seconds, not {self.ramp_time!r}")
        if self.size is not None and (not _is_int(self.size) or self.size <= 0):
            raise ValueError(f"size must be a positive integer number of bytes, not {self.size!r}")
        if not _is_int(self.offset) or self.offset < 0:
            raise ValueError(f"offset must be a non-negative integer number of bytes, not {self.offset!r}")
        if self.size is not None and self.size < self.bs:
            raise ValueError(f"size {self.size} is smaller than one block of bs {self.bs}")
        if self.verify is not None and self.verify not in VERIFY_MODES:
            raise ValueError(f"verify must be None or one of {', '.join(VERIFY_MODES)}, not {self.verify!r}")
        if self.verify is not None and self.bs < 2 * VERIFY_HEADER_SIZE:
            raise ValueError(f"bs must be at least {2 * VERIFY_HEADER_SIZE} bytes with verify")
        if not _is_int(self.nsid) or not 1 <= self.nsid < 0xFFFFFFFF:
            raise ValueError(f"nsid must be a valid namespace ID, not {self.nsid!r}")
        if not _is_int(self.seed):
            raise ValueError(f"seed must be an integer, not {self.seed!r}")
        if not _is_int(self.iodepth_batch_submit) or self.iodepth_batch_submit < 0:
            raise ValueError(f"iodepth_batch_submit must be 0 or more, not {self.iodepth_batch_submit!r}")

    @property
    def is_random(self) -> bool:
        return self.rw.startswith("rand")

    @property
    def writes(self) -> bool:
        return self.rw in ("write", "randwrite", "randrw")


# Section: results


def percentile_nearest_rank(ordered: Sequence[int], p: float) -> int:
    """The nearest-rank percentile of sorted samples: the value at rank ceil(p / 100 * N).

    ``p`` is taken as the decimal it prints as (99.95 is exactly 9995/100), so ranks never
    suffer from binary floating point. Rank 0 (p = 0) is the minimum.
    """
    n = len(ordered)
    if n == 0:
        raise ValueError("no samples")
    if not 0 <= p <= 100:
        raise ValueError(f"percentile must be in 0..100, not {p}")
    rank = math.ceil(Fraction(str(p)) * n / 100)
    return ordered[max(rank, 1) - 1]


@dataclass(frozen=True)
class LatencyStats:
    """Latency statistics in nanoseconds, as fio reports them (sample standard deviation)."""

    n: int
    min: int
    max: int
    mean: float
    stddev: float
    #: (percentile, value) pairs, exact nearest-rank values of the samples.
    percentiles: tuple[tuple[float, int], ...]
    #: (value, how many samples had it), ascending: the whole distribution, for histograms.
    counts: tuple[tuple[int, int], ...] = ()

    @classmethod
    def from_samples(
        cls, samples: Iterable[int], percentiles: Sequence[float] = FIO_PERCENTILES
    ) -> LatencyStats:
        ordered = sorted(samples)
        n = len(ordered)
        if n == 0:
            return cls(0, 0, 0, 0.0, 0.0, ())
        mean = math.fsum(ordered) / n
        stddev = math.sqrt(math.fsum((x - mean) ** 2 for x in ordered) / (n - 1)) if n > 1 else 0.0
        pairs = tuple((float(p), percentile_nearest_rank(ordered, p)) for p in percentiles)
        counts = tuple((value, len(list(same))) for value, same in itertools.groupby(ordered))
        return cls(n, ordered[0], ordered[-1], mean, stddev, pairs, counts)

    def percentile(self, p: float) -> int:
        for key, value in self.percentiles:
            if key == p:
                return value
        raise KeyError(f"percentile {p} was not computed")


@dataclass(frozen=True)
class DirectionStats:
    """One direction (read or write) of a measured window."""

    ios: int
    bytes: int
    #: Per second of the measured window.
    iops: float
    bw_bytes: float
    #: Completion latency: submit reading to reap reading (the engine has no separate slat).
    clat: LatencyStats

    @classmethod
    def build(cls, samples: list[int], bs: int, elapsed_ns: int) -> DirectionStats:
        ios = len(samples)
        seconds = elapsed_ns / 1e9
        iops = ios / seconds if seconds > 0 else 0.0
        return cls(ios, ios * bs, iops, iops * bs, LatencyStats.from_samples(samples))


@dataclass(frozen=True)
class JobResult:
    """What a run measured (all ``numjobs`` jobs together, like fio's group_reporting)."""

    read: DirectionStats
    write: DirectionStats
    #: Completion latency of every measured I/O, both directions together.
    clat: LatencyStats
    #: The measured window (ramp excluded), nanoseconds.
    elapsed_ns: int
    #: Blocks whose verify check failed / blocks checked (in the run and in the read-back).
    verify_errors: int
    verify_reads: int
    #: I/Os submitted during ramp_time (done, not counted).
    ramp_ios: int
    #: The range actually used: blocks of bs from ``offset``, ``size`` bytes.
    offset: int
    size: int
    #: Host doorbell decisions over the measured window (driver.stats), I/O queues only.
    sq_doorbell_mmio: int
    cq_doorbell_mmio: int
    doorbells_skipped: int
    #: Interrupts over the window when the driver or transport counts them, else None.
    interrupts: int | None
    #: This thread's resource usage over the window (getrusage): CPU time in user and kernel
    #: mode, context switches (voluntary + involuntary), major and minor page faults.
    user_cpu_ns: int
    system_cpu_ns: int
    context_switches: int
    major_faults: int
    minor_faults: int
    #: Measured I/Os completed per job, in job order (job ``j`` ran on ``driver.io[j]``): with
    #: ``runtime``, each queue's share of the window (its IOPS: ios / elapsed).
    job_ios: tuple[int, ...] = ()

    @property
    def elapsed(self) -> float:
        return self.elapsed_ns / 1e9

    @property
    def ios(self) -> int:
        return self.read.ios + self.write.ios

    @property
    def bytes(self) -> int:
        return self.read.bytes + self.write.bytes

    @property
    def iops(self) -> float:
        return self.ios / self.elapsed if self.elapsed_ns > 0 else 0.0

    @property
    def bw_bytes(self) -> float:
        return self.bytes / self.elapsed if self.elapsed_ns > 0 else 0.0

    # Aliases (fio's total_ios; seconds and doorbell names as vnvme.demo reports them).

    @property
    def total_ios(self) -> int:
        return self.ios

    @property
    def seconds(self) -> float:
        return self.elapsed

    @property
    def sq_doorbells(self) -> int:
        return self.sq_doorbell_mmio

    @property
    def cq_doorbells(self) -> int:
        return self.cq_doorbell_mmio

    def latency_percentiles_us(self, percentiles: Sequence[float]) -> tuple[float, ...]:
        """Completion latency percentiles (both directions) in microseconds; each must be one
        of :data:`FIO_PERCENTILES`. All zero when nothing was measured."""
        if not self.clat.n:
            return tuple(0.0 for _ in percentiles)
        return tuple(self.clat.percentile(p) / 1000 for p in percentiles)

    @property
    def sq_doorbells_per_io(self) -> float:
        return self.sq_doorbell_mmio / self.ios if self.ios else 0.0

    @property
    def cq_doorbells_per_io(self) -> float:
        return self.cq_doorbell_mmio / self.ios if self.ios else 0.0

    @property
    def doorbells_per_io(self) -> float:
        """MMIO doorbell writes (SQ tail + CQ head) per measured I/O."""
        return (self.sq_doorbell_mmio + self.cq_doorbell_mmio) / self.ios if self.ios else 0.0


# Section: verify patterns


def fill_verify_block(view: memoryview, slba: int, generation: int) -> None:
    """Header + a fill derived from (slba, generation), then the CRC-32C of bytes [8, len)."""
    size = len(view)
    word = ((slba + 1) * 0x9E3779B97F4A7C15 ^ (generation + 1) * 0xC2B2AE3D27D4EB4F) & _MASK64
    body = size - VERIFY_HEADER_SIZE
    view[VERIFY_HEADER_SIZE : VERIFY_HEADER_SIZE + (body & ~7)] = _WORD.pack(word) * (body >> 3)
    if body & 7:
        view[size - (body & 7) :] = _WORD.pack(word)[: body & 7]
    _HEADER.pack_into(view, 0, VERIFY_MAGIC, 0, slba, generation, size)
    _CRC.pack_into(view, 4, crc32c(view[8:]))


def check_verify_block(view: memoryview, slba: int, generation: int) -> bool:
    """Whether ``view`` is intact and is the block written for (slba, generation)."""
    magic, crc, got_slba, got_generation, got_size = _HEADER.unpack_from(view)
    return bool(
        magic == VERIFY_MAGIC
        and got_slba == slba
        and got_generation == generation
        and got_size == len(view)
        and crc32c(view[8:]) == crc
    )


# Section: the engine


class _Job:
    """One job: its queue pair, its DMA buffers (one per slot) and what each slot is doing."""

    def __init__(self, index: int, qp: QueuePair, depth: int, seed: int) -> None:
        self.index = index
        self.qp = qp
        self.buffers: list[DmaBuffer] = []
        self.free_slots = list(range(depth - 1, -1, -1))
        self.slot_of: dict[int, int] = {}  # CID -> slot
        self.op_write = [False] * depth
        self.op_block = [0] * depth
        self.op_start = [0] * depth
        self.op_measured = [False] * depth
        self.op_generation = [0] * depth
        self.rng_rw = random.Random(f"vnvme-rw:{seed}:{index}")
        self.rng_offset = random.Random(f"vnvme-offset:{seed}:{index}")
        self.cursor = 0
        self.measured_issued = 0
        self.measured_completed = 0


#: fio counts its own thread; so does the engine where Linux can (RUSAGE_THREAD).
_RUSAGE_WHO: Final = getattr(resource, "RUSAGE_THREAD", resource.RUSAGE_SELF)


@dataclass(frozen=True)
class _Snapshot:
    sq: int
    cq: int
    skipped: int
    interrupts: int | None
    usage: resource.struct_rusage


class _Run:
    def __init__(self, driver: NvmeDriver, spec: JobSpec, clock: Callable[[], int]) -> None:
        self.driver = driver
        self.spec = spec
        self.clock = clock
        self._take_range(driver, spec)
        self.queues = self._take_queues(driver, spec)
        self.verify = spec.verify is not None
        if self.verify and self.blocks <= spec.numjobs * spec.iodepth:
            raise ValueError(
                f"verify needs more blocks in the range ({self.blocks}) than I/Os in flight "
                f"({spec.numjobs} x {spec.iodepth})"
            )
        self.bs = spec.bs
        # The spec's per-command questions, answered once.
        self.randrw = spec.rw == "randrw"
        self.write_only = spec.rw in ("write", "randwrite")
        self.random = spec.is_random
        self.jobs: list[_Job] = []
        self.order = self.jobs  # this round's order of the jobs (see measured)
        self.busy: set[int] = set()
        self.written: dict[int, int] = {}  # block -> generation of its last completed write
        self.written_list: list[int] = []
        self.next_generation = 1
        self.verify_errors = 0
        self.verify_reads = 0
        self.read_lat: list[int] = []
        self.write_lat: list[int] = []
        self.ramp_ios = 0

    def _take_range(self, driver: NvmeDriver, spec: JobSpec) -> None:
        """The blocks of ``bs`` the job may touch: within the namespace, the transfer limit."""
        ns = driver.namespaces.get(spec.nsid)
        if ns is None:
            known = ", ".join(str(n) for n in sorted(driver.namespaces)) or "none"
            raise ValueError(f"namespace {spec.nsid} is not active (active: {known})")
        lba_size = ns.lba_size
        if spec.bs % lba_size:
            raise ValueError(
                f"bs {spec.bs} is not a multiple of the LBA size {lba_size} of namespace {spec.nsid}"
            )
        self.nlb = spec.bs // lba_size
        if self.nlb > 65536:
            raise ValueError(f"bs {spec.bs} is more than 65536 logical blocks")
        mdts = int(driver.controller_info.get("mdts", 0) or 0)
        if mdts:
            limit = (PAGE_SIZE << CAP.MPSMIN.get(driver.cap)) << mdts
            if spec.bs > limit:
                raise ValueError(
                    f"bs {spec.bs} exceeds the controller's maximum transfer (MDTS) of {limit} bytes"
                )
        ns_bytes = ns.nlba * lba_size
        if spec.offset % lba_size:
            raise ValueError(f"offset {spec.offset} is not a multiple of the LBA size {lba_size}")
        if spec.offset >= ns_bytes:
            raise ValueError(f"offset {spec.offset} is beyond namespace {spec.nsid} ({ns_bytes} bytes)")
        size = ns_bytes - spec.offset if spec.size is None else spec.size
        if spec.offset + size > ns_bytes:
            raise ValueError(
                f"offset {spec.offset} + size {size} exceeds namespace {spec.nsid} ({ns_bytes} bytes)"
            )
        self.blocks = size // spec.bs
        if self.blocks < 1:
            raise ValueError(
                f"the range ({size} bytes from offset {spec.offset}) holds no block of bs {spec.bs}"
            )
        self.first_lba = spec.offset // lba_size

    @staticmethod
    def _take_queues(driver: NvmeDriver, spec: JobSpec) -> list[QueuePair]:
        """The jobs' I/O queue pairs, each deep enough for ``iodepth``."""
        if spec.qid is not None:
            if spec.numjobs != 1:
                raise ValueError(f"qid {spec.qid} names the queue of one job, not {spec.numjobs}")
            queues = [driver.queue(spec.qid)]
        elif len(driver.io) < spec.numjobs:
            raise ValueError(
                f"numjobs {spec.numjobs} needs {spec.numjobs} I/O queue pairs; the driver has {len(driver.io)}"
            )
        else:
            queues = driver.io[: spec.numjobs]
        for qp in queues:
            if spec.iodepth > qp.depth - 1:
                raise ValueError(f"iodepth {spec.iodepth} exceeds what queue {qp.qid} holds ({qp.depth - 1})")
        return queues

    # Section: setup and teardown

    def allocate(self) -> None:
        """One DMA buffer per slot, allocated once (``release`` frees them, also after errors)."""
        memory = self.driver.transport.memory
        spec = self.spec
        for index in range(spec.numjobs):
            job = _Job(index, self.queues[index], spec.iodepth, spec.seed)
            self.jobs.append(job)
            for _ in range(spec.iodepth):
                job.buffers.append(memory.alloc(self.bs))

    def release(self) -> None:
        """Free every buffer no command still points at (best effort: take what has completed)."""
        memory = self.driver.transport.memory
        for job in self.jobs:
            if job.slot_of:
                try:
                    for cqe in job.qp.reap():
                        job.slot_of.pop(cqe.cid, None)
                except Exception:  # teardown after another error: take what we can
                    pass
            busy = set(job.slot_of.values())
            for slot, buf in enumerate(job.buffers):
                if slot not in busy:
                    memory.free(buf)
            job.buffers = []

    def snapshot(self) -> _Snapshot:
        stats = self.driver.stats
        interrupts = getattr(stats, "interrupts", None)
        if not isinstance(interrupts, int):
            interrupts = getattr(self.driver.transport, "interrupts_seen", None)
            if not isinstance(interrupts, int):
                interrupts = None
        return _Snapshot(
            stats.sq_doorbell_mmio,
            stats.cq_doorbell_mmio,
            stats.doorbells_skipped,
            interrupts,
            resource.getrusage(_RUSAGE_WHO),
        )

    # Section: commands

    def submit(self, job: _Job, write: bool, block: int, measure_from: int | None) -> int | None:
        """Place one command (no doorbell). With ``measure_from``, read the clock just before
        placing it: the command is measured if that reading is at or after ``measure_from``.
        Returns the reading of a measured command, else None."""
        slot = job.free_slots.pop()
        qp = job.qp
        cid = qp.free_cids[-1]
        buf = job.buffers[slot]
        slba = self.first_lba + block * self.nlb
        if self.verify:
            self.busy.add(block)
            if write:
                generation = self.next_generation
                self.next_generation = generation + 1
                fill_verify_block(buf.view, slba, generation)
                job.op_generation[slot] = generation
        opcode = _WRITE if write else _READ
        sqe = self.driver.io_sqe(
            qp, opcode, self.spec.nsid, slba, self.nlb, buf, length=self.bs, cid_hint=cid
        )
        if measure_from is None:
            start = 0
            measured = False
        else:
            start = self.clock()
            measured = start >= measure_from
        qp.submit(sqe)
        job.slot_of[cid] = slot
        job.op_write[slot] = write
        job.op_block[slot] = block
        job.op_start[slot] = start
        job.op_measured[slot] = measured
        return start if measured else None

    def complete(self, job: _Job, cqe: Cqe, now: int) -> None:
        slot = job.slot_of.pop(cqe.cid, None)
        if slot is None:
            qp = job.qp
            fetched = (cqe.sqhd - 1) % qp.depth
            sqe_cid = int.from_bytes(qp.sq_mem.view[fetched * 64 + 2 : fetched * 64 + 4], "little")
            raise RuntimeError(
                f"queue {qp.qid}: completion for CID {cqe.cid} (SQ head {cqe.sqhd}), which is not "
                f"in flight (in flight: {sorted(job.slot_of)}; host SQ tail {qp.sq_tail}, CQ head "
                f"{qp.cq_head} phase {qp.cq_phase}; the host's SQE in slot {fetched} has CID {sqe_cid})"
            )
        write = job.op_write[slot]
        if cqe.status:
            job.free_slots.append(slot)
            raise NvmeError(f"bench {'write' if write else 'read'} I/O", cqe)
        block = job.op_block[slot]
        if self.verify:
            self.busy.discard(block)
            if write:
                if block not in self.written:
                    self.written_list.append(block)
                self.written[block] = job.op_generation[slot]
            else:
                self.verify_reads += 1
                slba = self.first_lba + block * self.nlb
                if not check_verify_block(job.buffers[slot].view, slba, self.written[block]):
                    self.verify_errors += 1
        if job.op_measured[slot]:
            (self.write_lat if write else self.read_lat).append(now - job.op_start[slot])
            job.measured_completed += 1
        job.free_slots.append(slot)

    def next_op(self, job: _Job) -> tuple[bool, int]:
        """The next command of a job in the measured phase: (write, block)."""
        spec = self.spec
        blocks = self.blocks
        write = job.rng_rw.randrange(100) >= spec.rwmixread if self.randrw else self.write_only
        if not self.verify:
            if self.random:
                return write, job.rng_offset.randrange(blocks)
            block = job.cursor
            job.cursor = block + 1 if block + 1 < blocks else 0
            return write, block
        busy = self.busy
        if self.randrw and not write:
            candidates = self.written_list
            if candidates:
                for _ in range(16):
                    block = candidates[job.rng_offset.randrange(len(candidates))]
                    if block not in busy:
                        return False, block
            write = True  # nothing written (and idle) to read yet
        if self.random:
            while True:
                block = job.rng_offset.randrange(blocks)
                if block not in busy:
                    return write, block
        while True:  # blocks > commands in flight, so some block is free
            block = job.cursor
            job.cursor = block + 1 if block + 1 < blocks else 0
            if block not in busy:
                return write, block

    def reap(self) -> tuple[int, int]:
        """Reap every queue once (block on the first busy one if none had anything).

        Returns (clock reading, completions)."""
        batches: list[tuple[_Job, list[Cqe]]] = []
        first: _Job | None = None
        for job in self.order:
            if job.slot_of:
                if first is None:
                    first = job
                got = job.qp.reap()
                if got:
                    batches.append((job, got))
        if not batches:
            assert first is not None
            batches.append((first, first.qp.wait()))
        now = self.clock()
        count = 0
        failure: NvmeError | None = None
        for job, cqes in batches:
            for cqe in cqes:
                try:
                    self.complete(job, cqe, now)
                except NvmeError as exc:  # account for the whole batch first
                    failure = failure or exc
            count += len(cqes)
        if failure is not None:
            raise failure
        return now, count

    # Section: phases

    def unmeasured(self, ops: Iterator[tuple[bool, int]]) -> None:
        """Run a fixed list of commands (fill, read-back) on every job's queue, not measured."""
        pending = True
        while True:
            if pending:
                for job in self.jobs:
                    submitted = False
                    while job.free_slots:
                        op = next(ops, None)
                        if op is None:
                            pending = False
                            break
                        self.submit(job, op[0], op[1], None)
                        submitted = True
                    if submitted:
                        job.qp.ring_sq()
                    if not pending:
                        break
            if not any(job.slot_of for job in self.jobs):
                if not pending:
                    return
                continue
            self.reap()

    def measured(self) -> tuple[int, _Snapshot, _Snapshot]:
        """The measured phase (ramp included). Returns (window ns, counters before, after)."""
        spec = self.spec
        start = self.clock()
        ramp_end = start + round(spec.ramp_time * 1e9)
        deadline = None if spec.runtime is None else ramp_end + round(spec.runtime * 1e9)
        number_ios = spec.number_ios
        iodepth = spec.iodepth
        window_start: int | None = None
        before: _Snapshot | None = None
        last_reap = start
        stopping = False
        batch = spec.iodepth_batch_submit or iodepth
        jobs = self.jobs
        rotate = len(jobs) > 1
        while True:
            if rotate:
                # Each round starts one job later: the queue rung last in a round has its
                # completions last, often after that round's reap has passed it, and would miss
                # every other round if it were always the same one.
                jobs = self.order = jobs[1:] + jobs[:1]
            if not stopping:
                for job in jobs:
                    submitted = 0
                    for _ in range(iodepth - len(job.slot_of)):
                        if number_ios is not None and job.measured_issued >= number_ios:
                            break
                        write, block = self.next_op(job)
                        if before is None:
                            # Taken before the command that may open the window is placed.
                            candidate = self.snapshot()
                        began = self.submit(job, write, block, ramp_end)
                        submitted += 1
                        if submitted == batch:
                            job.qp.ring_sq()
                            submitted = 0
                        if began is None:
                            self.ramp_ios += 1
                            continue
                        if window_start is None:
                            window_start, before = began, candidate
                        job.measured_issued += 1
                    if submitted:
                        job.qp.ring_sq()
            for job in jobs:  # any(job.slot_of for job in jobs), without a generator per round
                if job.slot_of:
                    break
            else:
                break
            last_reap, _ = self.reap()
            if deadline is not None and last_reap >= deadline:
                stopping = True
        after = self.snapshot()
        if window_start is None or before is None:
            return 0, after, after
        return last_reap - window_start, before, after


def run_job(
    driver: NvmeDriver, spec: JobSpec, *, clock: Callable[[], int] = time.perf_counter_ns
) -> JobResult:
    """Run ``spec`` on ``driver`` (probed) and return what the measured window saw."""
    run = _Run(driver, spec, clock)
    try:
        run.allocate()
        if run.verify and not spec.writes:
            run.unmeasured((True, block) for block in range(run.blocks))
        elapsed, before, after = run.measured()
        if run.verify and spec.writes and run.written:
            run.unmeasured((False, block) for block in sorted(run.written))
    finally:
        run.release()
    interrupts = None
    if before.interrupts is not None and after.interrupts is not None:
        interrupts = after.interrupts - before.interrupts
    return JobResult(
        read=DirectionStats.build(run.read_lat, spec.bs, elapsed),
        write=DirectionStats.build(run.write_lat, spec.bs, elapsed),
        clat=LatencyStats.from_samples(run.read_lat + run.write_lat),
        elapsed_ns=elapsed,
        verify_errors=run.verify_errors,
        verify_reads=run.verify_reads,
        ramp_ios=run.ramp_ios,
        offset=spec.offset,
        size=run.blocks * spec.bs,
        sq_doorbell_mmio=after.sq - before.sq,
        cq_doorbell_mmio=after.cq - before.cq,
        doorbells_skipped=after.skipped - before.skipped,
        interrupts=interrupts,
        user_cpu_ns=round((after.usage.ru_utime - before.usage.ru_utime) * 1e9),
        system_cpu_ns=round((after.usage.ru_stime - before.usage.ru_stime) * 1e9),
        context_switches=(after.usage.ru_nvcsw + after.usage.ru_nivcsw)
        - (before.usage.ru_nvcsw + before.usage.ru_nivcsw),
        major_faults=after.usage.ru_majflt - before.usage.ru_majflt,
        minor_faults=after.usage.ru_minflt - before.usage.ru_minflt,
        job_ios=tuple(job.measured_completed for job in run.jobs),
    )
