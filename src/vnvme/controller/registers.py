"""BAR0's register file (NVMe 1.3 §3.1), driven by the declarations of
:data:`vnvme.spec.registers.REGISTERS`: the one place BAR0's access rules live.

- Width and alignment: 1, 2, 4 or 8 bytes, naturally aligned, else refused with EINVAL.
- Read-only registers: a write that touches one is refused with EPERM.
- Writes the controller ignores (traced as ``pci_nvme_err_mmio``, no error to the peer): 1- or
  2-byte writes, 64-bit writes to a 32-bit register, writes to reserved offsets, admin queue
  registers while CC.EN = 1, doorbell writes that are not 32-bit.
- Reads of reserved offsets and of the doorbells (write-only, §3.1.10) return zero.

A refusal is :class:`RegisterRefused`: an edge answers it with its errno (vnvme.function), the
in-process controller traces it and goes on. The registers with side effects (CC, CSTS, INTMS,
INTMC, NSSR) are handed to the controller's actions; the others are stored here.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Mapping
from typing import Final, Protocol

from vnvme.controller.config import ControllerConfig
from vnvme.spec.registers import CAP, DOORBELL_BASE, REGISTER_FILE_SIZE, REGISTERS, Reg, Register, compose

#: (BAR0 offset, size, value, reason) of one ignored or refused access, as traced.
Report = tuple[int, int, int, str]

WIDTH_OR_ALIGNMENT: Final = "unsupported write width or alignment"
READ_WIDTH_OR_ALIGNMENT: Final = "unsupported read width or alignment"
READ_ONLY: Final = "write to a read-only or reserved register"
_SIZES: Final = (1, 2, 4, 8)


def capabilities(cfg: ControllerConfig) -> int:
    """CAP (§3.1.1) for a configuration."""
    return compose(
        (CAP.MQES, cfg.max_queue_entries - 1),
        (CAP.CQR, 1),
        (CAP.TO, cfg.timeout_500ms),
        (CAP.DSTRD, cfg.dstrd),
        (CAP.NSSRS, int(cfg.nssr_supported)),
        (CAP.CSS, 1),  # NVM command set
        (CAP.MPSMIN, cfg.mps_min),
        (CAP.MPSMAX, cfg.mps_max),
    )


class RegisterRefused(Exception):
    """A BAR0 access the register file refuses, with the errno a peer gets and what to trace."""

    def __init__(self, errno_value: int, reports: tuple[Report, ...]) -> None:
        super().__init__(reports[0][3])
        self.errno = errno_value
        self.reports = reports


class _Tracer(Protocol):
    tracing: bool

    def trace(self, name: str, *args: int | str) -> None: ...


class RegisterFile:
    """The registers below the doorbells. ``live``: registers whose value another part owns
    (CAP, CC, CSTS, INTMS / INTMC), read through these; ``actions``: what a 32-bit write to a
    register with side effects does (it gets the value written)."""

    def __init__(
        self,
        live: Mapping[Reg, Callable[[], int]],
        actions: Mapping[Reg, Callable[[int], None]],
        enabled: Callable[[], bool],
        tracer: _Tracer,
    ) -> None:
        self._live = live
        self._actions = actions
        self._enabled = enabled
        self._tracer = tracer
        # Each register's dwords: offset -> (declaration, bit shift in the register).
        self._dwords: dict[int, tuple[Register, int]] = {
            r.reg + half: (r, 8 * half) for r in REGISTERS for half in range(0, r.width, 4)
        }
        self._read_only = frozenset(offset for offset, (r, _) in self._dwords.items() if not r.writable)
        self._wide = frozenset(r.reg for r in REGISTERS if r.width == 8)
        self.stored: dict[Reg, int] = {}
        self.reads = 0
        self.writes = 0
        self.reset()

    def reset(self) -> None:
        """Every stored register back to its declared reset value."""
        self.stored = {r.reg: r.reset for r in REGISTERS if r.reg not in self._live}

    def value(self, reg: Reg) -> int:
        live = self._live.get(reg)
        return live() if live is not None else self.stored.get(reg, 0)

    # Section: rules

    def check_read(self, offset: int, size: int) -> None:
        if size not in _SIZES or offset < 0 or offset % size:
            raise RegisterRefused(errno.EINVAL, ((offset, size, 0, READ_WIDTH_OR_ALIGNMENT),))

    def check_write(self, offset: int, size: int, value: int) -> str | None:
        """Raise :class:`RegisterRefused` for a write a peer must be told of; return the reason
        a write is ignored, or None if it is taken."""
        if size not in _SIZES or offset < 0 or offset % size:
            raise RegisterRefused(errno.EINVAL, ((offset, size, value, WIDTH_OR_ALIGNMENT),))
        if offset >= DOORBELL_BASE:
            return None if size == 4 else "doorbell writes are 32-bit"
        reason = None
        if size < 4:
            reason = WIDTH_OR_ALIGNMENT
        elif size == 8 and offset not in self._wide:
            reason = "64-bit write to a 32-bit register"
        touched = range(offset & ~3, offset + size, 4)
        if any(dword in self._read_only for dword in touched):
            if reason is None:  # reported per dword, as the halves of a 64-bit write are taken
                reports = tuple((d, 4, (value >> 8 * (d - offset)) & 0xFFFF_FFFF, READ_ONLY) for d in touched)
            else:
                reports = ((offset, size, value, reason),)
            raise RegisterRefused(errno.EPERM, reports)
        return reason

    # Section: accesses

    def read(self, offset: int, size: int) -> int:
        """Read ``size`` bytes at ``offset`` (below or above the doorbell base)."""
        self.check_read(offset, size)
        self.reads += 1
        if offset >= REGISTER_FILE_SIZE:
            return 0  # §3.1.10: doorbell registers are write-only; reads return zero
        value = 0
        for byte in range(size):
            pos = offset + byte
            value |= ((self._read_dword(pos & ~3) >> (8 * (pos & 3))) & 0xFF) << (8 * byte)
        tracer = self._tracer
        if tracer.tracing:
            tracer.trace("pci_nvme_mmio_read", offset, size, value)
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        """Write a register (not a doorbell: the controller takes those first)."""
        reason = self.check_write(offset, size, value)
        if reason is not None:
            self.ignored(offset, size, value, reason)
            return
        for dword in range(offset, offset + size, 4):
            self._write_dword(dword, (value >> 8 * (dword - offset)) & 0xFFFF_FFFF)

    def ignored(self, offset: int, size: int, value: int, reason: str) -> None:
        tracer = self._tracer
        if tracer.tracing:
            tracer.trace("pci_nvme_err_mmio", offset, size, value, reason)

    def _read_dword(self, offset: int) -> int:
        entry = self._dwords.get(offset)
        if entry is None:
            return 0
        register, shift = entry
        return (self.value(register.reg) >> shift) & 0xFFFF_FFFF

    def _write_dword(self, offset: int, value: int) -> None:
        self.writes += 1
        tracer = self._tracer
        if tracer.tracing:
            tracer.trace("pci_nvme_mmio_write", offset, 4, value)
        entry = self._dwords.get(offset)
        if entry is None:
            self.ignored(offset, 4, value, READ_ONLY)  # reserved
            return
        register, shift = entry
        if register.only_while_disabled and self._enabled():
            self.ignored(offset, 4, value, "admin queue register written while enabled")
            return
        action = self._actions.get(register.reg)
        if action is not None:
            action(value)
            return
        old = self.stored[register.reg]
        self.stored[register.reg] = (old & ~(0xFFFF_FFFF << shift)) | ((value << shift) & register.writable)
