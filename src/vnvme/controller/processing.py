"""The controller's command processing: fetch SQ entries, run their handlers, post completions,
then tell the interrupts; the queues' views of guest memory, kept in step with its map. Part of :class:`~vnvme.controller.controller.Controller` (a base class
of it, written apart so each part of the controller has a file of its own); these methods run
on the controller itself, at no cost over methods written in its class.

A CQE is stored as dwords 0-2 first, then dword 3 (CID + status with the phase tag) in one 32-bit
store, so a host polling the phase tag never sees a half-written entry.
"""

from __future__ import annotations

import logging
import struct
from typing import TYPE_CHECKING, Final

from vnvme._mypyc import trait
from vnvme.controller.errors import CommandFailed
from vnvme.controller.queues import CompletionQueue, SubmissionQueue
from vnvme.effects import Effect
from vnvme.memory import GuestMemoryError
from vnvme.spec.commands import CQE_SIZE, FLAGS_FUSE, SQE, SQE_SIZE, opcode_name
from vnvme.spec.status import DNR, Status

if TYPE_CHECKING:
    from vnvme.controller.controller import Controller

log = logging.getLogger("vnvme.controller")

_SQE_UNPACK: Final = SQE.unpack_from
_CQE_HEAD_PACK: Final = struct.Struct("<IIHH").pack_into
# CQE dword 3 on big-endian hosts only; little-endian hosts store it through CompletionQueue.dwords.
_CQE_TAIL_PACK: Final = struct.Struct("<I").pack_into
_FUSE_MASK: Final = FLAGS_FUSE.mask


@trait
class CommandProcessing:
    """Fetching, executing and completing commands (a part of Controller)."""

    #: Set while some queue's or doorbell page's memory is not mapped (see _sync_memory).
    _memory_missing: str | None
    #: (sqid, commands left of its burst) when a pass's budget ended that SQ's turn early.
    _cut_turn: tuple[int, int] | None

    def _run_pending(self: Controller, budget: int) -> None:
        if self._fatal or not self.csts & 1:  # not self._ready()
            self._pending.clear()
            return
        if self.memory.generation != self._memory_generation:
            self._sync_memory()
            if self._memory_missing:
                self._memory_gone()
            if self._fatal:
                return
        # Round robin (§4.11): SQs take turns in the order they became pending, each turn up to
        # the Arbitration Burst, and an SQ with commands left goes to the back. The end of a
        # pass is no arbitration event: an SQ whose turn it cut resumes it first in the next
        # pass. Sent to the back instead, the SQs at the cut lost the rest of their turns pass
        # after pass while their neighbours never did: 64 full SQs of 32 entries, 100 commands
        # a pass, and half of them got 40% fewer commands than the other half.
        pending = self._pending
        burst = self.features.arbitration_burst  # Set Features may change it: read per pass
        cut, self._cut_turn = self._cut_turn, None
        while budget > 0 and not self._fatal:
            if cut is not None and cut[0] in pending:
                sqid = cut[0]
                credit = min(cut[1], burst)  # a reset or Set Features since: never beyond AB
                sq = pending.pop(sqid)
            elif pending:
                sqid = next(iter(pending))
                sq = pending.pop(sqid)
                credit = burst
            else:
                break
            cut = None
            if self.sqs[sqid] is not sq or sq.blocked:
                continue
            limit = min(credit, budget)
            taken = self._run_sq(sq, limit)
            budget -= taken
            if taken == limit < credit and pending.get(sqid) is sq:
                # The rest of the turn: no more than the SQ held when it was cut (what the host
                # places meanwhile waits for its next turn, as it would for every other SQ).
                left = min(credit - taken, (sq.tail - sq.head) % sq.size)
                if left:
                    self._cut_turn = (sqid, left)

    def _run_sq(self: Controller, sq: SubmissionQueue, budget: int) -> int:
        """Fetch and execute commands of one SQ; returns how many were taken."""
        cq, n, view = sq.cq, sq.size, sq.view
        execute = self._execute
        processed = attempts = 0
        while True:
            if sq.shadow_mode:
                tail = self.doorbells.load(sq.doorbell, n)
                if (tail >= n or self.tracing) and self._sq_tail(sq, tail) is None:
                    return processed
                sq.tail = tail
            tail = sq.tail
            head = sq.head
            while head != tail:
                if processed >= budget:
                    self._pending[sq.sqid] = sq
                    return processed
                room = cq.tail + 1  # cq.is_full(), inlined: once per command
                if room == cq.size:
                    room = 0
                if room == cq.head and not self._make_room(cq):
                    sq.blocked = True
                    return processed
                if sq.remote and not self._fetch_remote_sqe(sq, head):
                    return processed
                fields = _SQE_UNPACK(view, head * SQE_SIZE)
                head += 1
                if head == n:
                    head = 0
                sq.head = head
                processed += 1
                sq.entries += 1
                execute(sq, fields)
                if self._fatal or self.sqs[sq.sqid] is not sq:
                    return processed
                # A command may have switched this queue onto the shadow page (Doorbell
                # Buffer Config) or changed the tail; re-evaluate from the top.
                if sq.shadow_mode and tail != sq.tail:
                    break
            else:
                if not sq.shadow_mode:
                    return processed
                # Idle: the policy says when the host is to ring next.
                ahead = self._sq_ran_dry(sq, processed, attempts, self.now)
                event_idx = (head + ahead) % n  # rearm_event_idx, inlined: once per I/O
                if ahead < 0:  # no doorbell wanted (the edge polls): nothing to probe
                    self._publish_sq_eventidx(sq, event_idx)
                    return processed
                again = self.doorbells.probe(sq.doorbell, event_idx, n)  # _probe_sq, inlined
                if again >= n or self.tracing:
                    self._sq_probed(sq, event_idx, again)  # an invalid value ends the pass
                if again == head or again >= n:
                    self._sq_rearm_won(sq, ahead, attempts)
                    return processed
                # The host moved the tail while we published: it may not ring. Keep going.
                attempts = self._sq_rearm_lost(sq, attempts)
                if attempts < 0:
                    return processed

    def _sq_probed(self: Controller, sq: SubmissionQueue, event_idx: int, value: int) -> None:
        """Trace an SQ probe and report a tail that is not valid (tracing, or a bad value)."""
        if self.tracing:
            self.trace("pci_nvme_update_sq_eventidx", sq.sqid, event_idx)
        self._sq_tail(sq, value)

    def _sq_rearm_won(self: Controller, sq: SubmissionQueue, ahead: int, attempts: int) -> None:
        """The SQ's EventIdx is published and no new tail came meanwhile: the host rings next."""
        sq.rearms_won += 1
        self._rearms_won += 1
        deadline = self._sq_rearmed(sq, ahead, self.now)
        if deadline is not None:
            sq.deadline = deadline
            self._deadlines[sq.sqid] = sq
        elif sq.deadline is not None:
            sq.deadline = None
            self._deadlines.pop(sq.sqid, None)
        if self.tracing:
            self.trace("pci_nvme_rearm", sq.sqid, 1, attempts + 1)

    def _sq_rearm_lost(self: Controller, sq: SubmissionQueue, attempts: int) -> int:
        """A new tail came while EventIdx was published: the attempts so far, or -1 once they are
        exhausted (the SQ stays pending: the next pass looks again)."""
        sq.rearms_lost += 1
        self._rearms_lost += 1
        attempts += 1
        if attempts < self.config.max_rearm_attempts:
            return attempts
        if self.tracing:
            self.trace("pci_nvme_err_rearm_exhausted", sq.sqid, attempts)
        self._pending[sq.sqid] = sq
        return -1

    def _execute(self: Controller, sq: SubmissionQueue, fields: tuple[int, ...]) -> None:
        opcode = fields[0]
        cid = fields[2]
        status = 0  # Status.SUCCESS
        dw0 = 0
        located: CommandFailed | None = None  # a failure naming its own namespace / LBA
        try:
            if sq.sqid == 0:
                self._admin_counts[opcode] += 1
                if self.tracing:
                    self.trace("pci_nvme_admin_cmd", cid, 0, opcode, opcode_name(opcode, True))
                handler = self.admin_handlers.get(opcode)
            else:
                self._io_counts[opcode] += 1
                if self.tracing:
                    self.trace("pci_nvme_io_cmd", cid, fields[3], sq.sqid, opcode, opcode_name(opcode, False))
                handler = self.io_handlers.get(opcode)
            if handler is None:
                raise CommandFailed(Status.INVALID_OPCODE | DNR, "invalid opcode")
            if fields[1] & _FUSE_MASK:
                raise CommandFailed(Status.INVALID_FIELD | DNR, "fused operations are not supported")
            result = handler(self, sq, fields)
            if result is None:
                return  # completed later (Asynchronous Event Request)
            status, dw0 = result
        except CommandFailed as failure:
            status = failure.status
            located = failure
            if self.tracing:
                self.trace("pci_nvme_err_cmd", cid, sq.sqid, opcode, status, failure.reason)
        except GuestMemoryError as unreachable:
            status = Status.DATA_TRANSFER_ERROR | DNR
            if self.tracing:
                self.trace("pci_nvme_err_cmd", cid, sq.sqid, opcode, status, str(unreachable))
        except Exception as bug:  # an emulator bug: fail the command, keep serving
            log.exception("command opcode %#x on sqid %d failed", opcode, sq.sqid)
            self._internal_errors += 1
            status = Status.INTERNAL_ERROR
            if self.tracing:
                self.trace("pci_nvme_err_cmd", cid, sq.sqid, opcode, status, repr(bug))
        if status:
            if located is None or located.nsid is None:
                self.record_error(sq.sqid, cid, status, fields[3])
            else:
                self.record_error(sq.sqid, cid, status, located.nsid, lba=located.lba)
        cq = sq.cq
        room = cq.tail + 1  # post_completion, inlined
        if room == cq.size:
            room = 0
        if room == cq.head or cq.backlog:
            cq.backlog.append((sq, cid, status, dw0))
        else:
            self._write_cqe(cq, sq, cid, status, dw0)

    def record_error(self: Controller, sqid: int, cid: int, status: int, nsid: int, *, lba: int = 0) -> None:
        """A command completes with an error status: counted, and an Error Information entry."""
        self._error_completions += 1
        self.error_log.record(sqid, cid, status, nsid, lba=lba)

    def post_completion(self: Controller, sq: SubmissionQueue, cid: int, status: int, dw0: int) -> None:
        """Post a CQE for a command of ``sq`` (the CQ has room: checked before fetching)."""
        cq = sq.cq
        if cq.is_full() or cq.backlog:
            # Only completions made later (AER, Abort, a Delay's) can find the CQ full; keep
            # them in order and ask for the next head move: a shadow host rings only if asked.
            cq.backlog.append((sq, cid, status, dw0))
            if self._make_room(cq):
                self._drain_backlog(cq)
            return
        self._write_cqe(cq, sq, cid, status, dw0)

    def _write_cqe(
        self: Controller, cq: CompletionQueue, sq: SubmissionQueue, cid: int, status: int, dw0: int
    ) -> None:
        tail = cq.tail
        offset = tail * CQE_SIZE
        view = cq.view
        _CQE_HEAD_PACK(view, offset, dw0 & 0xFFFFFFFF, 0, sq.head, sq.sqid)
        dword3 = cid | (((status << 1) | cq.phase) << 16)
        dwords = cq.dwords
        if dwords is not None:
            dwords[(offset >> 2) + 3] = dword3  # one store: see queues._dwords
        else:  # pragma: no cover - big-endian hosts
            _CQE_TAIL_PACK(view, offset + 12, dword3)
        if cq.remote:
            self._push_remote_cqe(cq, offset)
        tail += 1
        if tail == cq.size:
            tail = 0
            cq.phase ^= 1
        cq.tail = tail
        cq.entries += 1
        self._completions += 1
        self._touched_cqs[cq.cqid] = cq
        if self.tracing:
            self.trace("pci_nvme_enqueue_req_completion", cid, cq.cqid, dw0 & 0xFFFFFFFF, status)

    def _fetch_remote_sqe(self: Controller, sq: SubmissionQueue, head: int) -> bool:
        offset = head * SQE_SIZE
        try:
            self.memory.read_into(sq.base + offset, sq.view[offset : offset + SQE_SIZE])
        except GuestMemoryError as exc:
            self._set_fatal(f"sqid {sq.sqid}: entry unreachable: {exc}")
            return False
        return True

    def _push_remote_cqe(self: Controller, cq: CompletionQueue, offset: int) -> None:
        try:
            self.memory.write(cq.base + offset, cq.view[offset : offset + CQE_SIZE])
        except GuestMemoryError as exc:
            self._set_fatal(f"cqid {cq.cqid}: entry unreachable: {exc}")

    def _drain_backlog(self: Controller, cq: CompletionQueue) -> None:
        while cq.backlog and not cq.is_full():
            sq, cid, status, dw0 = cq.backlog.pop(0)
            self._write_cqe(cq, sq, cid, status, dw0)

    def _deliver_interrupts(self: Controller) -> None:
        touched = self._touched_cqs
        held = self._held_irqs
        if held:
            self._held_irqs_due(touched)
        if touched:
            if self._completions_watched:
                holding: list[tuple[CompletionQueue, float]] | None = None
                for cq in touched.values():
                    if cq.shadow_mode:
                        until = self._completions_posted(cq)
                        if until is not None:
                            holding = holding or []
                            holding.append((cq, until))
                        elif held:
                            held.pop(cq.cqid, None)
                if holding:
                    for cq, until in holding:
                        held[cq.cqid] = (cq, until)
                        del touched[cq.cqid]
            if touched:
                self.interrupts.deliver(touched, self.now)
                touched.clear()
        elif self.interrupts.coalescing:
            self.interrupts.deliver_coalesced(self.now)

    def _held_irqs_due(self: Controller, touched: dict[int, CompletionQueue]) -> None:
        """Interrupts the SQ policy holds whose deadline has come: ask it again (as if posted)."""
        now = self.now
        for cqid, (cq, until) in list(self._held_irqs.items()):
            if self.cqs[cqid] is not cq:
                del self._held_irqs[cqid]
            elif now >= until:
                touched[cqid] = cq

    def add_cq(self: Controller, cq: CompletionQueue) -> None:
        self.cqs[cq.cqid] = cq
        self.attach_to_dbbuf(None, cq)

    def add_sq(self: Controller, sq: SubmissionQueue) -> None:
        sq.cq.sqs[sq.sqid] = sq
        self.sqs[sq.sqid] = sq
        self.attach_to_dbbuf(sq, None)

    def remove_sq(self: Controller, sq: SubmissionQueue) -> None:
        del sq.cq.sqs[sq.sqid]
        self.sqs[sq.sqid] = None
        sq.release()
        self._pending.pop(sq.sqid, None)

    def remove_cq(self: Controller, cq: CompletionQueue) -> None:
        self.cqs[cq.cqid] = None
        self._touched_cqs.pop(cq.cqid, None)
        self._held_irqs.pop(cq.cqid, None)
        cq.release()

    # Section: the guest's memory map

    def memory_changed(self: Controller) -> list[Effect]:
        """The guest memory map changed (DMA map / unmap): drop every view into the old map now,
        so the caller can unmap the memory behind it. A queue whose memory is gone is fatal only
        once the controller needs it: a client that remaps memory in several steps (QEMU does,
        whenever the guest's memory layout changes, e.g. while the firmware runs) may take it
        away and give it back between two accesses."""
        self._sync_memory()
        return self._take_effects()

    def _memory_gone(self: Controller) -> None:
        """The host took memory away from under live queues and then used them: drop the
        queues (no view may survive the unmap) and report CFS; the host must reset (§9.5)."""
        reason = self._memory_missing or "queue or doorbell memory unmapped"
        self._drop_queues()
        self._set_fatal(f"queue or doorbell memory unmapped: {reason}")

    def _sync_memory(self: Controller) -> None:
        """Look every cached view up again; release them all first so none outlives its region."""
        self._memory_generation = self.memory.generation
        queues = [q for q in (*self.cqs, *self.sqs) if q is not None]
        for queue in queues:
            queue.drop_view()
        if self._memory_missing is None:
            self._dbbuf_wanted = (
                self.doorbells.active,
                self.doorbells.shadow_addr,
                self.doorbells.eventidx_addr,
                self.doorbells.page_size,
            )
        was_active, shadow_addr, eventidx_addr, page_size = self._dbbuf_wanted
        self.doorbells.reset()
        try:
            for cq in self.cqs:
                if cq is not None:
                    view, cq.remote = self.memory.window(cq.base, cq.size * CQE_SIZE, write=True)
                    cq.set_view(view)
            for sq in self.sqs:
                if sq is not None:
                    sq.view, sq.remote = self.memory.window(sq.base, sq.size * SQE_SIZE)
            if was_active:
                self.doorbells.configure(self.memory, shadow_addr, eventidx_addr, page_size)
            self._memory_missing = None
        except GuestMemoryError as exc:
            # Not fatal yet (see memory_changed): no view is kept, and every path that would
            # touch a queue or a doorbell page checks _memory_missing first.
            for queue in queues:
                queue.drop_view()
            self.doorbells.reset()
            self._memory_missing = str(exc)
            if self.tracing:
                self.trace("pci_nvme_memory_missing", str(exc))

    def _drop_queues(self: Controller) -> None:
        self._memory_missing = None
        for queues in (self.sqs, self.cqs):
            for qid, queue in enumerate(queues):
                if queue is not None:
                    queue.release()
                    queues[qid] = None
        self.doorbells.reset()
        self._pending.clear()
        self._touched_cqs.clear()
