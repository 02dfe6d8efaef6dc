"""What the sans-I/O controller core asks its environment to do.

The core never touches a socket, a thread, an eventfd or a clock. Every call into it returns a list
of effects; the transport at the edge carries them out (write an eventfd, append to a trace file,
report a dead controller).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RaiseInterrupt:
    """Signal interrupt vector ``vector`` (MSI-X vector N; vector 0 doubles as INTx)."""

    vector: int


@dataclass(frozen=True, slots=True)
class TraceEvent:
    """A trace event from the declared table in :mod:`vnvme.trace`."""

    name: str
    args: tuple[int | str, ...]


@dataclass(frozen=True, slots=True)
class ControllerFatal:
    """The controller set CSTS.CFS: it stops processing until the host resets it."""

    reason: str


Effect = RaiseInterrupt | TraceEvent | ControllerFatal
