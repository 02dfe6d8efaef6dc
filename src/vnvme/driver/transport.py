"""How the host driver reaches a controller: host memory for DMA, BAR0 accesses, interrupts.

:class:`InProcessTransport` runs a :class:`~vnvme.controller.controller.Controller` in the same
thread: a BAR write is a method call, and the controller's work runs right after it, as if the
device reacted before the trapped write returned. With ``controller_polls=True`` the controller
instead runs whenever the host waits, as a device polling the shadow doorbells would.
"""

from __future__ import annotations

import mmap
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from vnvme.controller.controller import Controller
from vnvme.effects import ControllerFatal, Effect, RaiseInterrupt, TraceEvent

PAGE_SIZE = 4096


@dataclass(frozen=True)
class DmaBuffer:
    """A page-aligned buffer in host memory, with its bus address."""

    addr: int
    size: int
    view: memoryview


class HostMemory:
    """The host's DMA-able memory: one arena at bus address ``base``, carved into buffers.

    The arena is a shared mapping (``fd`` >= 0 when it is a memfd another process can map).
    """

    def __init__(self, size: int = 64 << 20, base: int = 0x1_0000_0000, *, memfd: bool = False) -> None:
        if size % PAGE_SIZE or base % PAGE_SIZE:
            raise ValueError("host memory size and base must be page aligned")
        self.size = size
        self.base = base
        self.fd = -1
        if memfd:
            import os

            self.fd = os.memfd_create("vnvme-host", os.MFD_CLOEXEC)
            os.ftruncate(self.fd, size)
            self.map = mmap.mmap(self.fd, size, flags=mmap.MAP_SHARED)
        else:
            self.map = mmap.mmap(-1, size, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
        self.view = memoryview(self.map)
        # Free extents as (offset, length), sorted by offset.
        self._free: list[tuple[int, int]] = [(0, size)]
        self._allocated: dict[int, int] = {}
        self._buffers: dict[int, DmaBuffer] = {}

    def alloc(self, size: int, *, zero: bool = True) -> DmaBuffer:
        """A page-aligned buffer of at least ``size`` bytes (first fit)."""
        need = max(PAGE_SIZE, -(-size // PAGE_SIZE) * PAGE_SIZE)
        for index, (offset, length) in enumerate(self._free):
            if length >= need:
                if length == need:
                    del self._free[index]
                else:
                    self._free[index] = (offset + need, length - need)
                self._allocated[offset] = need
                view = self.view[offset : offset + need]
                if zero:
                    view[:] = bytes(need)
                buf = DmaBuffer(self.base + offset, size, view[:size])
                view.release()
                self._buffers[offset] = buf
                return buf
        raise MemoryError(f"host memory exhausted allocating {size} bytes")

    def free(self, buf: DmaBuffer) -> None:
        offset = buf.addr - self.base
        length = self._allocated.pop(offset)
        self._buffers.pop(offset, None)
        buf.view.release()
        self._free.append((offset, length))
        self._free.sort()
        merged: list[tuple[int, int]] = []
        for start, size in self._free:
            if merged and merged[-1][0] + merged[-1][1] == start:
                merged[-1] = (merged[-1][0], merged[-1][1] + size)
            else:
                merged.append((start, size))
        self._free = merged

    @property
    def bytes_allocated(self) -> int:
        return sum(self._allocated.values())

    def close(self) -> None:
        """Unmap the arena; buffers still allocated become unusable."""
        for buf in self._buffers.values():
            buf.view.release()
        self._buffers.clear()
        self.view.release()
        try:
            self.map.close()
        except BufferError:
            # Views caught in reference cycles are only freed by the collector.
            import gc

            gc.collect()
            self.map.close()
        if self.fd >= 0:
            import os

            os.close(self.fd)
            self.fd = -1


class HostTransport(Protocol):
    """What the driver needs from the bus."""

    memory: HostMemory

    @property
    def interrupt_vectors(self) -> int:
        """MSI-X vectors the host can wait on (0 .. interrupt_vectors - 1)."""
        ...

    def mmio_read(self, offset: int, size: int) -> int: ...

    def mmio_write(self, offset: int, size: int, value: int) -> None: ...

    def wait_for_interrupt(self, vector: int, timeout: float) -> bool:
        """Block until ``vector`` fires (True, consumed) or ``timeout`` seconds pass (False)."""
        ...

    def device_idle(self) -> None:
        """The host is about to look for completions without an interrupt (polled queues)."""
        ...


class InProcessTransport:
    """Driver and controller in one thread; the controller runs on every BAR write."""

    def __init__(
        self,
        controller: Controller,
        memory: HostMemory,
        *,
        controller_polls: bool = False,
        trace_sink: Callable[[TraceEvent], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.controller = controller
        self.interrupt_vectors = controller.config.interrupt_vectors
        # The controller's ``now``: a test may run it on a clock of its own.
        self.clock = clock
        self.memory = memory
        self.controller_polls = controller_polls
        self.trace_sink = trace_sink
        self.fired: dict[int, int] = {}
        self.fatal_reasons: list[str] = []
        self.interrupts_seen = 0
        if controller_polls:
            controller.start_polling()

    @classmethod
    def attach(cls, controller: Controller, memory: HostMemory, **kwargs: object) -> InProcessTransport:
        """Map ``memory`` into the controller's guest memory and build the transport."""
        controller.memory.map(memory.base, memory.map, owner=memory)
        return cls(controller, memory, **kwargs)  # type: ignore[arg-type]

    def _handle(self, effects: list[Effect]) -> None:
        for effect in effects:
            if isinstance(effect, RaiseInterrupt):
                self.fired[effect.vector] = self.fired.get(effect.vector, 0) + 1
                self.interrupts_seen += 1
            elif isinstance(effect, TraceEvent):
                if self.trace_sink is not None:
                    self.trace_sink(effect)
            elif isinstance(effect, ControllerFatal):
                self.fatal_reasons.append(effect.reason)

    def _run_controller(self) -> None:
        ctrl = self.controller
        self._handle(ctrl.process(self.clock()))
        for _ in range(64):
            if not ctrl.has_pending_work:
                break
            self._handle(ctrl.process(self.clock()))

    def mmio_read(self, offset: int, size: int) -> int:
        value = self.controller.mmio_read(offset, size)
        self._handle(self.controller.take_effects())
        return value

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        self._handle(self.controller.mmio_write(offset, size, value))
        self._run_controller()

    def device_idle(self) -> None:
        if self.controller_polls:
            self._handle(self.controller.poll(self.clock()))
        self._run_controller()

    def wait_for_interrupt(self, vector: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            count = self.fired.get(vector, 0)
            if count:
                self.fired[vector] = count - 1
                return True
            self.device_idle()
            if self.fired.get(vector, 0):
                continue
            if self.controller.next_deadline() is None and not self.controller.has_pending_work:
                # Nothing can happen in this thread without the host acting: report no interrupt.
                return False
            if time.monotonic() >= deadline:
                return False

    def close(self) -> None:
        # A bus reset first: the controller drops every view into the host memory it held.
        self._handle(self.controller.reset())
        self.controller.memory.unmap(self.memory.base, self.memory.size)
