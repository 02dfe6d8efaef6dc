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
import select
import socket
import struct
import time
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
# Plain ints too: a constant, not a lookup in the socket module per message.
_MSG_DONTWAIT: Final = int(socket.MSG_DONTWAIT)

HEADER: Final = struct.Struct("<HHIII")
HEADER_SIZE: Final = HEADER.size
_HEADER_PACK: Final = HEADER.pack
_HEADER_UNPACK: Final = HEADER.unpack
_HEADER_UNPACK_FROM: Final = HEADER.unpack_from
_SIZE_UNPACK_FROM: Final = struct.Struct("<I").unpack_from
# What a buffered channel reads at most at once; longer messages are read exactly.
_RECEIVE_BUFFER: Final = 1 << 16
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


class MessageTimeout(Disconnected):
    """A message begun was not completed within the channel's ``message_timeout``: the peer
    stopped part way through sending one (half a header, a body never finished), or stopped
    reading ours. The stream's framing is lost as with a hang-up: the caller closes it."""

    def __init__(self, done: int, expected: int, seconds: float, *, sending: bool = False) -> None:
        self.direction = "sending" if sending else "receiving"
        super().__init__(f"{self.direction} a message stalled at {done} of {expected} bytes for {seconds} s")
        self.done = done
        self.expected = expected
        self.seconds = seconds


class MessageTooLarge(ProtocolError):
    """A header declared more bytes than the receiver accepts. Nothing of the body was read
    (waiting for up to 4 GiB the peer may never send is no way to resynchronise), so the stream
    has lost its framing: the channel refuses to receive anything after it."""

    def __init__(self, msg_id: int, command: int, flags: int, size: int, limit: int) -> None:
        super().__init__(errno.E2BIG, f"message of {size} bytes exceeds the maximum of {limit}")
        self.msg_id = msg_id
        self.command = command
        self.flags = flags
        self.size = size
        self.limit = limit


class Message:
    """One received message. A plain class, not a dataclass: one is made per message, and
    mypyc compiles this ``__init__`` (a dataclass's is generated at run time, interpreted)."""

    __slots__ = ("msg_id", "command", "flags", "error", "payload", "fds", "undersized", "fds_truncated")

    def __init__(
        self,
        msg_id: int,
        command: int,
        flags: int,
        error: int,
        payload: bytes,
        fds: list[int] | None = None,
        undersized: bool = False,
        fds_truncated: bool = False,
    ) -> None:
        self.msg_id = msg_id
        self.command = command
        self.flags = flags
        self.error = error
        self.payload = payload
        self.fds: list[int] = [] if fds is None else fds
        #: The header's size could not even hold the header (16 bytes were taken off the stream).
        self.undersized = undersized
        #: More descriptors came than the receiver accepts; the kernel dropped the excess.
        self.fds_truncated = fds_truncated

    def __repr__(self) -> str:
        return (
            f"Message(msg_id={self.msg_id}, command={self.command}, flags={self.flags:#x}, "
            f"error={self.error}, payload={len(self.payload)} bytes, fds={self.fds})"
        )

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


def _fds_of(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, raw in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            words = array.array("i")
            words.frombytes(raw[: len(raw) - len(raw) % 4])
            fds.extend(words)
    return fds


def _rights(fds: list[int]) -> tuple[int, int, bytes]:
    """The SCM_RIGHTS ancillary item carrying ``fds``."""
    return (socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class Channel:
    """One end of a vfio-user socket: framed, bounded messages with file descriptors.

    ``buffered``: read the stream in large pieces (one read per message, usually, instead of a
    header read and a body read), keeping what belongs to later messages. Then poll() on the
    socket no longer tells whether a message is waiting: ask :meth:`buffered_header` first.
    Descriptors go to the message that starts last in the read that brought them: Linux ends
    a read of a stream socket with the piece of data they came with, and a sender attaches
    them to the first piece of the message they belong to. A message holds at most ``max_fds``
    of them however many pieces it comes in; the kernel or the channel closes the rest.

    ``message_timeout`` (buffered channels): how long the rest of a message begun (half a
    header, a body not complete) may take to arrive, counted from the first time it has to be
    waited for, and how long a message sent may wait for the peer to make room for it; past it
    :class:`MessageTimeout`. None waits for ever. Waiting for a message to begin is the
    caller's business.
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        max_message: int,
        max_fds: int,
        buffered: bool = False,
        message_timeout: float | None = None,
    ) -> None:
        if message_timeout is not None and not buffered:
            raise ValueError("a message timeout needs a buffered channel")
        self.sock = sock
        # The socket's C methods, bound once: socket.socket is a Python subclass, so each
        # method lookup on it walks two classes, once or twice a message.
        self._recvmsg_into = sock.recvmsg_into
        self._send = sock.send
        self.max_message = max_message
        self.max_fds = max_fds
        self.message_timeout = message_timeout
        self._header = bytearray(HEADER_SIZE)
        self._ancillary = socket.CMSG_SPACE(max(max_fds, 1) * 4)
        self._buffered = buffered
        self._rbuf = bytearray(_RECEIVE_BUFFER if buffered else 0)
        self._rview = memoryview(self._rbuf)
        self._rviews = [self._rview]
        # Unread bytes are _rbuf[_rpos:_rend]; _rbuf[0] is byte _rbase of the stream.
        self._rpos = 0
        self._rend = 0
        self._rbase = 0
        # Descriptors not yet handed out: (stream offset of the message they belong to, fds,
        # whether the kernel dropped some).
        self._rfds: list[tuple[int, list[int], bool]] = []
        #: Set once a header declared a message too large: what follows it cannot be framed.
        self.framing_lost: MessageTooLarge | None = None

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.drop_pending()
        self.sock.close()

    def drop_pending(self) -> None:
        """Forget what was read ahead (a buffered channel), closing descriptors that came with it."""
        for _, fds, _ in self._rfds:
            _close_all(fds)
        self._rfds = []
        self._rbase += self._rend
        self._rpos = self._rend = 0

    def buffered_header(self) -> bool:
        """A whole message header is already read (buffered channels: poll() cannot see it)."""
        return self._rend - self._rpos >= HEADER_SIZE and self.framing_lost is None

    def _too_large(self, msg_id: int, command: int, flags: int, size: int) -> MessageTooLarge:
        """Remember that the stream lost its framing; the exception that says so."""
        self.framing_lost = MessageTooLarge(msg_id, command, flags, size, self.max_message)
        return self.framing_lost

    # Section: buffered receiving

    def receive_nowait(self) -> Message | None:
        """Buffered channels: the next message if the socket holds (the start of) one already,
        else None at once. Reading the rest of a message that has begun may still wait."""
        if self.framing_lost is not None:
            raise self.framing_lost
        try:
            if self._rpos == self._rend:
                return self._receive_fresh(_MSG_DONTWAIT)
            self._fill(_MSG_DONTWAIT)
        except BlockingIOError:
            return None
        return self._receive_buffered()

    def _receive_fresh(self, recv_flags: int = 0) -> Message:
        """Nothing read ahead (the usual case): one read, and if it brought exactly one whole
        message without descriptors, that is the message."""
        self._rbase += self._rend
        self._rpos = self._rend = 0
        nbytes, ancdata, msg_flags, _ = self._recvmsg_into(self._rviews, self._ancillary, recv_flags)
        if nbytes >= HEADER_SIZE and not ancdata and not msg_flags & _MSG_CTRUNC:
            msg_id, command, size, flags, error = _HEADER_UNPACK_FROM(self._rbuf)
            if size == nbytes and size <= self.max_message:
                self._rbase += size
                return Message(msg_id, command, flags, error, self._rview[HEADER_SIZE:size].tobytes(), [])
        self._filled(0, nbytes, ancdata, msg_flags)
        return self._receive_buffered()

    def _fill(self, recv_flags: int = 0) -> None:
        """One read into the buffer (moving the unread part to the front when it is full)."""
        if self._rpos == self._rend:
            self._rbase += self._rpos
            self._rpos = self._rend = 0
        elif self._rend == len(self._rbuf):
            unread = bytes(self._rview[self._rpos : self._rend])
            self._rbuf[: len(unread)] = unread
            self._rbase += self._rpos
            self._rpos, self._rend = 0, len(unread)
        start = self._rend
        nbytes, ancdata, msg_flags, _ = self._recvmsg_into([self._rview[start:]], self._ancillary, recv_flags)
        self._filled(start, nbytes, ancdata, msg_flags)

    def _filled(self, start: int, nbytes: int, ancdata: list[tuple[int, int, bytes]], msg_flags: int) -> None:
        """Account for a read of ``nbytes`` into the buffer at ``start``."""
        fds = _fds_of(ancdata) if ancdata else []
        if nbytes == 0:
            _close_all(fds)
            closed_clean = start == self._rpos
            self.drop_pending()  # descriptors of a message that never arrived whole
            raise Disconnected("peer closed the socket" if closed_clean else "peer closed mid-message")
        self._rend = start + nbytes
        if fds or msg_flags & _MSG_CTRUNC:
            owner = self._last_start()
            truncated = bool(msg_flags & _MSG_CTRUNC)
            # A message sent in many pieces may bring descriptors with each: it keeps max_fds
            # in all, so a peer that never finishes it holds no more than that here.
            held = sum(len(batch) for of, batch, _ in self._rfds if of == owner)
            room = max(self.max_fds - held, 0)
            if len(fds) > room:
                _close_all(fds[room:])
                fds, truncated = fds[:room], True
            self._rfds.append((owner, fds, truncated))

    def _fill_more(self, deadline: float | None, expected: int) -> float | None:
        """One more read for the message begun at ``_rpos`` (``expected`` bytes long as far as
        is known), within the message timeout; returns the deadline to pass to the next call."""
        if self.message_timeout is None:
            self._fill()
            return None
        while True:
            try:
                self._fill(_MSG_DONTWAIT)
                return deadline
            except BlockingIOError:
                deadline = self._wait_more(deadline, self._rend - self._rpos, expected)

    def _wait_more(self, deadline: float | None, received: int, expected: int) -> float:
        """Wait for more of a message begun until ``deadline`` (None: set it now)."""
        timeout = self.message_timeout
        assert timeout is not None
        now = time.monotonic()
        if deadline is None:
            deadline = now + timeout
        poller = select.poll()  # not select(): descriptors past 1023 are fine
        poller.register(self.sock, select.POLLIN)
        if now >= deadline or not poller.poll(max((deadline - now) * 1e3, 1)):
            raise MessageTimeout(received, expected, timeout)
        return deadline

    def _last_start(self) -> int:
        """Stream offset of the last message that starts in the buffered bytes."""
        buf = self._rbuf
        pos = last = self._rpos
        while pos < self._rend:
            last = pos
            if pos + HEADER_SIZE > self._rend:
                break
            pos += max(_SIZE_UNPACK_FROM(buf, pos + 4)[0], HEADER_SIZE)
        return self._rbase + last

    def _take_fds(self, start: int) -> tuple[list[int], bool]:
        """The descriptors of the message at stream offset ``start``; older ones (a message
        already handed out, from a sender not attaching them to a message's first piece) are
        closed."""
        fds: list[int] = []
        truncated = False
        keep: list[tuple[int, list[int], bool]] = []
        for owner, batch, dropped in self._rfds:
            if owner == start:
                fds.extend(batch)
                truncated = truncated or dropped
            elif owner < start:
                _close_all(batch)
            else:
                keep.append((owner, batch, dropped))
        self._rfds = keep
        return fds, truncated

    def _receive_buffered(self) -> Message:
        deadline: float | None = None
        while self._rend - self._rpos < HEADER_SIZE:
            deadline = self._fill_more(deadline, HEADER_SIZE)
        pos = self._rpos
        msg_id, command, size, flags, error = _HEADER_UNPACK_FROM(self._rbuf, pos)
        if HEADER_SIZE <= size <= min(self.max_message, len(self._rbuf)):
            while self._rend - self._rpos < size:
                deadline = self._fill_more(deadline, size)
            pos = self._rpos
            self._rpos = pos + size
            payload = bytes(self._rview[pos + HEADER_SIZE : pos + size])
            if not self._rfds:
                return Message(msg_id, command, flags, error, payload, [])
            fds, truncated = self._take_fds(self._rbase + pos)
            return Message(msg_id, command, flags, error, payload, fds, fds_truncated=truncated)
        # Larger than the buffer, too large or undersized: the rest is read off the socket
        # exactly, as the unbuffered channel does.
        self._rpos = pos + HEADER_SIZE
        fds, truncated = self._take_fds(self._rbase + pos) if self._rfds else ([], False)
        if size > self.max_message:
            _close_all(fds)
            raise self._too_large(msg_id, command, flags, size)
        message = Message(msg_id, command, flags, error, b"", fds, fds_truncated=truncated)
        if size < HEADER_SIZE:
            message.undersized = True
            return message
        try:
            body = size - HEADER_SIZE
            data = bytearray(body)
            got = min(body, self._rend - self._rpos)
            data[:got] = self._rview[self._rpos : self._rpos + got]
            self._rpos += got
            view = memoryview(data)
            recv_flags = 0 if self.message_timeout is None else _MSG_DONTWAIT
            while got < body:
                try:
                    n = self.sock.recv_into(view[got:], 0, recv_flags)
                except BlockingIOError:
                    deadline = self._wait_more(deadline, HEADER_SIZE + got, size)
                    continue
                if n == 0:
                    raise Disconnected("peer closed the socket mid-message")
                got += n
            view.release()
            message.payload = bytes(data)
        except BaseException:
            message.close_fds()
            raise
        return message

    def receive(self) -> Message:
        """The next message. A header declaring more than ``max_message`` bytes raises
        :class:`MessageTooLarge` before any byte of its body is read, and so does every call
        after it."""
        if self.framing_lost is not None:
            raise self.framing_lost
        if self._buffered:
            if self._rpos != self._rend:
                return self._receive_buffered()
            return self._receive_fresh()
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
        fds = _fds_of(ancdata) if ancdata else []
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
        if size > self.max_message:
            raise self._too_large(msg_id, command, flags, size)  # receive() closes the fds
        message = Message(msg_id, command, flags, error, b"", fds, fds_truncated=truncated)
        body = size - HEADER_SIZE
        if body > 0:
            payload = sock.recv(body)
            if len(payload) < body:
                payload = self._receive_remaining(payload, body)
            message.payload = payload
        elif body < 0:
            message.undersized = True
        return message

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
        """A whole message, ``fds`` riding on its first byte. With a message timeout, a peer
        that stops reading has that long to make room for the rest, not for ever."""
        if self.message_timeout is not None:
            try:
                if fds:
                    sent = self.sock.sendmsg([data], [_rights(fds)], _MSG_DONTWAIT)
                    fds = None
                else:
                    sent = self._send(data, _MSG_DONTWAIT)
            except BlockingIOError:
                sent = 0
            if sent < len(data):
                self._send_rest(data, sent, fds)
            return
        if fds:
            sent = self.sock.sendmsg([data], [_rights(fds)])
            if sent < len(data):
                self.sock.sendall(data[sent:])
        else:
            self.sock.sendall(data)

    def _send_rest(self, data: bytes, sent: int, fds: list[int] | None) -> None:
        """The rest of a message from byte ``sent`` on (``fds`` not sent yet: none was)."""
        timeout = self.message_timeout
        assert timeout is not None
        deadline = time.monotonic() + timeout
        poller = select.poll()
        poller.register(self.sock, select.POLLOUT)
        view = memoryview(data)
        while sent < len(data):
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(max(left * 1e3, 1)):
                raise MessageTimeout(sent, len(data), timeout, sending=True)
            try:
                if fds:
                    sent += self.sock.sendmsg([view[sent:]], [_rights(fds)], _MSG_DONTWAIT)
                    fds = None
                else:
                    sent += self.sock.send(view[sent:], _MSG_DONTWAIT)
            except BlockingIOError:
                continue

    def reply(self, request: Message, payload: bytes = b"", fds: list[int] | None = None) -> None:
        # pack_message, inlined: a reply goes out per command.
        data = _HEADER_PACK(
            request.msg_id & 0xFFFF, request.command, HEADER_SIZE + len(payload), TYPE_REPLY, 0
        )
        if fds or self.message_timeout is not None:
            self.send(data + payload, fds)
        else:
            self.sock.sendall(data + payload)

    def reply_error(self, request: Message, err: int) -> None:
        self.send(pack_message(request.msg_id, request.command, TYPE_REPLY | FLAG_ERROR, b"", err))
