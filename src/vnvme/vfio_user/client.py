"""A vfio-user client: what QEMU's ``vfio-user-pci`` does, in Python, for tests and benchmarks.

:class:`VfioUserClient` speaks the protocol and knows nothing of NVMe or of the host driver;
:class:`vnvme.driver.vfio_user.VfioUserTransport` puts the driver on top of it.
"""

from __future__ import annotations

import errno
import json
import os
import select
import socket
import struct
import time
from dataclasses import dataclass, field

from vnvme.vfio_user import protocol as vu
from vnvme.vfio_user.protocol import Channel, Command, Message

# REGION_WRITE's header and access fields in one layout (see region_write).
_REGION_WRITE_HEAD = struct.Struct("<" + vu.HEADER.format.lstrip("<") + vu.REGION_ACCESS.format.lstrip("<"))
_REGION_WRITE_SIZE = _REGION_WRITE_HEAD.size
_REGION_WRITE = int(Command.REGION_WRITE)
_BAR0 = int(vu.PciRegion.BAR0)


class VfioUserError(OSError):
    """The server answered with an error reply."""


@dataclass
class RegionInfo:
    index: int
    flags: int
    size: int
    offset: int
    sparse: list[tuple[int, int]] = field(default_factory=list)
    fd: int = -1


@dataclass
class ClientStatistics:
    requests: int = 0
    posted_writes: int = 0
    round_trip_seconds: float = 0.0


class VfioUserClient:
    def __init__(self, path: str, *, timeout: float = 10.0, max_fds: int = 16) -> None:
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(path)
                break
            except ConnectionRefusedError:
                # A server that bound its socket but is not listening yet: try again shortly.
                sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        sock.settimeout(None)
        self.timeout = timeout
        self.channel = Channel(
            sock,
            max_message=(1 << 20) + vu.MESSAGE_OVERHEAD,
            max_fds=max_fds,
            buffered=True,
            message_timeout=timeout,
        )
        self._poller = select.poll()
        self._poller.register(sock, select.POLLIN)
        self._msg_id = 0
        self.server_caps: dict[str, object] = {}
        self.stats = ClientStatistics()
        # Memory mapped without a file descriptor: the server reads and writes it by messages.
        self._dma_windows: list[tuple[int, memoryview]] = []
        self.dma_requests_served = 0

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> VfioUserClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Section: messages

    def _next_id(self) -> int:
        self._msg_id = (self._msg_id + 1) & 0xFFFF
        return self._msg_id

    def send(
        self, command: int, payload: bytes = b"", fds: list[int] | None = None, *, no_reply: bool = False
    ) -> int:
        msg_id = self._next_id()
        flags = vu.TYPE_COMMAND | (vu.FLAG_NO_REPLY if no_reply else 0)
        self.channel.send(vu.pack_message(msg_id, command, flags, payload), fds)
        return msg_id

    def receive_reply(self, msg_id: int, command: int) -> Message:
        """Wait for the reply to ``msg_id``, serving the server's DMA requests meanwhile."""
        deadline = time.monotonic() + self.timeout
        channel = self.channel
        while True:
            # Wait in poll(), not in the read: a task asleep in a read of a UNIX socket is also
            # woken when the peer reads what we sent (write space), poll() only for data. Those
            # extra wake-ups cost a context switch each (two on one CPU).
            if not channel.buffered_header() and not self._poller.poll(
                max(deadline - time.monotonic(), 0) * 1e3
            ):
                raise TimeoutError(f"no reply to {vu.command_name(command)} within {self.timeout} s")
            reply = channel.receive()
            if not reply.is_reply:
                self._serve(reply)
                # A server that keeps asking (DMA requests without end) never lets the poll
                # above time out: the deadline holds whatever comes in meanwhile.
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"no reply to {vu.command_name(command)} within {self.timeout} s "
                        "(the server's requests kept coming)"
                    )
                continue
            if reply.msg_id != msg_id or reply.command != command:
                reply.close_fds()
                raise vu.ProtocolError(
                    errno.EPROTO, f"unexpected reply {reply.command}/{reply.msg_id} for {command}/{msg_id}"
                )
            if reply.is_error:
                reply.close_fds()
                err = reply.error or errno.EIO
                raise VfioUserError(err, f"{vu.command_name(command)}: {os.strerror(err)}")
            return reply

    def service(self) -> int:
        """Serve every server request already waiting on the socket; returns how many."""
        served = 0
        channel = self.channel
        while channel.buffered_header() or select.select([channel.sock], [], [], 0)[0]:
            message = self.channel.receive()
            if message.is_reply:
                message.close_fds()
                raise vu.ProtocolError(errno.EPROTO, f"reply {message.msg_id} nobody asked for")
            self._serve(message)
            served += 1
        return served

    def serve_dma(self, address: int, view: memoryview) -> None:
        """Answer DMA_READ / DMA_WRITE for [address, address + len(view)) from ``view``."""
        self._dma_windows.append((address, view))

    def _window(self, address: int, count: int) -> memoryview | None:
        for base, view in self._dma_windows:
            if base <= address and address + count <= base + len(view):
                return view[address - base : address - base + count]
        return None

    def _serve(self, message: Message) -> None:
        message.close_fds()
        payload = message.payload
        if message.command not in (Command.DMA_READ, Command.DMA_WRITE) or len(payload) < vu.DMA_ACCESS.size:
            self.channel.reply_error(message, errno.EINVAL)
            return
        address, count = vu.DMA_ACCESS.unpack_from(payload)
        window = self._window(address, count)
        if window is None:
            self.channel.reply_error(message, errno.EFAULT)
            return
        self.dma_requests_served += 1
        if message.command == Command.DMA_READ:
            self.channel.reply(message, vu.DMA_ACCESS.pack(address, count) + bytes(window))
        else:
            data = payload[vu.DMA_ACCESS.size :]
            if len(data) != count:
                self.channel.reply_error(message, errno.EINVAL)
                return
            window[:] = data
            self.channel.reply(message, vu.DMA_ACCESS.pack(address, count))

    def request(self, command: int, payload: bytes = b"", fds: list[int] | None = None) -> Message:
        self.stats.requests += 1
        return self.receive_reply(self.send(command, payload, fds), command)

    # Section: commands

    def negotiate(self, *, max_data_xfer_size: int = 1 << 20) -> dict[str, object]:
        caps = {"capabilities": {"max_msg_fds": 16, "max_data_xfer_size": max_data_xfer_size}}
        body = vu.VERSION_MAJOR.to_bytes(2, "little") + vu.VERSION_MINOR.to_bytes(2, "little")
        reply = self.request(Command.VERSION, body + json.dumps(caps).encode() + b"\0")
        text = reply.payload[4:].split(b"\0", 1)[0]
        parsed = json.loads(text) if text else {}
        self.server_caps = parsed.get("capabilities", {})
        return self.server_caps

    def device_info(self) -> tuple[int, int, int]:
        reply = self.request(Command.DEVICE_GET_INFO, vu.DEVICE_INFO.pack(vu.DEVICE_INFO.size, 0, 0, 0))
        _argsz, flags, regions, irqs = vu.DEVICE_INFO.unpack_from(reply.payload)
        return flags, regions, irqs

    def region_info(self, index: int) -> RegionInfo:
        argsz = 256
        reply = self.request(Command.DEVICE_GET_REGION_INFO, vu.REGION_INFO.pack(argsz, 0, index, 0, 0, 0))
        need, flags, _index, cap_offset, size, offset = vu.REGION_INFO.unpack_from(reply.payload)
        info = RegionInfo(index, flags, size, offset, fd=reply.fds[0] if reply.fds else -1)
        for extra in reply.fds[1:]:
            os.close(extra)
        payload = reply.payload
        while cap_offset and cap_offset + vu.CAP_HEADER.size <= len(payload):
            cap_id, _version, nxt = vu.CAP_HEADER.unpack_from(payload, cap_offset)
            if cap_id == vu.REGION_INFO_CAP_SPARSE_MMAP:
                nr, _ = vu.SPARSE_MMAP.unpack_from(payload, cap_offset + 8)
                for i in range(nr):
                    info.sparse.append(vu.SPARSE_AREA.unpack_from(payload, cap_offset + 16 + 16 * i))
            cap_offset = nxt
        del need
        return info

    def irq_info(self, index: int) -> tuple[int, int]:
        reply = self.request(Command.DEVICE_GET_IRQ_INFO, vu.IRQ_INFO.pack(vu.IRQ_INFO.size, 0, index, 0))
        _argsz, flags, _index, count = vu.IRQ_INFO.unpack_from(reply.payload)
        return flags, count

    def set_irq_eventfds(self, index: int, start: int, fds: list[int]) -> None:
        """Assign eventfds to vectors ``start...``, in chunks the server's max_msg_fds allows."""
        flags = vu.IrqSetFlags.DATA_EVENTFD | vu.IrqSetFlags.ACTION_TRIGGER
        limit = self.server_caps.get("max_msg_fds", vu.DEFAULT_MAX_MSG_FDS)
        chunk = limit if isinstance(limit, int) and limit > 0 else vu.DEFAULT_MAX_MSG_FDS
        for first in range(0, len(fds), chunk):
            part = fds[first : first + chunk]
            payload = vu.IRQ_SET.pack(vu.IRQ_SET.size, flags, index, start + first, len(part))
            self.request(Command.DEVICE_SET_IRQS, payload, part)

    def clear_irq_eventfds(self, index: int, start: int, count: int) -> None:
        flags = vu.IrqSetFlags.DATA_EVENTFD | vu.IrqSetFlags.ACTION_TRIGGER
        self.request(Command.DEVICE_SET_IRQS, vu.IRQ_SET.pack(vu.IRQ_SET.size, flags, index, start, count))

    def dma_map(
        self, address: int, size: int, fd: int | None, offset: int = 0, *, writable: bool = True
    ) -> None:
        """Map guest memory: with ``fd`` the server mmaps it; without, it uses DMA messages."""
        flags = vu.DmaFlags.READ | (vu.DmaFlags.WRITE if writable else 0)
        payload = vu.DMA_MAP.pack(vu.DMA_MAP.size, flags, offset, address, size)
        self.request(Command.DMA_MAP, payload, [fd] if fd is not None else None)

    def dma_unmap(self, address: int, size: int) -> None:
        self.request(Command.DMA_UNMAP, vu.DMA_UNMAP.pack(vu.DMA_UNMAP.size, 0, address, size))

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        reply = self.request(Command.REGION_READ, vu.REGION_ACCESS.pack(offset, index, count))
        _offset, _index, got = vu.REGION_ACCESS.unpack_from(reply.payload)
        return reply.payload[vu.REGION_ACCESS.size : vu.REGION_ACCESS.size + got]

    def region_write(self, index: int, offset: int, data: bytes, *, posted: bool = False) -> None:
        # Header and access packed together (a doorbell write is this, once per I/O or batch).
        msg_id = self._msg_id = (self._msg_id + 1) & 0xFFFF
        count = len(data)
        flags = vu.TYPE_COMMAND | (vu.FLAG_NO_REPLY if posted else 0)
        head = _REGION_WRITE_HEAD.pack(
            msg_id, _REGION_WRITE, _REGION_WRITE_SIZE + count, flags, 0, offset, index, count
        )
        self.channel.send(head + data)
        if posted:
            self.stats.posted_writes += 1
        else:
            self.stats.requests += 1
            self.receive_reply(msg_id, _REGION_WRITE)

    def reset(self) -> None:
        self.request(Command.DEVICE_RESET)
