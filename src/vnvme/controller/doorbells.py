"""Where doorbells live: every queue's doorbell state, the shadow doorbell and EventIdx pages,
and the BAR doorbell page an edge lets its client map.

:class:`QueueDoorbell` is each queue's part (its slot, what was last seen there, counters);
:class:`Doorbells` owns the guest pages and is the only code that loads or stores a slot;
:class:`MappedDoorbellPage` is the BAR page and how an edge finds news in it. Its :meth:`Doorbells.probe` is the controller's half of the ordering rule of
:mod:`vnvme.spec.dbbuf` (store EventIdx, full fence, re-read), written once.

A controller reset calls :meth:`Doorbells.reset`, after which nothing is ever read from or
written to the guest pages again: after a reboot the next kernel may have reused them (OpenVMM
PR 4080 corrupted guest memory exactly that way).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from vnvme.fence import full_fence as full_fence  # re-exported: tests slow the probe's fence down
from vnvme.memory import DwordPage, GuestMemory, RemoteDwordPage
from vnvme.spec import registers as regs


class QueueDoorbell:
    """One queue's part of the doorbell memory (``queue.doorbell``): its slot in the shadow and
    EventIdx pages and what the controller knows of it. The value the doorbell carries is the
    queue's own ``tail`` (SQ) or ``head`` (CQ); ``queue.shadow_mode`` says which one it follows.

    One class for both queue kinds: the methods of :class:`Doorbells` see a single type, which
    keeps CPython's attribute caches in them specialised (they run several times per I/O)."""

    __slots__ = ("slot", "shadow_last", "slot_kept", "shadow_reads", "eventidx_writes")

    def __init__(self, slot: int) -> None:
        self.slot = slot  # dword index in the shadow / EventIdx pages
        # The value last seen in (or put into) the shadow slot, and whether the host has been
        # seen storing there: then MMIO values are only wake-ups (a posted one may be stale).
        self.shadow_last = 0
        self.slot_kept = False
        self.shadow_reads = 0
        self.eventidx_writes = 0


def _page(memory: GuestMemory, addr: int, size: int) -> DwordPage | RemoteDwordPage:
    if memory.is_remote(addr):
        memory.window(addr, size, write=True)  # checks it is all there and writable
        return RemoteDwordPage(memory, addr)
    return DwordPage(memory.view(addr, size, write=True))


# Past any value a slot can hold: every value read counts as the host's store.
_ANY = 1 << 32


class Doorbells:
    """The controller's doorbell memory: the two guest pages given by Doorbell Buffer Config,
    with each queue's slots in them."""

    __slots__ = (
        "shadow",
        "eventidx",
        "shadow_addr",
        "eventidx_addr",
        "page_size",
        "reads",
        "eventidx_writes",
        "catchups",
    )

    def __init__(self) -> None:
        self.shadow: DwordPage | RemoteDwordPage | None = None
        self.eventidx: DwordPage | RemoteDwordPage | None = None
        self.shadow_addr = 0
        self.eventidx_addr = 0
        self.page_size = 0
        # Totals over every queue, kept across resets (statistics).
        self.reads = 0
        self.eventidx_writes = 0
        self.catchups = 0

    @property
    def active(self) -> bool:
        return self.shadow is not None

    def configure(self, memory: GuestMemory, shadow_addr: int, eventidx_addr: int, page_size: int) -> None:
        """Take both pages (raises GuestMemoryError if either is not mapped and writable)."""
        shadow = _page(memory, shadow_addr, page_size)
        try:
            eventidx = _page(memory, eventidx_addr, page_size)
        except BaseException:
            shadow.release()
            raise
        self.reset()
        self.shadow, self.eventidx = shadow, eventidx
        self.shadow_addr, self.eventidx_addr, self.page_size = shadow_addr, eventidx_addr, page_size

    def reset(self) -> None:
        """Forget both guest pages (controller reset, or their memory going away)."""
        for page in (self.shadow, self.eventidx):
            if page is not None:
                page.release()
        self.shadow = self.eventidx = None
        self.shadow_addr = self.eventidx_addr = self.page_size = 0

    # Section: slots (only while active)

    def take(self, queue: QueueDoorbell, value: int | None) -> None:
        """A queue switches onto its shadow slot: store ``value`` there first (None: keep what
        the slot holds)."""
        shadow = self.shadow
        assert shadow is not None
        if value is None:
            value = shadow.load(queue.slot)
        else:
            shadow.store(queue.slot, value)
        queue.shadow_last, queue.slot_kept = value, False

    def load(self, queue: QueueDoorbell, size: int = _ANY) -> int:
        """The queue's shadow slot. A value below ``size`` that differs from the last one seen
        tells that the host stores its doorbells there (the slot is then authoritative)."""
        shadow = self.shadow
        assert shadow is not None
        value = shadow.load(queue.slot)
        self.reads += 1
        queue.shadow_reads += 1
        if value != queue.shadow_last and value < size:
            queue.slot_kept = True
            queue.shadow_last = value
        return value

    def peek(self, queue: QueueDoorbell) -> int:
        """The queue's shadow slot, looked at without taking it as a doorbell (not counted)."""
        shadow = self.shadow
        assert shadow is not None
        return shadow.load(queue.slot)

    def store_eventidx(self, queue: QueueDoorbell, value: int) -> None:
        eventidx = self.eventidx
        assert eventidx is not None
        eventidx.store(queue.slot, value)
        queue.eventidx_writes += 1
        self.eventidx_writes += 1

    def probe(self, queue: QueueDoorbell, value: int, size: int = _ANY) -> int:
        """Publish EventIdx ``value``, full fence, re-read the shadow slot (as :meth:`load`).
        The fence pairs with the host's (store shadow, fence, load EventIdx): without both, each
        side may read the other's old value and neither acts (a lost wake-up)."""
        # store_eventidx and load, inlined: once per I/O.
        eventidx, shadow = self.eventidx, self.shadow
        assert eventidx is not None and shadow is not None
        slot = queue.slot
        eventidx.store(slot, value)
        queue.eventidx_writes += 1
        self.eventidx_writes += 1
        full_fence()
        tail = shadow.load(slot)
        self.reads += 1
        queue.shadow_reads += 1
        if tail != queue.shadow_last and tail < size:
            queue.slot_kept = True
            queue.shadow_last = tail
        return tail

    def catch_up(self, queue: QueueDoorbell, value: int) -> None:
        """An MMIO doorbell value ahead of the queue's shadow slot: this host rings MMIO without
        keeping the slot (Linux, for the admin queue). Bring the slot up to the MMIO value so the
        shadow page stays authoritative and current. A host that keeps the slot stores it before
        it rings, so its slot is never behind its own MMIO value: this never undoes its stores.
        """
        shadow = self.shadow
        assert shadow is not None
        shadow.store(queue.slot, value)
        queue.shadow_last = value
        self.catchups += 1


class MappedDoorbellPage:
    """The BAR0 doorbell registers as memory the client maps and stores into directly (a vfio-user
    sparse mmap area). No trap announces a store, so the edge polls the page: :meth:`news`. The
    edge that offers the mapping (vnvme.function) owns the memory and this object."""

    __slots__ = ("view", "words", "seen", "epoch")

    def __init__(self, view: memoryview) -> None:
        self.view = view  # BAR0 from DOORBELL_BASE on
        self.words = view.cast("I")
        # Per doorbell offset: the (page value, controller value) pair last acted on.
        self.seen: dict[int, tuple[int, int]] = {}
        self.epoch = -1

    def __len__(self) -> int:
        return len(self.view)

    def write(self, offset: int, value: int) -> None:
        """A trapped 32-bit doorbell write at BAR0 ``offset``: the page holds the latest value too."""
        self.words[(offset - regs.DOORBELL_BASE) >> 2] = value

    def news(self, held: Iterable[tuple[int, int]], enable_count: int) -> Iterator[tuple[int, int]]:
        """(offset, page value) for each doorbell whose page value differs from the value the
        controller holds (``held``: (offset, value) pairs), unless that very pair was already
        acted on: a host may store the same value twice a lap apart, so a pair not looked at yet
        is what counts as news."""
        if enable_count != self.epoch:
            # Every enable starts from doorbells of 0: whatever the page held before is stale.
            self.epoch = enable_count
            self.view[:] = bytes(len(self.view))
            self.seen.clear()
        words, seen = self.words, self.seen
        for offset, value_held in held:
            value = words[(offset - regs.DOORBELL_BASE) >> 2]
            if seen.get(offset) != (value, value_held):
                seen[offset] = (value, value_held)
                if value != value_held:
                    yield offset, value

    def release(self) -> None:
        self.words.release()
        self.view.release()
