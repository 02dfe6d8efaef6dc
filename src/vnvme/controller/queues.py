"""Submission and completion queues as the controller sees them."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

from vnvme.controller.doorbells import QueueDoorbell


@dataclass(frozen=True)
class QueueStatistics:
    qid: int
    is_cq: bool
    size: int
    #: Trapped (BAR) doorbell writes to this queue.
    mmio_doorbell_writes: int
    #: Reads of this queue's slot in the shadow doorbell page.
    shadow_reads: int
    #: Writes of this queue's slot in the EventIdx page.
    eventidx_writes: int
    #: SQ: commands fetched. CQ: completions posted.
    entries: int
    #: SQ only: EventIdx publications that found no new tail (won) / a new one (lost).
    rearms_won: int = 0
    rearms_lost: int = 0
    #: Whether the queue currently reads its doorbell from the shadow page.
    shadow_mode: bool = False
    #: SQ only: the EventIdx policy's predictions the host met (rang) / missed (the controller
    #: looked after a deadline), and larger batches it offered (ADAPTIVE).
    predictions_met: int = 0
    predictions_missed: int = 0
    batch_offers: int = 0
    #: CQ only: interrupts raised on its vector (shared by every CQ on that vector).
    interrupts: int = 0


class SubmissionQueue:
    __slots__ = (
        "sqid",
        "cq",
        "size",
        "base",
        "priority",
        "head",
        "tail",
        "view",
        "remote",
        "doorbell",
        "shadow_mode",
        "mmio_writes",
        "blocked",
        "entries",
        "rearms_won",
        "rearms_lost",
        "policy_state",
        "deadline",
    )

    def __init__(
        self, sqid: int, cq: CompletionQueue, size: int, base: int, view: memoryview, slot: int
    ) -> None:
        self.sqid = sqid
        self.cq = cq
        self.size = size
        self.base = base
        self.priority = 0
        self.head = 0
        # The tail as last learnt (from a BAR doorbell write or the shadow slot).
        self.tail = 0
        self.view = view
        # The ring lives in remote memory: ``view`` is a local mirror, fetched entry by entry.
        self.remote = False
        self.doorbell = QueueDoorbell(slot)
        # Whether the queue follows its shadow slot (Doorbell Buffer Config) instead of BAR writes.
        self.shadow_mode = False
        self.mmio_writes = 0  # trapped doorbell writes
        self.blocked = False  # waiting for room in its CQ
        self.entries = 0
        self.rearms_won = 0
        self.rearms_lost = 0
        # The SQ EventIdx policy's own state for this queue (see controller/eventidx.py), and
        # the deadline it asked for: when the controller looks at the shadow tail by itself.
        self.policy_state: Any = None
        self.deadline: float | None = None

    def release(self) -> None:
        """Drop the view of guest memory (queue deleted or controller reset)."""
        self.view.release()

    def drop_view(self) -> None:
        self.view.release()

    def statistics(self) -> QueueStatistics:
        return QueueStatistics(
            qid=self.sqid,
            is_cq=False,
            size=self.size,
            mmio_doorbell_writes=self.mmio_writes,
            shadow_reads=self.doorbell.shadow_reads,
            eventidx_writes=self.doorbell.eventidx_writes,
            entries=self.entries,
            rearms_won=self.rearms_won,
            rearms_lost=self.rearms_lost,
            shadow_mode=self.shadow_mode,
        )


def _dwords(view: memoryview) -> memoryview | None:
    """The ring as native dwords, so CQE dword 3 (CID, status, phase tag) is one 4-byte store.
    struct.pack_into zero-fills its destination before writing it: a host polling the phase tag
    from another CPU could see that zero, a phase tag of 0 with CID 0 (seen in vnvme bench runs)."""
    if sys.byteorder != "little" or len(view) % 4:
        return None
    return view.cast("I")


class CompletionQueue:
    __slots__ = (
        "cqid",
        "size",
        "base",
        "head",
        "tail",
        "phase",
        "ien",
        "vector",
        "view",
        "remote",
        "doorbell",
        "shadow_mode",
        "mmio_writes",
        "sqs",
        "entries",
        "waiting_for_room",
        "backlog",
        "irq_mark",
        "dwords",
    )

    def __init__(
        self,
        cqid: int,
        size: int,
        base: int,
        view: memoryview,
        slot: int,
        *,
        ien: bool,
        vector: int,
    ) -> None:
        self.cqid = cqid
        self.size = size
        self.base = base
        # The head as last learnt; the controller may know less than the host has consumed.
        self.head = 0
        self.tail = 0
        self.phase = 1
        self.ien = ien
        self.vector = vector
        self.view = view
        self.dwords = _dwords(view)
        # The ring lives in remote memory: ``view`` is a local mirror, each CQE pushed out.
        self.remote = False
        self.doorbell = QueueDoorbell(slot)
        # Whether the queue follows its shadow slot (Doorbell Buffer Config) instead of BAR writes.
        self.shadow_mode = False
        self.mmio_writes = 0  # trapped doorbell writes
        self.sqs: dict[int, SubmissionQueue] = {}
        self.entries = 0
        # Set while the controller has asked for a head doorbell because the CQ was full.
        self.waiting_for_room = False
        # Completions made outside a fetch (AER, Abort) that found the CQ full, in order.
        self.backlog: list[tuple[SubmissionQueue, int, int, int]] = []
        # ``entries`` when interrupts were last accounted (interrupt coalescing threshold).
        self.irq_mark = 0

    def set_view(self, view: memoryview) -> None:
        self.view = view
        self.dwords = _dwords(view)

    def drop_view(self) -> None:
        if self.dwords is not None:
            self.dwords.release()
        self.view.release()

    def release(self) -> None:
        self.drop_view()
        self.sqs.clear()
        self.backlog.clear()

    def used(self) -> int:
        """Entries posted and not known to be consumed."""
        return (self.tail - self.head) % self.size

    def is_full(self) -> bool:
        # §4.1: a queue is full when the slot after the tail is the head (size - 1 entries).
        nxt = self.tail + 1
        if nxt == self.size:
            nxt = 0
        return nxt == self.head

    def statistics(self) -> QueueStatistics:
        return QueueStatistics(
            qid=self.cqid,
            is_cq=True,
            size=self.size,
            mmio_doorbell_writes=self.mmio_writes,
            shadow_reads=self.doorbell.shadow_reads,
            eventidx_writes=self.doorbell.eventidx_writes,
            entries=self.entries,
            shadow_mode=self.shadow_mode,
        )
