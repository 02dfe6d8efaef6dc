"""The host driver's bus over vfio-user: :class:`VfioUserTransport` adapts a
:class:`~vnvme.vfio_user.client.VfioUserClient` to :class:`~vnvme.driver.transport.HostTransport`.
Host memory is a memfd handed over with DMA_MAP, BAR0 accesses are REGION_READ / REGION_WRITE,
interrupts are eventfds.
"""

from __future__ import annotations

import errno
import mmap
import os
import select
import time

from vnvme.driver.transport import HostMemory
from vnvme.vfio_user import protocol as vu
from vnvme.vfio_user.client import RegionInfo, VfioUserClient, VfioUserError

# PCI config space offsets the client touches as firmware would.
PCI_COMMAND = 0x04
PCI_COMMAND_MEMORY = 1 << 1
PCI_COMMAND_MASTER = 1 << 2
PCI_BAR0 = 0x10
PCI_CAPABILITY_LIST = 0x34
PCI_CAP_ID_MSIX = 0x11
MSIX_ENABLE = 1 << 15
MSIX_FUNCTION_MASK = 1 << 14
BAR0_ADDRESS = 0xFE00_0000  # any address aligned to BAR0's size will do
_BAR0 = int(vu.PciRegion.BAR0)


class VfioUserTransport:
    """The host driver's bus over vfio-user: a second process drives ``vnvme serve``."""

    def __init__(
        self,
        path: str,
        *,
        memory_size: int = 64 << 20,
        posted_writes: bool = False,
        vectors: int | None = None,
        timeout: float = 10.0,
        mapped_doorbells: bool = False,
        share_memory: bool = True,
    ) -> None:
        self.client = VfioUserClient(path, timeout=timeout)
        self.posted_writes = posted_writes
        self._mapped: list[tuple[int, int, mmap.mmap, memoryview]] = []
        self.mapped_doorbell_writes = 0
        self.memory = HostMemory(memory_size, memfd=True)
        self.eventfds: list[int] = []
        try:
            self.client.negotiate()
            self.client.device_info()
            self.bar0 = self.client.region_info(vu.PciRegion.BAR0)
            if self.bar0.fd >= 0:
                try:
                    if mapped_doorbells:
                        self._map_sparse_areas(self.bar0)
                finally:
                    os.close(self.bar0.fd)
            if mapped_doorbells and not self._mapped:
                raise VfioUserError(errno.ENOTSUP, "the server offers no mappable doorbell area")
            _flags, count = self.client.irq_info(vu.PciIrq.MSIX)
            count = count if vectors is None else min(vectors, count)
            self.eventfds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(count)]
            if count:
                self.client.set_irq_eventfds(vu.PciIrq.MSIX, 0, self.eventfds)
            if share_memory:
                self.client.dma_map(self.memory.base, self.memory.size, self.memory.fd)
            else:
                # As QEMU without share=on: the server reaches this memory by messages only.
                self.client.serve_dma(self.memory.base, self.memory.view)
                self.client.dma_map(self.memory.base, self.memory.size, None)
            self._configure_function()
        except BaseException:
            self.close()
            raise

    @property
    def interrupt_vectors(self) -> int:
        """The MSI-X vectors with an eventfd: the function's table size, or ``vectors`` if fewer."""
        return len(self.eventfds)

    def _config_read(self, offset: int, size: int) -> int:
        return int.from_bytes(self.client.region_read(vu.PciRegion.CONFIG, offset, size), "little")

    def _config_write(self, offset: int, size: int, value: int) -> None:
        self.client.region_write(vu.PciRegion.CONFIG, offset, value.to_bytes(size, "little"))

    def _configure_function(self) -> None:
        """What firmware and the OS do before a driver runs: give BAR0 an address (QEMU's PCI
        core decodes a BAR only once it has one), enable MSI-X, memory decoding, bus mastering."""
        bar0 = self._config_read(PCI_BAR0, 4)
        self._config_write(PCI_BAR0, 4, BAR0_ADDRESS | (bar0 & 0xF))
        if bar0 & 0x6 == 0x4:  # 64-bit BAR: the upper half too
            self._config_write(PCI_BAR0 + 4, 4, 0)
        cap = self._config_read(PCI_CAPABILITY_LIST, 1) & ~3
        for _ in range(48):  # a bounded walk: a broken list must not loop forever
            if not cap:
                break
            if self._config_read(cap, 1) == PCI_CAP_ID_MSIX:
                control = self._config_read(cap + 2, 2)
                self._config_write(cap + 2, 2, (control | MSIX_ENABLE) & ~MSIX_FUNCTION_MASK)
                break
            cap = self._config_read(cap + 1, 1) & ~3
        command = self._config_read(PCI_COMMAND, 2)
        self._config_write(PCI_COMMAND, 2, command | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER)

    def _map_sparse_areas(self, info: RegionInfo) -> None:
        for area_offset, size in info.sparse:
            mapping = mmap.mmap(info.fd, size, flags=mmap.MAP_SHARED, offset=info.offset + area_offset)
            self._mapped.append((area_offset, area_offset + size, mapping, memoryview(mapping).cast("I")))

    # Section: HostTransport

    def mmio_read(self, offset: int, size: int) -> int:
        return int.from_bytes(self.client.region_read(vu.PciRegion.BAR0, offset, size), "little")

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        if size == 4 and self._mapped:
            for start, end, _, words in self._mapped:
                if start <= offset < end:
                    # A store into the mapped doorbell page: no message, the device polls it.
                    words[(offset - start) >> 2] = value
                    self.mapped_doorbell_writes += 1
                    return
        self.client.region_write(_BAR0, offset, value.to_bytes(size, "little"), posted=self.posted_writes)

    def wait_for_interrupt(self, vector: int, timeout: float) -> bool:
        fd = self.eventfds[vector]
        try:
            os.eventfd_read(fd)
            return True
        except BlockingIOError:
            pass
        deadline = time.monotonic() + timeout
        sock = self.client.channel.sock.fileno()
        channel = self.client.channel
        while True:
            if channel.buffered_header():
                self.client.service()  # requests already read: select() cannot see them
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            ready, _, _ = select.select([fd, sock], [], [], remaining)
            if sock in ready:
                self.client.service()  # the device asks for memory (DMA_READ / DMA_WRITE)
            if fd in ready:
                try:
                    os.eventfd_read(fd)
                    return True
                except BlockingIOError:
                    continue

    def device_idle(self) -> None:
        if self.client.service() == 0:
            os.sched_yield()  # the device runs in its own process: give it the CPU if we share one

    def close(self) -> None:
        for _, _, mapping, words in self._mapped:
            words.release()
            mapping.close()
        self._mapped = []
        try:
            self.client.close()
        finally:
            for fd in self.eventfds:
                os.close(fd)
            self.eventfds = []
            self.memory.close()
