"""The NVMe controller as a PCI function behind a vfio-user server.

Glue between the sans-I/O :class:`~vnvme.controller.controller.Controller` and
:mod:`vnvme.vfio_user.server`: BAR0 accesses become register accesses, the core's interrupt
effects become eventfd writes, trace effects go to a sink.

Interrupt liveness follows what QEMU's ``vfio-user-pci`` does, not the MSI-X table: QEMU emulates
the table on its own side and never sends SET_IRQS UNMASK, so a vector is live exactly while it
has an eventfd. Our table (BAR4) is kept for clients that read it; masking is SET_IRQS MASK /
UNMASK, and an interrupt raised while masked is delivered on unmask (its PBA bit meanwhile).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

from vnvme.controller.config import ControllerConfig
from vnvme.controller.controller import Controller
from vnvme.controller.doorbells import MappedDoorbellPage
from vnvme.controller.namespace import Namespace
from vnvme.controller.registers import RegisterRefused
from vnvme.effects import ControllerFatal, Effect, RaiseInterrupt, TraceEvent
from vnvme.memory import GuestMemory
from vnvme.spec import registers as regs
from vnvme.vfio_user import protocol as vu
from vnvme.vfio_user.pci import Bar, MsixConfig, PciConfig
from vnvme.vfio_user.server import DeviceError, IrqType, Region

log = logging.getLogger("vnvme.function")

NVME_CLASS_CODE = 0x010802  # mass storage, non-volatile memory, NVM Express
DEFAULT_DEVICE_ID = 0x5D0B
MSIX_BAR = 4
MSIX_ENTRY = 16
PAGE = 4096
# Plain ints: an IntEnum member costs a class attribute lookup each time (per interrupt here).
_MSIX = int(vu.PciIrq.MSIX)
# Bound once: compiled, ``os.eventfd_write`` is a lookup in the os module per interrupt.
_eventfd_write: Final = os.eventfd_write


def _pow2_at_least(value: int, minimum: int) -> int:
    size = minimum
    while size < value:
        size <<= 1
    return size


@dataclass
class FunctionStatistics:
    interrupts_signalled: int = 0
    interrupts_deferred: int = 0  # masked, no eventfd yet, or bus mastering off
    interrupts_dropped: int = 0
    #: BAR accesses while the command register's Memory Space Enable was 0 (not decoded).
    undecoded_bar_accesses: int = 0


class NvmeFunction:
    """A :class:`~vnvme.vfio_user.server.Device`: one NVMe controller as a PCI function."""

    def __init__(
        self,
        namespaces: Sequence[Namespace],
        config: ControllerConfig | None = None,
        *,
        controller_polls: bool = False,
        trace: Sequence[str] = (),
        trace_sink: Callable[[TraceEvent], None] | None = None,
        device_id: int = DEFAULT_DEVICE_ID,
        mappable_doorbells: bool = False,
        idle_sleep: float = 100e-6,
        memory: GuestMemory | None = None,
    ) -> None:
        # ``memory``: a fresh address space unless given one (a harness's that watches it).
        self.memory = GuestMemory() if memory is None else memory
        self.controller = Controller(self.memory, namespaces, config)
        cfg = self.controller.config
        if trace:
            self.controller.enable_trace(trace)
        self.trace_sink = trace_sink
        self.controller_polls = controller_polls
        # Passes that look for doorbells themselves (polling, mapped doorbell page) report progress.
        self._polls = controller_polls or mappable_doorbells
        self.vectors = cfg.interrupt_vectors
        self.pci = self._pci_config(cfg, device_id)
        self.msix_table = bytearray(self.vectors * MSIX_ENTRY)
        self._reset_msix_table()
        bar0 = Region(vu.PciRegion.BAR0, self.bar0_size, self._bar0_read, self._bar0_write)
        self.mappable_doorbells = mappable_doorbells
        self.idle_sleep = idle_sleep
        if mappable_doorbells:
            self._setup_doorbell_page(bar0)
        self.regions: dict[int, Region] = {
            vu.PciRegion.BAR0: bar0,
            vu.PciRegion.BAR4: Region(vu.PciRegion.BAR4, self.bar4_size, self._bar4_read, self._bar4_write),
            vu.PciRegion.CONFIG: Region(vu.PciRegion.CONFIG, 4096, self._config_read, self._config_write),
        }
        self.irqs: dict[int, IrqType] = {
            vu.PciIrq.INTX: IrqType(vu.PciIrq.INTX, 1),
            vu.PciIrq.MSIX: IrqType(vu.PciIrq.MSIX, self.vectors),
        }
        self.eventfds: dict[int, list[int]] = {index: [-1] * irq.count for index, irq in self.irqs.items()}
        self.masked: dict[int, list[bool]] = {index: [False] * irq.count for index, irq in self.irqs.items()}
        self.pending: dict[int, list[bool]] = {index: [False] * irq.count for index, irq in self.irqs.items()}
        self.stats = FunctionStatistics()
        self.fatal_reasons: list[str] = []
        self._polling_now = False
        self._msix_live = 0  # MSI-X vectors with an eventfd
        self._command_changed()
        self.pci.on_change = self._command_changed

    def _pci_config(self, cfg: ControllerConfig, device_id: int) -> PciConfig:
        """Configuration space: BAR0 (registers, doorbells), BAR4 (MSI-X table, then the PBA)."""
        self.bar0_size = _pow2_at_least(self.controller.bar0_size, 0x4000)
        self.pba_offset = _pow2_at_least(self.vectors * MSIX_ENTRY, 0x800)
        pba_bytes = -(-self.vectors // 64) * 8
        self.bar4_size = _pow2_at_least(self.pba_offset + pba_bytes, 0x1000)
        return PciConfig(
            vendor_id=cfg.pci_vendor_id,
            device_id=device_id,
            subsystem_vendor_id=cfg.pci_subsystem_vendor_id,
            subsystem_id=device_id,
            revision=1,
            class_code=NVME_CLASS_CODE,
            bars=[Bar(0, self.bar0_size, is_64bit=True), Bar(MSIX_BAR, self.bar4_size, is_64bit=False)],
            msix=MsixConfig(self.vectors, MSIX_BAR, 0, MSIX_BAR, self.pba_offset),
            interrupt_pin=1,
        )

    def _command_changed(self) -> None:
        """Cache the Command register's bits: they are tested on every access and pass."""
        pci = self.pci
        mastering_before = getattr(self, "_bus_master", False)
        self._memory_enabled = pci.memory_enabled
        self._bus_master = pci.bus_master
        self._intx_disabled = pci.intx_disabled
        if self._bus_master and not mastering_before:
            # Interrupts held while bus mastering was off go out now (where a vector can take them).
            for index, pending in self.pending.items():
                for vector, held in enumerate(pending):
                    if held:
                        self._deliver_pending(index, vector)

    # Section: mappable doorbells

    def _setup_doorbell_page(self, bar0: Region) -> None:
        """BAR0 backed by a memfd whose doorbell pages the client maps and writes directly (a
        sparse mmap area): no trap tells us of a doorbell, so the device polls the page."""
        start = regs.DOORBELL_BASE
        end = self.controller.doorbell_end
        length = -(-(end - start) // PAGE) * PAGE
        fd = os.memfd_create("vnvme-bar0", os.MFD_CLOEXEC)
        os.ftruncate(fd, self.bar0_size)
        self._bar0_fd = fd
        self._bar0_map = mmap.mmap(fd, self.bar0_size, flags=mmap.MAP_SHARED)
        self._db_page = MappedDoorbellPage(memoryview(self._bar0_map)[start:end])
        bar0.mmap_fd = fd
        bar0.sparse = [(start, length)]

    def _scan_doorbells(self) -> None:
        """Act on each live queue's doorbell the page holds news for (MappedDoorbellPage.news).
        A new enable clears the page: safe, as run() follows the CC write before the host can
        read CSTS.RDY = 1."""
        ctrl = self.controller
        if not ctrl.enabled or ctrl.fatal:
            return
        for offset, value in self._db_page.news(ctrl.doorbell_values(), ctrl.enable_count):
            self._handle(ctrl.mapped_doorbell(offset, value))
        ctrl.check_shadow_tails()

    # Section: Device interface

    def attach(self) -> None:
        pass

    def detach(self) -> None:
        """Client gone: as a bus reset, since the next client is a new VM. DEVICE_RESET, and
        what it keeps goes too: eventfds closed, masks cleared, config space and the MSI-X
        table back to power-on."""
        self.reset()
        for index in self.eventfds:
            self._set_eventfds(index, 0, [-1] * len(self.eventfds[index]))
            self.masked[index] = [False] * len(self.masked[index])
        self.pci.reset()
        self._reset_msix_table()

    def reset(self) -> None:
        """DEVICE_RESET: the NVMe controller resets and pending interrupts (the PBA) are
        forgotten; config space is kept whole.

        The vfio-user spec only mirrors VFIO_DEVICE_RESET, so this follows Linux's vfio-pci: it
        puts the function in D0 and resets it with pci_try_reset_function(), which saves config
        space and the MSI-X state before the reset and restores them after. Memory Space and Bus
        Master Enable, the BARs, the MSI-X capability and table come back as they were, so a
        client that resets the device and then re-initialises the controller reaches BAR0
        (with config space reset, CC and CSTS read as all ones). Memory Space Enable still
        gates BAR accesses whenever the client clears it. Eventfds and SET_IRQS masks stay: the
        ioctl never touches what SET_IRQS configured. DMA mappings stay (the server's).
        """
        self._handle(self.controller.reset())
        self.pci.enter_d0()
        for index in self.pending:
            self.pending[index] = [False] * len(self.pending[index])

    def memory_changed(self) -> None:
        self._handle(self.controller.memory_changed())

    def set_irqs(self, index: int, flags: vu.IrqSetFlags, start: int, count: int, data: list[int]) -> None:
        action = flags & vu.IRQ_SET_ACTION_MASK
        if flags & vu.IrqSetFlags.DATA_EVENTFD:
            self._set_eventfds(index, start, data)
            return
        if action == vu.IrqSetFlags.ACTION_TRIGGER:
            if count == 0 and flags & vu.IrqSetFlags.DATA_NONE:
                # count 0 with DATA_NONE: disable every interrupt of the index.
                self._set_eventfds(index, 0, [-1] * len(self.eventfds[index]))
                return
            for i, flag in enumerate(data):
                if flag:
                    self._signal(index, start + i)
        elif action == vu.IrqSetFlags.ACTION_MASK:
            for i, flag in enumerate(data):
                if flag:
                    self.masked[index][start + i] = True
        else:
            for i, flag in enumerate(data):
                if flag:
                    self.masked[index][start + i] = False
                    self._deliver_pending(index, start + i)

    def run(self, now: float, poll: bool = True) -> bool:
        """One pass; True when work is pending, or (polling passes) when it made progress.
        ``poll`` False, for a polling controller not polling yet: the server will sleep after
        this pass, so it serves what was rung as the event-driven controller does (no polling
        turned on, no pass after it to look for progress)."""
        ctrl = self.controller
        if not self._bus_master:
            # Bus Master Enable = 0: the function may not touch host memory (nor signal MSI-X,
            # a memory write); doorbells still latch and are served once it is set.
            return False
        if not self._polls or not (poll or self._polling_now or self.mappable_doorbells):
            # Event driven: a doorbell or a deadline brings us back, so one pass is enough
            # unless it left work pending (a budget cut, a rearm that lost the race).
            effects = ctrl.process(now)
            if effects:
                self._handle(effects)
            return ctrl.has_pending_work
        before = ctrl.completions
        if self.mappable_doorbells:
            self._scan_doorbells()
        if self.controller_polls:
            if not self._polling_now:
                ctrl.start_polling()
                self._polling_now = True
            self._handle(ctrl.poll(now))
        else:
            self._handle(ctrl.process(now))
        return ctrl.has_pending_work or ctrl.completions != before

    def next_deadline(self) -> float | None:
        deadline = self.controller.next_deadline()
        if self.mappable_doorbells and self.controller.enabled:
            # Nothing announces a doorbell in the mapped page: look again soon.
            wake = time.monotonic() + self.idle_sleep
            deadline = wake if deadline is None else min(deadline, wake)
        return deadline

    def idle(self) -> bool:
        if not self.controller_polls or self.mappable_doorbells:
            return True
        self._polling_now = False
        if not self.controller.polling:
            # Served event driven since the last rearm: every SQ asks for its next doorbell.
            return not self.controller.has_pending_work
        return self.controller.rearm()

    # Section: interrupts

    def _set_eventfds(self, index: int, start: int, fds: list[int]) -> None:
        current = self.eventfds[index]
        for i, fd in enumerate(fds):
            old = current[start + i]
            if old >= 0 and old != fd:
                with contextlib.suppress(OSError):
                    os.close(old)
            current[start + i] = fd
            if index == vu.PciIrq.MSIX:
                self._msix_live += (fd >= 0) - (old >= 0)
            if fd >= 0:
                self._deliver_pending(index, start + i)

    def _deliver_pending(self, index: int, vector: int) -> None:
        """Signal a held interrupt if the vector can take it now (eventfd, unmasked, mastering)."""
        if (
            self.pending[index][vector]
            and self._bus_master
            and self.eventfds[index][vector] >= 0
            and not self.masked[index][vector]
        ):
            self.pending[index][vector] = False
            self._signal(index, vector)

    def _signal(self, index: int, vector: int) -> None:
        fd = self.eventfds[index][vector]
        if fd < 0 or self.masked[index][vector]:
            self.pending[index][vector] = True
            self.stats.interrupts_deferred += 1
            return
        try:
            _eventfd_write(fd, 1)
            self.stats.interrupts_signalled += 1
            self.pending[index][vector] = False  # delivered: a stale PBA bit must not fire again
        except OSError:
            self.stats.interrupts_dropped += 1

    def _raise(self, vector: int) -> None:
        if not self._bus_master and vector < self.vectors:
            self.pending[_MSIX][vector] = True
            self.stats.interrupts_deferred += 1
            return
        if self._msix_live:
            if vector < self.vectors:
                self._signal(_MSIX, vector)
            else:
                self.stats.interrupts_dropped += 1
        elif self.eventfds[vu.PciIrq.INTX][0] >= 0 and not self._intx_disabled:
            self._signal(vu.PciIrq.INTX, 0)
        elif vector < self.vectors:
            # No vector configured yet: remember it, as a PBA bit would.
            self.pending[vu.PciIrq.MSIX][vector] = True
            self.stats.interrupts_deferred += 1

    def _handle(self, effects: list[Effect]) -> None:
        for effect in effects:
            if isinstance(effect, RaiseInterrupt):
                self._raise(effect.vector)
            elif isinstance(effect, TraceEvent):
                if self.trace_sink is not None:
                    self.trace_sink(effect)
            elif isinstance(effect, ControllerFatal):
                log.warning("controller fatal status: %s", effect.reason)
                self.fatal_reasons.append(effect.reason)

    # Section: regions

    def _undecoded(self) -> bool:
        """Memory Space Enable = 0: the function does not decode its BARs (reads see all ones,
        writes vanish), as a master abort on a real bus."""
        if self._memory_enabled:
            return False
        self.stats.undecoded_bar_accesses += 1
        return True

    def _bar0_read(self, offset: int, count: int) -> bytes:
        try:
            if not self._memory_enabled:
                self.controller.registers.check_read(offset, count)  # refused before decoding
                self._undecoded()
                return b"\xff" * count
            value = self.controller.bar0_read(offset, count)
        except RegisterRefused as refused:
            raise DeviceError(
                refused.errno, f"BAR0 read of {count} bytes at {offset:#x}: {refused}"
            ) from None
        self._handle(self.controller.take_effects())
        return value.to_bytes(count, "little")

    def _bar0_write(self, offset: int, data: bytes) -> None:
        count = len(data)
        value = int.from_bytes(data, "little")
        try:
            if not self._memory_enabled:
                self.controller.registers.check_write(offset, count, value)  # refused before decoding
                self._undecoded()
                return
            effects = self.controller.bar0_write(offset, count, value)
        except RegisterRefused as refused:
            raise DeviceError(
                refused.errno, f"BAR0 write of {count} bytes at {offset:#x}: {refused}"
            ) from None
        if (
            self.mappable_doorbells
            and count == 4
            and regs.DOORBELL_BASE <= offset < regs.DOORBELL_BASE + len(self._db_page)
        ):
            self._db_page.write(offset, value)  # the page holds the latest value too
        if effects:
            self._handle(effects)

    def _reset_msix_table(self) -> None:
        for vector in range(self.vectors):
            # Message address/data 0, Vector Control: masked at reset (PCI 3.0 §6.8.2.9).
            struct.pack_into("<QII", self.msix_table, vector * MSIX_ENTRY, 0, 0, 1)

    def _bar4_read(self, offset: int, count: int) -> bytes:
        if count not in (4, 8) or offset % 4:
            raise DeviceError(errno.EINVAL, f"MSI-X access of {count} bytes at {offset:#x}")
        if self._undecoded():
            return b"\xff" * count
        if offset + count <= len(self.msix_table):
            return bytes(self.msix_table[offset : offset + count])
        if offset >= self.pba_offset:
            bits = 0
            for vector, pending in enumerate(self.pending[vu.PciIrq.MSIX]):
                if pending:
                    bits |= 1 << vector
            start = (offset - self.pba_offset) * 8
            return ((bits >> start) & ((1 << (8 * count)) - 1)).to_bytes(count, "little")
        return bytes(count)

    def _bar4_write(self, offset: int, data: bytes) -> None:
        count = len(data)
        if count not in (4, 8) or offset % 4:
            raise DeviceError(errno.EINVAL, f"MSI-X access of {count} bytes at {offset:#x}")
        if offset + count > len(self.msix_table):
            raise DeviceError(errno.EPERM, "the PBA is read-only")
        if self._undecoded():
            return
        self.msix_table[offset : offset + count] = data

    def _config_read(self, offset: int, count: int) -> bytes:
        if count not in (1, 2, 4):
            # QEMU reads config space in 1, 2 and 4 byte pieces; anything longer byte by byte.
            return b"".join(self._config_read(offset + i, 1) for i in range(count))
        try:
            return self.pci.read(offset, count).to_bytes(count, "little")
        except ValueError as exc:
            raise DeviceError(errno.EINVAL, str(exc)) from None

    def _config_write(self, offset: int, data: bytes) -> None:
        count = len(data)
        try:
            if count in (1, 2, 4):
                self.pci.write(offset, count, int.from_bytes(data, "little"))
            else:
                for i, byte in enumerate(data):
                    self.pci.write(offset + i, 1, byte)
        except ValueError as exc:
            raise DeviceError(errno.EINVAL, str(exc)) from None

    # Section: reporting

    def close(self) -> None:
        self.detach()
        self.controller.close()
        if self.mappable_doorbells:
            self._db_page.release()
            self._bar0_map.close()
            os.close(self._bar0_fd)

    def statistics(self) -> dict[str, object]:
        stats = self.controller.statistics()
        return {
            "controller": stats,
            "function": self.stats,
            "fatal": list(self.fatal_reasons),
            "time": time.time(),
        }
