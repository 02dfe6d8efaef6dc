"""The vfio-user wire format (QEMU docs/interop/vfio-user.rst, protocol 0.1), for both ends.

Every message is a 16-byte header (message id, command, size including the header, flags, errno)
and a command-specific payload; file descriptors travel as SCM_RIGHTS ancillary data with the
message's first bytes. This module knows nothing about NVMe, nor about what a server does.
"""

from __future__ import annotations

import array
import contextlib
import errno
import os
import socket
import struct
from dataclasses import dataclass, field
from enum import IntEnum, IntFlag
from typing import Final

VERSION_MAJOR: Final = 0
VERSION_MINOR: Final = 1


class Command(IntEnum):
    VERSION = 1
    DMA_MAP = 2
    DMA_UNMAP = 3
    DEVICE_GET_INFO = 4
    DEVICE_GET_REGION_INFO = 5
    DEVICE_GET_REGION_IO_FDS = 6
    DEVICE_GET_IRQ_INFO = 7
    DEVICE_SET_IRQS = 8
    REGION_READ = 9
    REGION_WRITE = 10
    DMA_READ = 11
    DMA_WRITE = 12
    DEVICE_RESET = 13
    REGION_WRITE_MULTI = 15
    DEVICE_FEATURE = 16
    MIG_DATA_READ = 17
    MIG_DATA_WRITE = 18


_COMMAND_NAMES: Final = {int(c): c.name for c in Command}


def command_name(command: int) -> str:
    return _COMMAND_NAMES.get(command) or f"UNKNOWN_{command}"


# Header flags: bits 0-3 type, bit 4 no reply, bit 5 error.
TYPE_MASK: Final = 0xF
TYPE_COMMAND: Final = 0
TYPE_REPLY: Final = 1
FLAG_NO_REPLY: Final = 1 << 4
FLAG_ERROR: Final = 1 << 5

# A plain int: socket.MSG_CTRUNC is an IntFlag, whose & costs a Python-level call per message.
_MSG_CTRUNC: Final = int(socket.MSG_CTRUNC)

HEADER: Final = struct.Struct("<HHIII")
HEADER_SIZE: Final = HEADER.size
_HEADER_PACK: Final = HEADER.pack
_HEADER_UNPACK: Final = HEADER.unpack
assert HEADER_SIZE == 16

# Payload layouts (all little-endian: x86 and arm64 hosts; the spec says host order).
DMA_MAP: Final = struct.Struct("<IIQQQ")  # argsz flags offset address size
DMA_UNMAP: Final = struct.Struct("<IIQQ")  # argsz flags address size
DEVICE_INFO: Final = struct.Struct("<IIII")  # argsz flags num_regions num_irqs
REGION_INFO: Final = struct.Struct("<IIIIQQ")  # argsz flags index cap_offset size offset
CAP_HEADER: Final = struct.Struct("<HHI")  # id version next
SPARSE_MMAP: Final = struct.Struct("<II")  # nr_areas reserved, then areas
SPARSE_AREA: Final = struct.Struct("<QQ")  # offset size
IRQ_INFO: Final = struct.Struct("<IIII")  # argsz flags index count
IRQ_SET: Final = struct.Struct("<IIIII")  # argsz flags index start count, then data
REGION_ACCESS: Final = struct.Struct("<QII")  # offset region count, then data
DMA_ACCESS: Final = struct.Struct("<QQ")  # address count, then data
WRITE_MULTI_COUNT: Final = struct.Struct("<Q")
WRITE_MULTI_ENTRY: Final = struct.Struct("<QII8s")  # offset region count data[8]
for _layout, _size in (
    (DMA_MAP, 32),
    (DMA_UNMAP, 24),
    (DEVICE_INFO, 16),
    (REGION_INFO, 32),
    (CAP_HEADER, 8),
    (IRQ_INFO, 16),
    (IRQ_SET, 20),
    (REGION_ACCESS, 16),
    (DMA_ACCESS, 16),
    (WRITE_MULTI_ENTRY, 24),
):
    assert _layout.size == _size, (_layout.format, _size)


class DmaFlags(IntFlag):
    READ = 1 << 0
    WRITE = 1 << 1


class DmaUnmapFlags(IntFlag):
    GET_DIRTY_BITMAP = 1 << 0
    ALL = 1 << 1


class DeviceFlags(IntFlag):
    RESET = 1 << 0
    PCI = 1 << 1


class RegionFlags(IntFlag):
    READ = 1 << 0
    WRITE = 1 << 1
    MMAP = 1 << 2
    CAPS = 1 << 3


REGION_INFO_CAP_SPARSE_MMAP: Final = 1


class PciRegion(IntEnum):
    """Linux VFIO's region indices for a PCI device."""

    BAR0 = 0
    BAR1 = 1
    BAR2 = 2
    BAR3 = 3
    BAR4 = 4
    BAR5 = 5
    ROM = 6
    CONFIG = 7
    VGA = 8


PCI_NUM_REGIONS: Final = 9


class PciIrq(IntEnum):
    """Linux VFIO's interrupt indices for a PCI device."""

    INTX = 0
    MSI = 1
    MSIX = 2
    ERR = 3
    REQ = 4


PCI_NUM_IRQS: Final = 5


class IrqInfoFlags(IntFlag):
    EVENTFD = 1 << 0
    MASKABLE = 1 << 1
    AUTOMASKED = 1 << 2
    NORESIZE = 1 << 3


class IrqSetFlags(IntFlag):
    DATA_NONE = 1 << 0
    DATA_BOOL = 1 << 1
    DATA_EVENTFD = 1 << 2
    ACTION_MASK = 1 << 3
    ACTION_UNMASK = 1 << 4
    ACTION_TRIGGER = 1 << 5


IRQ_SET_DATA_MASK: Final = IrqSetFlags.DATA_NONE | IrqSetFlags.DATA_BOOL | IrqSetFlags.DATA_EVENTFD
IRQ_SET_ACTION_MASK: Final = IrqSetFlags.ACTION_MASK | IrqSetFlags.ACTION_UNMASK | IrqSetFlags.ACTION_TRIGGER

# Defaults from the VERSION capability table.
DEFAULT_MAX_MSG_FDS: Final = 1
DEFAULT_MAX_DATA_XFER_SIZE: Final = 1 << 20
DEFAULT_MAX_DMA_MAPS: Final = 65535
DEFAULT_PGSIZES: Final = 4096
# Room for the largest fixed part of any message next to max_data_xfer_size bytes of data.
MESSAGE_OVERHEAD: Final = 4096


class ProtocolError(Exception):
    """A peer broke the protocol; ``errno`` is what an error reply carries."""

    def __init__(self, err: int, reason: str) -> None:
        super().__init__(f"{reason} ({errno.errorcode.get(err, err)})")
        self.errno = err
        self.reason = reason


class Disconnected(Exception):
    """The peer closed the socket (possibly in the middle of a message)."""


@dataclass(slots=True)
class Message:
    msg_id: int
    command: int
    flags: int
    error: int
    payload: bytes
    fds: list[int] = field(default_factory=list)
    #: Set when the header said more bytes than the receiver accepts: the payload was dropped.
    oversized: int = 0
    #: More descriptors came than the receiver accepts; the kernel dropped the excess.
    fds_truncated: bool = False

    @property
    def is_reply(self) -> bool:
        return self.flags & TYPE_MASK == TYPE_REPLY

    @property
    def no_reply(self) -> bool:
        return bool(self.flags & FLAG_NO_REPLY)

    @property
    def is_error(self) -> bool:
        return bool(self.flags & FLAG_ERROR)

    def close_fds(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()


def pack_message(msg_id: int, command: int, flags: int, payload: bytes = b"", error: int = 0) -> bytes:
    return HEADER.pack(msg_id & 0xFFFF, command, HEADER_SIZE + len(payload), flags, error) + payload


class Channel:
    """One end of a vfio-user socket: framed, bounded messages with file descriptors."""

    def __init__(self, sock: socket.socket, *, max_message: int, max_fds: int) -> None:
        self.sock = sock
        self.max_message = max_message
        self.max_fds = max_fds
        self._header = bytearray(HEADER_SIZE)
        self._ancillary = socket.CMSG_SPACE(max(max_fds, 1) * 4)

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    def _discard(self, count: int) -> None:
        scratch = bytearray(min(count, 1 << 16))
        view = memoryview(scratch)
        while count:
            n = self.sock.recv_into(view[: min(count, len(scratch))])
            if n == 0:
                raise Disconnected("peer closed the socket mid-message")
            count -= n

    def receive(self) -> Message:
        """The next message. Never allocates more than ``max_message`` bytes for one: a longer
        one is read off the socket in small pieces and returned with ``oversized`` set."""
        sock = self.sock
        data, ancdata, msg_flags, _ = sock.recvmsg(HEADER_SIZE, self._ancillary)
        if not ancdata and not msg_flags & _MSG_CTRUNC and len(data) == HEADER_SIZE:
            # The common case, without the general path's calls: a whole header, no descriptors.
            msg_id, command, size, flags, error = _HEADER_UNPACK(data)
            if HEADER_SIZE < size <= self.max_message:
                body = size - HEADER_SIZE
                payload = sock.recv(body)
                if len(payload) < body:
                    payload = self._receive_remaining(payload, body)
                return Message(msg_id, command, flags, error, payload, [])
            return self._receive_rest(data, [], False)
        fds: list[int] = []
        if ancdata:
            for level, kind, raw in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    words = array.array("i")
                    words.frombytes(raw[: len(raw) - len(raw) % 4])
                    fds.extend(words)
        truncated = bool(msg_flags & _MSG_CTRUNC)
        try:
            return self._receive_rest(data, fds, truncated)
        except BaseException:
            # The peer hung up (or the socket failed) before the message was whole: the
            # descriptors that came with its first bytes are nobody's.
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            raise

    def _receive_rest(self, data: bytes, fds: list[int], truncated: bool) -> Message:
        sock = self.sock
        if len(data) < HEADER_SIZE:
            # The common case is one read; a header split across reads is rare but legal.
            header = bytearray(data)
            while len(header) < HEADER_SIZE:
                if not data:
                    raise Disconnected("peer closed the socket" if not header else "peer closed mid-header")
                data = sock.recv(HEADER_SIZE - len(header))
                header += data
            data = bytes(header)
        msg_id, command, size, flags, error = HEADER.unpack(data)
        message = Message(msg_id, command, flags, error, b"", fds, fds_truncated=truncated)
        self._receive_body(message, size)  # receive() closes the fds if this raises
        return message

    def _receive_body(self, message: Message, size: int) -> None:
        sock = self.sock
        body = size - HEADER_SIZE
        if size > self.max_message:
            self._discard(body)
            message.oversized = size
            return
        if body > 0:
            payload = sock.recv(body)
            if len(payload) < body:
                payload = self._receive_remaining(payload, body)
            message.payload = payload
        elif body < 0:
            message.oversized = -1  # a size that cannot even hold the header

    def _receive_remaining(self, payload: bytes, body: int) -> bytes:
        """The rest of a payload that did not come in one read."""
        rest = bytearray(payload)
        while len(rest) < body:
            more = self.sock.recv(body - len(rest))
            if not more:
                raise Disconnected("peer closed the socket mid-message")
            rest += more
        return bytes(rest)

    def send(self, data: bytes, fds: list[int] | None = None) -> None:
        if fds:
            sent = self.sock.sendmsg(
                [data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
            )
            if sent < len(data):
                self.sock.sendall(data[sent:])
        else:
            self.sock.sendall(data)

    def reply(self, request: Message, payload: bytes = b"", fds: list[int] | None = None) -> None:
        # pack_message, inlined: a reply goes out per command.
        data = _HEADER_PACK(
            request.msg_id & 0xFFFF, request.command, HEADER_SIZE + len(payload), TYPE_REPLY, 0
        )
        if fds:
            self.send(data + payload, fds)
        else:
            self.sock.sendall(data + payload)

    def reply_error(self, request: Message, err: int) -> None:
        self.send(pack_message(request.msg_id, request.command, TYPE_REPLY | FLAG_ERROR, b"", err))
