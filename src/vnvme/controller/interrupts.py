"""The controller's interrupts: MSI-X vectors raised for completion queues, INTMS / INTMC
masking (§3.1.3-3.1.4) and Interrupt Coalescing (§5.21.1.8).

A raised vector becomes a :class:`~vnvme.effects.RaiseInterrupt` effect, appended to the
controller's effect list (the edge turns it into an eventfd write); a vector masked through
INTMS is held and raised when INTMC unmasks it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Protocol

from vnvme.effects import Effect, RaiseInterrupt
from vnvme.spec.features import InterruptCoalescing

if TYPE_CHECKING:
    from vnvme.controller.admin_state import FeatureState
    from vnvme.controller.queues import CompletionQueue

# Effects are immutable: one RaiseInterrupt per vector, made once.
_RAISE_CACHED: Final = 2048
_RAISE: Final = tuple(RaiseInterrupt(vector) for vector in range(_RAISE_CACHED))


class _Tracer(Protocol):
    tracing: bool

    def trace(self, name: str, *args: int | str) -> None: ...


@dataclass
class _Coalescing:
    count: int = 0
    since: float = 0.0


class Interrupts:
    """Vectors, masks and coalescing state of one controller."""

    def __init__(self, features: FeatureState, effects: list[Effect], tracer: _Tracer) -> None:
        """``effects``: the controller's effect list (kept, appended to); ``features``: where the
        Interrupt Coalescing and Interrupt Vector Configuration values live."""
        self._features = features
        self._effects = effects
        self._tracer = tracer
        #: INTMS / INTMC: bit n set masks vector n (vectors 0-31 only).
        self.intms = 0
        #: Vectors with completions waiting for their coalescing threshold or time.
        self.coalescing: dict[int, _Coalescing] = {}
        self._masked_pending: set[int] = set()
        self.raised = 0
        self.by_vector: dict[int, int] = {}  # raised, by MSI-X vector (queue statistics)

    def reset(self) -> None:
        """Controller reset: nothing coalesced or held (INTMS is the register file's to clear)."""
        self.coalescing.clear()
        self._masked_pending.clear()

    def mask(self, value: int) -> None:
        """A write to INTMS."""
        self.intms |= value

    def unmask(self, value: int) -> None:
        """A write to INTMC: vectors held while masked are raised now."""
        self.intms &= ~value
        for vector in sorted(self._masked_pending):
            if not self.intms >> vector & 1:
                self._masked_pending.discard(vector)
                self.raise_vector(vector)

    def deliver(self, touched: Mapping[int, CompletionQueue], now: float) -> None:
        """Completions were posted to ``touched`` in this pass: raise (or coalesce) their vectors."""
        coalesce_value = self._features.interrupt_coalescing
        if not coalesce_value and len(touched) == 1:
            # The common pass: one CQ, no coalescing.
            cq = next(iter(touched.values()))
            if cq.ien:
                cq.irq_mark = cq.entries
                self.raise_vector(cq.vector)
            if self.coalescing:
                self.deliver_coalesced(now)
            return
        # vector -> (entries posted, carries the admin CQ)
        vectors: dict[int, tuple[int, bool]] = {}
        for cq in touched.values():
            if not cq.ien:
                continue
            count, admin_cq = vectors.get(cq.vector, (0, False))
            vectors[cq.vector] = (count + cq.entries - cq.irq_mark, admin_cq or cq.cqid == 0)
            cq.irq_mark = cq.entries
        time_units = InterruptCoalescing.TIME.get(coalesce_value)
        for vector, (count, admin_cq) in vectors.items():
            # §5.21.1.8: coalescing never delays the admin CQ, nor a vector with CD set; an
            # aggregation time of 0 means no delay.
            if time_units == 0 or admin_cq or self._features.coalescing_disabled(vector):
                self.raise_vector(vector)
                continue
            state = self.coalescing.setdefault(vector, _Coalescing())
            if state.count == 0:
                state.since = now
            state.count += count
        if self.coalescing:
            self.deliver_coalesced(now)

    def deliver_coalesced(self, now: float) -> None:
        """Raise every coalesced vector whose threshold or aggregation time is reached."""
        coalesce_value = self._features.interrupt_coalescing
        threshold = InterruptCoalescing.THR.get(coalesce_value) + 1
        deadline = InterruptCoalescing.TIME.get(coalesce_value) * 100e-6
        for vector, state in self.coalescing.items():
            if state.count and (state.count >= threshold or now - state.since >= deadline):
                state.count = 0
                self.raise_vector(vector)

    def next_deadline(self) -> float | None:
        """When the oldest coalesced completion's aggregation time runs out, if any waits."""
        time_units = InterruptCoalescing.TIME.get(self._features.interrupt_coalescing)
        if not time_units:
            return None
        pending = [c.since for c in self.coalescing.values() if c.count]
        return min(pending) + time_units * 100e-6 if pending else None

    def raise_vector(self, vector: int) -> None:
        tracer = self._tracer
        if vector < 32 and self.intms >> vector & 1:
            self._masked_pending.add(vector)
            if tracer.tracing:
                tracer.trace("pci_nvme_irq_masked", vector)
            return
        self.raised += 1
        self.by_vector[vector] = self.by_vector.get(vector, 0) + 1
        self._effects.append(_RAISE[vector] if vector < _RAISE_CACHED else RaiseInterrupt(vector))
        if tracer.tracing:
            tracer.trace("pci_nvme_irq_msix", vector)
