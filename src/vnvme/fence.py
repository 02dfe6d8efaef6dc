"""A full memory barrier reachable from pure Python.

Python has no fence primitive, and "many bytecodes in between" is not one: a store followed by a
load of another address may be reordered by the CPU (x86-64 allows store->load reordering), and
the shadow doorbell protocol loses wake-ups when it happens (see :mod:`vnvme.spec.dbbuf`). The
cheapest full barrier pure CPython offers on x86-64 is acquiring and releasing an uncontended
``threading.Lock``: glibc implements both with LOCK-prefixed atomic instructions, each a full
barrier. About 60 ns.
"""

from __future__ import annotations

import threading

_fence_lock = threading.Lock()
_acquire = _fence_lock.acquire
_release = _fence_lock.release


def full_fence() -> None:
    """Order every load and store before this call before every one after it."""
    _acquire()
    _release()
