"""A host NVMe driver that behaves like Linux nvme-pci (drivers/nvme/host/pci.c).

Bring-up: disable, program AQA / ASQ / ACQ, enable and wait for CSTS.RDY (CAP.TO), Identify,
Set Features Number of Queues, Doorbell Buffer Config when OACS bit 8 is set (on failure free the
pages and carry on), create I/O CQ / SQ pairs. I/O queues use the shadow doorbells with the
``need_event`` rule; the admin queue rings MMIO as Linux does, unless ``admin_shadow`` is set.
Doorbell Buffer Config is sent again after every controller reset.

It is also the test double for every controller test: tests drive the controller as a host would.
"""

from __future__ import annotations

import struct
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Final

from vnvme.driver.transport import PAGE_SIZE, DmaBuffer, HostTransport
from vnvme.fence import full_fence
from vnvme.memory import DwordPage
from vnvme.spec import registers as regs
from vnvme.spec.commands import (
    CQE,
    CQE_SIZE,
    CQE_SIZE_LOG2,
    SQE,
    SQE_SIZE,
    SQE_SIZE_LOG2,
    AdminOpcode,
    Cns,
    Cqe,
    FeatureId,
    LogPageId,
    NvmOpcode,
    Sqe,
)
from vnvme.spec.dbbuf import cq_slot, need_event, sq_slot
from vnvme.spec.identify import (
    IDENTIFY_CONTROLLER,
    IDENTIFY_NAMESPACE,
    IDENTIFY_SIZE,
    NSATTR_WRITE_PROTECTED,
    Oacs,
)
from vnvme.spec.registers import AQA, CAP, CC, CSTS, Reg
from vnvme.spec.status import describe

_CQE_UNPACK: Final = CQE.unpack_from
_CQE_HEAD_UNPACK: Final = struct.Struct("<IIHH").unpack_from
# CQE dword 3 in one native 4-byte load on little-endian hosts (pairs with the controller's store).
_DW3_UNPACK: Final = struct.Struct("@I" if sys.byteorder == "little" else "<I").unpack_from
_SQE_PACK: Final = SQE.pack_into
_CID_PACK: Final = struct.Struct("<H").pack_into
_NEW_CQE: Final = tuple.__new__  # Cqe(...) without the Python-level namedtuple __new__
_NEW_SQE: Final = tuple.__new__
_FUA: Final = 1 << 30


#: Test-only host bugs, one per rule of the host-protocol checker (vnvme.controller.hostcheck),
#: named after the rule each breaks: :meth:`NvmeDriver.inject_host_fault` arms one, the driver
#: commits it once at its next chance (on an I/O queue; ``cid_reused`` on the admin queue) and
#: behaves again. Armed, the queue pairs run as :class:`_FaultyQueuePair`: unarmed, the driver
#: pays nothing for them. ``sq_overrun`` needs doorbell writes that reach the controller before
#: it runs (posted writes): only then are commands left unfetched when the bad tail comes.
HOST_FAULTS: Final = frozenset(
    {
        "doorbell_invalid_queue",  # rings the SQ doorbell of a queue it never created
        "shadow_slot_invalid_queue",  # stores a tail into the shadow slot of such a queue
        "sq_tail_out_of_range",  # rings an SQ tail equal to the queue size
        "cq_head_out_of_range",  # rings a CQ head equal to the queue size
        "cq_head_past_tail",  # rings a CQ head one past the entries it reaped
        "sq_overrun",  # rings its tail, then the tail one behind it, then the tail again
        "cid_reused",  # gives an admin command the CID of its outstanding AER
        "mmio_ahead_of_shadow",  # stores tail - 1 in the shadow slot but rings tail
        "ring_not_needed",  # rings the same tail twice
        "ring_possibly_missed",  # stores its tail in the shadow slot and does not ring
        "prp_invalid",  # a PRP1 that is not dword aligned
        "sgl_invalid",  # an SGL whose first descriptor has a reserved type
    }
)


class NvmeError(Exception):
    """A command completed with an error status."""

    def __init__(self, what: str, cqe: Cqe) -> None:
        super().__init__(f"{what}: {describe(cqe.status)} (status {cqe.status:#x})")
        self.cqe = cqe
        self.status = cqe.status


class NvmeTimeout(Exception):
    """The controller did not answer in time (lost doorbell, dead controller)."""


@dataclass
class DriverStatistics:
    """What the host did (the controller counts what it saw; both should agree)."""

    sq_doorbell_mmio: int = 0
    cq_doorbell_mmio: int = 0
    admin_sq_doorbell_mmio: int = 0
    admin_cq_doorbell_mmio: int = 0
    doorbells_skipped: int = 0  # updates the need_event rule let the host keep in memory
    commands: int = 0
    completions: int = 0


@dataclass
class NamespaceInfo:
    nsid: int
    nlba: int
    lba_size: int
    raw: dict[str, Any] = field(repr=False, default_factory=dict)

    @property
    def write_protected(self) -> bool:
        """NSATTR bit 0: Linux marks such a disk read-only (set_disk_ro)."""
        return bool(self.raw.get("nsattr", 0) & NSATTR_WRITE_PROTECTED)


class QueuePair:
    """An SQ / CQ pair on the host side: ring memory, tail / head, phase, doorbells."""

    def __init__(
        self,
        driver: NvmeDriver,
        qid: int,
        depth: int,
        vector: int,
        *,
        interrupts: bool = True,
    ) -> None:
        self.driver = driver
        self.qid = qid
        self.depth = depth
        self.vector = vector
        self.interrupts = interrupts
        memory = driver.transport.memory
        self.sq_mem = memory.alloc(depth * SQE_SIZE)
        self.cq_mem = memory.alloc(depth * CQE_SIZE)
        self.sq_tail = 0
        self.last_sq_tail = 0  # shadow value at the last doorbell decision
        self.cq_head = 0
        self.last_cq_head = 0
        self.cq_phase = 1
        self.sq_head = 0  # as last reported by the controller in a CQE
        self.sq_db = regs.sq_tail_doorbell(qid, driver.dstrd)
        self.cq_db = regs.cq_head_doorbell(qid, driver.dstrd)
        self.shadow: DwordPage | None = None
        self.eventidx: DwordPage | None = None
        self.sq_slot = sq_slot(qid, driver.dstrd)
        self.cq_slot = cq_slot(qid, driver.dstrd)
        self.free_cids = list(range(depth - 1, -1, -1))
        self.prp_lists: dict[int, DmaBuffer] = {}
        self.results: dict[int, Cqe] = {}
        self.inflight: set[int] = set()

    # Section: shadow doorbells

    def use_shadow(self, shadow: DwordPage, eventidx: DwordPage) -> None:
        """Use the shadow slots (Linux nvme_dbbuf_init zeroes them when a queue is set up)."""
        shadow.store(self.sq_slot, 0)
        shadow.store(self.cq_slot, 0)
        eventidx.store(self.sq_slot, 0)
        eventidx.store(self.cq_slot, 0)
        self.shadow, self.eventidx = shadow, eventidx

    def stop_shadow(self) -> None:
        self.shadow = self.eventidx = None

    def _update_and_check(self, slot: int, value: int, old: int) -> bool:
        """Linux nvme_dbbuf_update_and_check_event: store the shadow value; full fence; need an
        MMIO only if EventIdx lies in [old, value)."""
        assert self.shadow is not None and self.eventidx is not None
        self.shadow.store(slot, value)
        full_fence()  # store shadow value -> load EventIdx (pairs with the controller's fence)
        return need_event(self.eventidx.load(slot), value, old)

    # Section: submission

    @property
    def outstanding(self) -> int:
        return len(self.inflight)

    def can_submit(self) -> bool:
        # One slot stays empty: a queue of N entries holds at most N - 1 (§4.1).
        return len(self.free_cids) > 1

    def submit(self, sqe: Sqe) -> int:
        """Place a command at the tail (with a fresh CID) without ringing; returns the CID."""
        free_cids = self.free_cids
        if len(free_cids) <= 1:  # can_submit()
            raise RuntimeError(f"queue {self.qid} is full")
        cid = free_cids.pop()
        self.inflight.add(cid)
        view = self.sq_mem.view
        offset = self.sq_tail * SQE_SIZE
        _SQE_PACK(view, offset, *sqe)
        _CID_PACK(view, offset + 2, cid)  # the fresh CID over the one in ``sqe``
        tail = self.sq_tail + 1
        self.sq_tail = 0 if tail == self.depth else tail
        self.driver.stats.commands += 1
        return cid

    def ring_sq(self) -> None:
        """Tell the controller about new entries (blk-mq ``commit_rqs``: once per batch)."""
        tail = self.sq_tail
        if tail == self.last_sq_tail:
            return
        stats = self.driver.stats
        if self.shadow is not None:
            ring = self._update_and_check(self.sq_slot, tail, self.last_sq_tail)
        else:
            ring = True
        self.last_sq_tail = tail
        if ring:
            if self.qid:
                stats.sq_doorbell_mmio += 1
            else:
                stats.admin_sq_doorbell_mmio += 1
            self.driver.transport.mmio_write(self.sq_db, 4, tail)
        else:
            stats.doorbells_skipped += 1

    # Section: completion

    def reap(self) -> list[Cqe]:
        """Take every new CQE (by phase tag), then update the CQ head doorbell once."""
        out: list[Cqe] = []
        view = self.cq_mem.view
        head, phase = self.cq_head, self.cq_phase
        depth = self.depth
        inflight = self.inflight
        free_cids = self.free_cids
        sqhd = 0
        while True:
            # The phase tag first, then the rest (Linux: READ_ONCE(status), dma_rmb()): the
            # device may be writing this entry right now, and the phase bit is its last store.
            offset = head * CQE_SIZE
            dw3 = _DW3_UNPACK(view, offset + 12)[0]
            sf = dw3 >> 16
            if sf & 1 != phase:
                break
            # CID, status and phase all from that one load: they are one store on the device side.
            dw0, dw1, sqhd, sqid = _CQE_HEAD_UNPACK(view, offset)
            cid = dw3 & 0xFFFF
            out.append(_NEW_CQE(Cqe, (dw0, dw1, sqhd, sqid, cid, sf >> 1, sf & 1)))
            if cid in inflight:  # a CQE for a CID not in flight is the controller's bug
                inflight.discard(cid)
                free_cids.append(cid)
            head += 1
            if head == depth:
                head = 0
                phase ^= 1
        if not out:
            return out
        self.cq_head, self.cq_phase = head, phase
        self.sq_head = sqhd
        self.driver.stats.completions += len(out)
        self.ring_cq()
        return out

    def ring_cq(self) -> None:
        head = self.cq_head
        if head == self.last_cq_head:
            return
        stats = self.driver.stats
        if self.shadow is not None:
            ring = self._update_and_check(self.cq_slot, head, self.last_cq_head)
        else:
            ring = True
        self.last_cq_head = head
        if ring:
            if self.qid:
                stats.cq_doorbell_mmio += 1
            else:
                stats.admin_cq_doorbell_mmio += 1
            self.driver.transport.mmio_write(self.cq_db, 4, head)
        else:
            stats.doorbells_skipped += 1

    def wait(self, timeout: float | None = None) -> list[Cqe]:
        """Reap at least one CQE, waiting for the interrupt (or polling) up to ``timeout``."""
        transport = self.driver.transport
        limit = self.driver.command_timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        while True:
            got = self.reap()
            if got:
                return got
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise NvmeTimeout(f"queue {self.qid}: no completion within {limit} s")
            if self.interrupts:
                if not transport.wait_for_interrupt(self.vector, remaining):
                    got = self.reap()
                    if got:
                        return got
                    raise NvmeTimeout(f"queue {self.qid}: no completion and no interrupt")
            else:
                transport.device_idle()

    def prp_for(self, cid: int, buf: DmaBuffer, offset: int, length: int) -> tuple[int, int]:
        """PRP1 / PRP2 for ``length`` bytes of ``buf`` from ``offset`` (Linux nvme_setup_prps)."""
        addr = buf.addr + offset
        first = PAGE_SIZE - (addr & (PAGE_SIZE - 1))
        if length <= first:
            return addr, 0
        rest = length - first
        second = addr + first
        if rest <= PAGE_SIZE:
            return addr, second
        pages = -(-rest // PAGE_SIZE)
        entries_per_page = PAGE_SIZE // 8
        # One list page per 511 entries (the last slot chains to the next page).
        list_pages = 1 if pages <= entries_per_page else -(-(pages - 1) // (entries_per_page - 1))
        lst = self.prp_lists.get(cid)
        if lst is None or lst.size < list_pages * PAGE_SIZE:
            if lst is not None:
                self.driver.transport.memory.free(lst)
            lst = self.driver.transport.memory.alloc(list_pages * PAGE_SIZE)
            self.prp_lists[cid] = lst
        entries = [second + i * PAGE_SIZE for i in range(pages)]
        slot = 0
        page_index = 0
        for index, entry in enumerate(entries):
            last_in_page = slot == entries_per_page - 1
            if last_in_page and index < len(entries) - 1:
                page_index += 1
                struct.pack_into(
                    "<Q", lst.view, (page_index - 1) * PAGE_SIZE + slot * 8, lst.addr + page_index * PAGE_SIZE
                )
                slot = 0
            struct.pack_into("<Q", lst.view, page_index * PAGE_SIZE + slot * 8, entry)
            slot += 1
        return addr, lst.addr

    def close(self) -> None:
        memory = self.driver.transport.memory
        for buf in (self.sq_mem, self.cq_mem, *self.prp_lists.values()):
            memory.free(buf)
        self.prp_lists.clear()


class _FaultyQueuePair(QueuePair):
    """A queue pair while a test-only host fault is armed (:data:`HOST_FAULTS`)."""

    def submit(self, sqe: Sqe) -> int:
        driver = self.driver
        fault = driver.host_fault
        if fault in ("prp_invalid", "sgl_invalid") and self.qid and sqe.prp1:
            driver.disarm_host_fault()
            if fault == "prp_invalid":
                sqe = sqe._replace(prp1=sqe.prp1 | 2)
            else:  # PSDT 01b; SGL1 = the buffer, descriptor type Fh (reserved)
                sqe = sqe._replace(flags=0x40, prp2=(0xF0 << 56) | PAGE_SIZE)
            return QueuePair.submit(self, sqe)
        if fault != "cid_reused" or self.qid or not driver._aer_cids:
            return QueuePair.submit(self, sqe)
        # The CID of the outstanding AER; the driver forgets that AER (its CQE, if one comes,
        # matches nothing in flight), so this command's CQE is taken as its own.
        driver.disarm_host_fault()
        cid = driver._aer_cids.pop()
        self.inflight.add(cid)
        offset = self.sq_tail * SQE_SIZE
        _SQE_PACK(self.sq_mem.view, offset, *sqe)
        _CID_PACK(self.sq_mem.view, offset + 2, cid)
        self.sq_tail = (self.sq_tail + 1) % self.depth
        return cid

    def ring_sq(self) -> None:
        driver = self.driver
        fault, tail = driver.host_fault, self.sq_tail
        if not self.qid or tail == self.last_sq_tail:
            return QueuePair.ring_sq(self)
        mmio = driver.transport.mmio_write
        missing = max(qp.qid for qp in driver.io) + 1
        shadow = self.shadow
        if fault == "doorbell_invalid_queue":
            mmio(regs.sq_tail_doorbell(missing, driver.dstrd), 4, 1)
        elif fault == "shadow_slot_invalid_queue" and shadow is not None:
            shadow.store(sq_slot(missing, driver.dstrd), 1)
        elif fault == "sq_tail_out_of_range":
            mmio(self.sq_db, 4, self.depth)
        elif fault == "sq_overrun" and shadow is None:
            mmio(self.sq_db, 4, tail)
            mmio(self.sq_db, 4, (tail - 1) % self.depth)
        elif fault == "mmio_ahead_of_shadow" and shadow is not None:
            behind = (tail - 1) % self.depth
            shadow.store(self.sq_slot, behind)
            full_fence()
            mmio(self.sq_db, 4, tail)
            self.last_sq_tail = behind  # then store tail and ring as need_event says
        elif fault == "ring_not_needed" and shadow is not None:
            QueuePair.ring_sq(self)
            mmio(self.sq_db, 4, tail)
        elif fault == "ring_possibly_missed" and shadow is not None:
            shadow.store(self.sq_slot, tail)
            self.last_sq_tail = tail
            driver.disarm_host_fault()
            return None
        else:
            return QueuePair.ring_sq(self)
        driver.disarm_host_fault()
        return QueuePair.ring_sq(self)

    def ring_cq(self) -> None:
        driver = self.driver
        fault, head = driver.host_fault, self.cq_head
        if self.qid and head != self.last_cq_head and fault in ("cq_head_out_of_range", "cq_head_past_tail"):
            driver.disarm_host_fault()
            bad = self.depth if fault == "cq_head_out_of_range" else (head + 1) % self.depth
            driver.transport.mmio_write(self.cq_db, 4, bad)
        QueuePair.ring_cq(self)


class NvmeDriver:
    """The host side of one controller."""

    def __init__(
        self,
        transport: HostTransport,
        *,
        shadow_doorbells: bool = True,
        admin_shadow: bool = False,
        io_queues: int = 1,
        io_queue_depth: int = 1024,
        admin_queue_depth: int = 32,
        interrupts: bool = True,
        async_events: bool = True,
        command_timeout: float = 5.0,
    ) -> None:
        self.transport = transport
        self.want_shadow = shadow_doorbells
        self.admin_shadow = admin_shadow
        self.io_queue_count = io_queues
        self.io_queue_depth = io_queue_depth
        self.admin_queue_depth = admin_queue_depth
        self.interrupts = interrupts
        self.want_async_events = async_events
        self.command_timeout = command_timeout
        self.stats = DriverStatistics()
        self.cap = 0
        self.dstrd = 0
        self.admin: QueuePair | None = None
        self.io: list[QueuePair] = []
        self.controller_info: dict[str, Any] = {}
        self.namespaces: dict[int, NamespaceInfo] = {}
        self.dbbuf_pages: tuple[DmaBuffer, DmaBuffer] | None = None
        self.dbbuf_enabled = False
        self.async_event_log: list[int] = []
        self._aer_cids: set[int] = set()
        self._shadow_pages: tuple[DwordPage, DwordPage] | None = None
        #: The armed test-only host fault (:data:`HOST_FAULTS`), None once committed.
        self.host_fault: str | None = None

    def inject_host_fault(self, name: str) -> None:
        """Arm one of :data:`HOST_FAULTS` (test only): committed once, at its next chance."""
        if name not in HOST_FAULTS:
            raise ValueError(f"unknown host fault {name!r}")
        self.host_fault = name
        for qp in (self.admin, *self.io):
            if qp is not None:
                qp.__class__ = _FaultyQueuePair

    def disarm_host_fault(self) -> None:
        self.host_fault = None
        for qp in (self.admin, *self.io):
            if qp is not None:
                qp.__class__ = QueuePair

    # Section: registers

    def read_reg(self, reg: Reg) -> int:
        return self.transport.mmio_read(reg, regs.REGISTER_WIDTH[reg])

    def write_reg(self, reg: Reg, value: int) -> None:
        self.transport.mmio_write(reg, regs.REGISTER_WIDTH[reg], value)

    def _wait_ready(self, ready: bool) -> None:
        timeout = max(CAP.TO.get(self.cap), 1) * 0.5
        deadline = time.monotonic() + timeout
        while True:
            csts = self.read_reg(Reg.CSTS)
            if CSTS.CFS.get(csts) and ready:
                raise NvmeTimeout(f"controller fatal status while enabling (CSTS {csts:#x})")
            if CSTS.RDY.get(csts) == int(ready):
                return
            if time.monotonic() > deadline:
                raise NvmeTimeout(f"CSTS.RDY did not become {int(ready)} within CAP.TO")
            time.sleep(0.0005)

    # Section: bring-up

    def probe(self) -> None:
        """Bring the controller up as Linux nvme_reset_work does."""
        self.cap = self.read_reg(Reg.CAP)
        self.dstrd = CAP.DSTRD.get(self.cap)
        self.disable()
        mqes = CAP.MQES.get(self.cap) + 1
        self._free_queues()
        self.admin = QueuePair(self, 0, min(self.admin_queue_depth, mqes), 0, interrupts=True)
        depth = self.admin.depth
        self.write_reg(Reg.AQA, regs.compose((AQA.ASQS, depth - 1), (AQA.ACQS, depth - 1)))
        self.write_reg(Reg.ASQ, self.admin.sq_mem.addr)
        self.write_reg(Reg.ACQ, self.admin.cq_mem.addr)
        self.write_reg(
            Reg.CC,
            regs.compose(
                (CC.EN, 1),
                (CC.CSS, 0),
                (CC.MPS, 0),
                (CC.AMS, 0),
                (CC.IOSQES, SQE_SIZE_LOG2),
                (CC.IOCQES, CQE_SIZE_LOG2),
            ),
        )
        self._wait_ready(True)
        self.controller_info = self.identify_controller()
        self.namespaces = {}
        for nsid in self.active_namespaces():
            self.namespaces[nsid] = self.identify_namespace(nsid)
        count = self.set_number_of_queues(self.io_queue_count)
        self._setup_dbbuf()
        self.io = []
        for qid in range(1, count + 1):
            self.create_io_queue_pair(qid, min(self.io_queue_depth, mqes))
        if self.want_async_events:
            self._submit_async_event_request()

    def disable(self) -> None:
        cc = self.read_reg(Reg.CC)
        if CC.EN.get(cc) or CSTS.RDY.get(self.read_reg(Reg.CSTS)):
            self.write_reg(Reg.CC, CC.SHN.put(CC.EN.put(cc, 0), 0))
            self._wait_ready(False)
        # A reset forgets the shadow doorbell buffers; queues must be set up again.
        self.dbbuf_enabled = False
        for qp in self.io:
            qp.stop_shadow()

    def reset_controller(self) -> None:
        """Controller reset and full re-initialisation, Doorbell Buffer Config included."""
        self.probe()

    def shutdown(self) -> None:
        """CC.SHN = normal; wait for CSTS.SHST = complete (the controller flushes first)."""
        cc = self.read_reg(Reg.CC)
        self.write_reg(Reg.CC, CC.SHN.put(cc, regs.ShutdownNotification.NORMAL))
        deadline = time.monotonic() + max(CAP.TO.get(self.cap), 1) * 0.5
        while CSTS.SHST.get(self.read_reg(Reg.CSTS)) != regs.ShutdownStatus.COMPLETE:
            if time.monotonic() > deadline:
                raise NvmeTimeout("shutdown did not complete")
            time.sleep(0.0005)

    def _free_queues(self) -> None:
        for qp in self.io:
            qp.close()
        self.io = []
        if self.admin is not None:
            self.admin.close()
            self.admin = None
        self._aer_cids.clear()

    def close(self) -> None:
        self._free_queues()
        if self.dbbuf_pages is not None:
            self._release_dbbuf_pages()

    def _release_dbbuf_pages(self) -> None:
        assert self.dbbuf_pages is not None
        if self._shadow_pages is not None:
            for page in self._shadow_pages:
                page.release()
            self._shadow_pages = None
        for buf in self.dbbuf_pages:
            self.transport.memory.free(buf)
        self.dbbuf_pages = None

    def _setup_dbbuf(self) -> None:
        """Doorbell Buffer Config if OACS bit 8 says so (Linux nvme_dbbuf_set)."""
        self.dbbuf_enabled = False
        if not self.want_shadow or not self.controller_info["oacs"] & Oacs.DOORBELL_BUFFER_CONFIG:
            return
        memory = self.transport.memory
        if self.dbbuf_pages is None:
            self.dbbuf_pages = (memory.alloc(PAGE_SIZE), memory.alloc(PAGE_SIZE))
            self._shadow_pages = (DwordPage(self.dbbuf_pages[0].view), DwordPage(self.dbbuf_pages[1].view))
        else:
            for buf in self.dbbuf_pages:
                buf.view[:] = bytes(PAGE_SIZE)
        shadow, eventidx = self.dbbuf_pages
        cqe = self.admin_command(
            AdminOpcode.DOORBELL_BUFFER_CONFIG, prp1=shadow.addr, prp2=eventidx.addr, check=False
        )
        if cqe.status:
            # Linux frees the pages and carries on with plain doorbells.
            self._release_dbbuf_pages()
            return
        self.dbbuf_enabled = True
        if self.admin_shadow and self.admin is not None:
            assert self._shadow_pages is not None
            # The controller wrote the admin queue's current values into its slots.
            self.admin.shadow, self.admin.eventidx = self._shadow_pages
            self.admin.last_sq_tail = self.admin.sq_tail
            self.admin.last_cq_head = self.admin.cq_head

    # Section: admin commands

    def admin_command(
        self,
        opcode: int,
        *,
        nsid: int = 0,
        prp1: int = 0,
        prp2: int = 0,
        cdw10: int = 0,
        cdw11: int = 0,
        cdw12: int = 0,
        cdw13: int = 0,
        cdw14: int = 0,
        cdw15: int = 0,
        flags: int = 0,
        check: bool = True,
    ) -> Cqe:
        admin = self.admin
        if admin is None:
            raise RuntimeError("controller not probed")
        sqe = Sqe(opcode, flags, 0, nsid, 0, 0, 0, prp1, prp2, cdw10, cdw11, cdw12, cdw13, cdw14, cdw15)
        cid = admin.submit(sqe)
        admin.ring_sq()
        cqe = self._wait_cid(admin, cid)
        if check and cqe.status:
            raise NvmeError(f"admin opcode {opcode:#x}", cqe)
        return cqe

    def _wait_cid(self, qp: QueuePair, cid: int) -> Cqe:
        while cid not in qp.results:
            for cqe in qp.wait():
                if qp.qid == 0 and cqe.cid in self._aer_cids:
                    self._aer_cids.discard(cqe.cid)
                    if cqe.status == 0:
                        self.async_event_log.append(cqe.dw0)
                    continue
                qp.results[cqe.cid] = cqe
        return qp.results.pop(cid)

    def _submit_async_event_request(self) -> None:
        admin = self.admin
        assert admin is not None
        cid = admin.submit(Sqe(AdminOpcode.ASYNC_EVENT_REQUEST, 0, 0, 0, 0, 0, 0, 0, 0))
        self._aer_cids.add(cid)
        admin.ring_sq()

    def _read_data(self, length: int, **command: Any) -> tuple[Cqe, bytes]:
        buf = self.transport.memory.alloc(length)
        try:
            prp2 = buf.addr + PAGE_SIZE if length > PAGE_SIZE else 0
            if length > 2 * PAGE_SIZE:
                raise ValueError("admin data transfers here are at most two pages")
            cqe = self.admin_command(prp1=buf.addr, prp2=prp2, **command)
            return cqe, bytes(buf.view[:length])
        finally:
            self.transport.memory.free(buf)

    def identify(self, cns: int, nsid: int = 0) -> bytes:
        return self._read_data(IDENTIFY_SIZE, opcode=AdminOpcode.IDENTIFY, nsid=nsid, cdw10=cns)[1]

    def identify_controller(self) -> dict[str, Any]:
        return IDENTIFY_CONTROLLER.unpack(self.identify(Cns.CONTROLLER))

    def active_namespaces(self) -> list[int]:
        data = self.identify(Cns.ACTIVE_NAMESPACE_LIST)
        ids = struct.unpack(f"<{IDENTIFY_SIZE // 4}I", data)
        return [nsid for nsid in ids if nsid][: IDENTIFY_SIZE // 4]

    def identify_namespace(self, nsid: int) -> NamespaceInfo:
        raw = IDENTIFY_NAMESPACE.unpack(self.identify(Cns.NAMESPACE, nsid))
        return NamespaceInfo(nsid, raw["nsze"], 1 << raw["lbaf0_lbads"], raw)

    def get_features(self, fid: int, *, cdw11: int = 0, sel: int = 0, nsid: int = 0) -> int:
        return self.admin_command(
            AdminOpcode.GET_FEATURES, nsid=nsid, cdw10=fid | (sel << 8), cdw11=cdw11
        ).dw0

    def set_features(self, fid: int, cdw11: int, *, nsid: int = 0, save: bool = False) -> int:
        cdw10 = fid | (int(save) << 31)
        return self.admin_command(AdminOpcode.SET_FEATURES, nsid=nsid, cdw10=cdw10, cdw11=cdw11).dw0

    def set_number_of_queues(self, count: int) -> int:
        dw0 = self.set_features(FeatureId.NUMBER_OF_QUEUES, ((count - 1) << 16) | (count - 1))
        return min(count, (dw0 & 0xFFFF) + 1, (dw0 >> 16) + 1)

    def get_log_page(
        self, lid: int, length: int, *, nsid: int = 0, offset: int = 0, rae: bool = False
    ) -> bytes:
        numd = length // 4 - 1
        cdw10 = lid | (int(rae) << 15) | ((numd & 0xFFFF) << 16)
        return self._read_data(
            length,
            opcode=AdminOpcode.GET_LOG_PAGE,
            nsid=nsid,
            cdw10=cdw10,
            cdw11=numd >> 16,
            cdw12=offset & 0xFFFFFFFF,
            cdw13=offset >> 32,
        )[1]

    def smart_log(self) -> bytes:
        return self.get_log_page(LogPageId.SMART_HEALTH, 512)

    def interrupt_vector(self, qid: int) -> int:
        """The MSI-X vector of I/O queue ``qid``: its own (``qid``, vector 0 being the admin
        queue's) while there are enough; with fewer vectors than queues the I/O queues take
        vectors 1.. in turn, and all share vector 0 when it is the only one. (Linux creates no
        more interrupt-driven queues than it has vectors instead, sharing only a single one.)"""
        vectors = self.transport.interrupt_vectors
        if qid < vectors:
            return qid
        return 1 + (qid - 1) % (vectors - 1) if vectors > 1 else 0

    def create_io_queue_pair(self, qid: int, depth: int) -> QueuePair:
        vector = self.interrupt_vector(qid) if self.interrupts else 0
        qp = QueuePair(self, qid, depth, vector, interrupts=self.interrupts)
        if self.dbbuf_enabled and self._shadow_pages is not None:
            qp.use_shadow(*self._shadow_pages)
        cq_flags = 1 | (int(self.interrupts) << 1) | (vector << 16)
        self.admin_command(
            AdminOpcode.CREATE_IO_CQ, prp1=qp.cq_mem.addr, cdw10=((depth - 1) << 16) | qid, cdw11=cq_flags
        )
        self.admin_command(
            AdminOpcode.CREATE_IO_SQ,
            prp1=qp.sq_mem.addr,
            cdw10=((depth - 1) << 16) | qid,
            cdw11=(qid << 16) | 1,
        )
        self.io.append(qp)
        return qp

    def delete_io_queue_pair(self, qp: QueuePair) -> None:
        """Delete the SQ, reap what it left on the CQ (commands aborted with SQ Deletion, posted
        before the Delete's completion, §5.6: Linux polls the queue too), delete the CQ."""
        self.admin_command(AdminOpcode.DELETE_IO_SQ, cdw10=qp.qid)
        for cqe in qp.reap():
            qp.results[cqe.cid] = cqe
        self.admin_command(AdminOpcode.DELETE_IO_CQ, cdw10=qp.qid)
        self.io.remove(qp)
        qp.close()

    # Section: I/O

    def queue(self, qid: int = 1) -> QueuePair:
        for qp in self.io:
            if qp.qid == qid:
                return qp
        raise KeyError(f"no I/O queue {qid}")

    def io_sqe(
        self,
        qp: QueuePair,
        opcode: int,
        nsid: int,
        slba: int = 0,
        nlb: int = 0,
        buf: DmaBuffer | None = None,
        *,
        offset: int = 0,
        length: int = 0,
        cdw12_flags: int = 0,
        cid_hint: int | None = None,
    ) -> Sqe:
        """Build an NVM command; PRPs for ``length`` bytes of ``buf`` are set up for the next CID."""
        prp1 = prp2 = 0
        if buf is not None and length:
            prp1 = buf.addr + offset
            if length > PAGE_SIZE - (prp1 & (PAGE_SIZE - 1)):  # more than PRP1's page holds
                cid = qp.free_cids[-1] if cid_hint is None else cid_hint
                prp1, prp2 = qp.prp_for(cid, buf, offset, length)
        # Sqe(...) through tuple.__new__: no Python-level namedtuple __new__ per command.
        return _NEW_SQE(
            Sqe,
            (
                opcode,
                0,
                0,
                nsid,
                0,
                0,
                0,
                prp1,
                prp2,
                slba & 0xFFFFFFFF,
                slba >> 32,
                ((nlb - 1) & 0xFFFF) | cdw12_flags,
                0,
                0,
                0,
            ),
        )

    def io_command(self, qp: QueuePair, sqe: Sqe, *, check: bool = True) -> Cqe:
        cid = qp.submit(sqe)
        qp.ring_sq()
        cqe = self._wait_cid(qp, cid)
        if check and cqe.status:
            raise NvmeError(f"I/O opcode {sqe.opcode:#x}", cqe)
        return cqe

    def read(self, nsid: int, slba: int, nlb: int, *, qid: int = 1) -> bytes:
        ns = self.namespaces[nsid]
        length = nlb * ns.lba_size
        buf = self.transport.memory.alloc(length, zero=False)
        try:
            qp = self.queue(qid)
            self.io_command(qp, self.io_sqe(qp, NvmOpcode.READ, nsid, slba, nlb, buf, length=length))
            return bytes(buf.view)
        finally:
            self.transport.memory.free(buf)

    def write(self, nsid: int, slba: int, data: bytes, *, fua: bool = False, qid: int = 1) -> None:
        ns = self.namespaces[nsid]
        if len(data) % ns.lba_size:
            raise ValueError("data must be whole logical blocks")
        buf = self.transport.memory.alloc(len(data), zero=False)
        try:
            buf.view[:] = data
            qp = self.queue(qid)
            sqe = self.io_sqe(
                qp,
                NvmOpcode.WRITE,
                nsid,
                slba,
                len(data) // ns.lba_size,
                buf,
                length=len(data),
                cdw12_flags=_FUA if fua else 0,
            )
            self.io_command(qp, sqe)
        finally:
            self.transport.memory.free(buf)

    def flush(self, nsid: int, *, qid: int = 1) -> None:
        qp = self.queue(qid)
        self.io_command(qp, self.io_sqe(qp, NvmOpcode.FLUSH, nsid))

    def write_zeroes(self, nsid: int, slba: int, nlb: int, *, deallocate: bool = False, qid: int = 1) -> None:
        qp = self.queue(qid)
        self.io_command(
            qp, self.io_sqe(qp, NvmOpcode.WRITE_ZEROES, nsid, slba, nlb, cdw12_flags=int(deallocate) << 25)
        )

    def deallocate(self, nsid: int, ranges: Iterable[tuple[int, int]], *, qid: int = 1) -> None:
        """Dataset Management with AD set; ``ranges`` are (slba, nlb)."""
        items = list(ranges)
        raw = b"".join(struct.pack("<IIQ", 0, nlb, slba) for slba, nlb in items)
        buf = self.transport.memory.alloc(len(raw))
        try:
            buf.view[:] = raw
            qp = self.queue(qid)
            sqe = self.io_sqe(qp, NvmOpcode.DATASET_MANAGEMENT, nsid, buf=buf, length=len(raw))
            sqe = sqe._replace(cdw10=len(items) - 1, cdw11=1 << 2, cdw12=0)
            self.io_command(qp, sqe)
        finally:
            self.transport.memory.free(buf)

    def compare(self, nsid: int, slba: int, data: bytes, *, qid: int = 1) -> bool:
        ns = self.namespaces[nsid]
        buf = self.transport.memory.alloc(len(data), zero=False)
        try:
            buf.view[:] = data
            qp = self.queue(qid)
            sqe = self.io_sqe(
                qp, NvmOpcode.COMPARE, nsid, slba, len(data) // ns.lba_size, buf, length=len(data)
            )
            cqe = self.io_command(qp, sqe, check=False)
            if cqe.status == 0:
                return True
            if cqe.status & 0x7FF == 0x285:  # Compare Failure
                return False
            raise NvmeError("compare", cqe)
        finally:
            self.transport.memory.free(buf)
