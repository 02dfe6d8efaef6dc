"""Where doorbells live once the host has handed over shadow doorbell buffers.

One object owns the two guest pages given by Doorbell Buffer Config. A controller reset calls
:meth:`DoorbellBuffers.forget`, after which nothing is ever read from or written to those pages
again: after a reboot the next kernel may have reused them (OpenVMM PR 4080 corrupted guest
memory exactly that way).
"""

from __future__ import annotations

from vnvme.memory import DwordPage, GuestMemory, RemoteDwordPage


def _page(memory: GuestMemory, addr: int, size: int) -> DwordPage | RemoteDwordPage:
    if memory.is_remote(addr):
        memory.window(addr, size, write=True)  # checks it is all there and writable
        return RemoteDwordPage(memory, addr)
    return DwordPage(memory.view(addr, size, write=True))


class DoorbellBuffers:
    __slots__ = ("shadow", "eventidx", "shadow_addr", "eventidx_addr", "page_size")

    def __init__(self) -> None:
        self.shadow: DwordPage | RemoteDwordPage | None = None
        self.eventidx: DwordPage | RemoteDwordPage | None = None
        self.shadow_addr = 0
        self.eventidx_addr = 0
        self.page_size = 0

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
        self.forget()
        self.shadow, self.eventidx = shadow, eventidx
        self.shadow_addr, self.eventidx_addr, self.page_size = shadow_addr, eventidx_addr, page_size

    def remap(self, memory: GuestMemory) -> None:
        """Look the pages up again after the guest memory map changed."""
        if self.shadow is None:
            return
        self.configure(memory, self.shadow_addr, self.eventidx_addr, self.page_size)

    def forget(self) -> None:
        for page in (self.shadow, self.eventidx):
            if page is not None:
                page.release()
        self.shadow = self.eventidx = None
        self.shadow_addr = self.eventidx_addr = self.page_size = 0
