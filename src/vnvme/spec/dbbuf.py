"""Shadow doorbell / EventIdx arithmetic: the two halves of the protocol, as pure functions.

The Doorbell Buffer Config command (admin opcode 7Ch, NVMe 1.3) hands the controller two host
memory pages: the Shadow Doorbell buffer, where the host stores SQ tails and CQ heads, and the
EventIdx buffer, where the controller says when it wants a real (trapped) doorbell write. Both
pages mirror the doorbell register layout: SQ y at dword (2y) << CAP.DSTRD, CQ y at dword
(2y + 1) << CAP.DSTRD. Values are 32-bit little-endian whatever the host's byte order (QEMU had
to fix exactly that, issue 1765).

Ordering (both sides need a full barrier, store -> load):
- host: store shadow tail; FULL FENCE; load EventIdx; ring if ``need_event`` says so.
- controller: store EventIdx; FULL FENCE; load shadow tail again; process if it moved.
Without the fences each side can read a stale value and both decide not to act: the command sits
in the queue and nobody rings (a lost wake-up). See :mod:`vnvme.fence`.
"""

from __future__ import annotations

from typing import Final

U16_MASK: Final = 0xFFFF


def need_event(event_idx: int, new: int, old: int) -> bool:
    """Host-side test: did moving a doorbell from ``old`` to ``new`` cross ``event_idx``?

    The virtio "event index" rule used by Linux ``nvme_dbbuf_need_event``, in wrap-safe u16
    arithmetic: ``(u16)(new - event_idx - 1) < (u16)(new - old)``. It is true exactly when
    ``event_idx`` lies in the half-open u16 interval ``[old, new)``.
    """
    return ((new - event_idx - 1) & U16_MASK) < ((new - old) & U16_MASK)


def rearm_event_idx(head: int, ahead: int, size: int) -> int:
    """Controller-side: the EventIdx that asks for a doorbell once the host moves its index from
    ``head`` past ``head + ahead`` (in a ring of ``size`` slots).

    ``ahead`` = 0 asks for the first entry placed (or consumed), k - 1 for the k-th, and -1 for
    none: a host index never passes ``head - 1``, as a ring holds at most ``size - 1`` entries
    (NVMe 1.3 §4.1; see :func:`never_crossed`). With :func:`need_event` on the host side: a move
    of m >= 1 slots from ``head`` rings exactly when 0 <= ``ahead`` < m.
    """
    return (head + ahead) % size


def sq_slot(qid: int, dstrd: int) -> int:
    """Dword index of SQ ``qid``'s tail in the shadow and EventIdx pages: (2y) << DSTRD."""
    return (2 * qid) << dstrd


def cq_slot(qid: int, dstrd: int) -> int:
    """Dword index of CQ ``qid``'s head in the shadow and EventIdx pages: (2y + 1) << DSTRD."""
    return (2 * qid + 1) << dstrd


def slot_queue(slot: int, dstrd: int) -> tuple[int, bool]:
    """The queue whose slot ``slot`` is, as (qid, is_cq): the inverse of :func:`sq_slot` and
    :func:`cq_slot` (``slot`` one of theirs, a multiple of 1 << DSTRD)."""
    index = slot >> dstrd
    return index >> 1, bool(index & 1)


def max_qid_in_page(page_size: int, dstrd: int) -> int:
    """Largest qid whose two slots both fit in one page of ``page_size`` bytes; -1 if none does
    (a stride as large as the page: even queue 0's CQ slot lies past it)."""
    dwords = page_size // 4
    # CQ slot of qid y is ((2y + 1) << dstrd); it must be < dwords: 2y + 1 < dwords >> dstrd.
    return ((dwords >> dstrd) - 2) // 2


def never_crossed(limit: int, size: int) -> int:
    """An EventIdx the host cannot cross while its index stays behind ``limit``.

    A circular index in ``[0, size)`` that moves forward and stops at or before ``limit``
    (inclusive) never steps from ``limit`` onwards, so EventIdx = ``limit`` is never inside a
    crossed interval ``[old, new)`` -- including the moves that wrap around the queue, for which
    the u16 interval ``[old, 65535] + [0, new)`` meets ``[0, size)`` in the circular interval.
    """
    return limit % size


def circular_distance(start: int, end: int, size: int) -> int:
    """Entries from ``start`` forward to ``end`` in a ring of ``size`` slots."""
    return (end - start) % size
