"""A raw vfio-user client for the protocol tests: hand-built messages over a socketpair whose
other end a :class:`VfioUserServer` serves from a thread, with the server's device in reach."""

from __future__ import annotations

import json
import mmap
import os
import select
import socket
import tempfile
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Final

from vnvme.controller.namespace import Namespace, RamBackend
from vnvme.function import NvmeFunction
from vnvme.spec.registers import CC, CSTS, Reg, compose
from vnvme.trace import ListSink
from vnvme.vfio_user import protocol as vu
from vnvme.vfio_user.protocol import Channel, Command
from vnvme.vfio_user.server import ServerOptions, VfioUserServer

PAGE = 4096
#: Host order on every platform these tests run on.
LE: Final = "little"


def make_function(**options: object) -> NvmeFunction:
    """The device under test: an NVMe function with one 1 MiB RAM namespace."""
    return NvmeFunction([Namespace(1, RamBackend(1 << 20), 512)], **options)  # type: ignore[arg-type]


class Peer:
    """The client end of a socketpair whose other end a server thread serves."""

    def __init__(
        self,
        options: ServerOptions | None = None,
        *,
        function: NvmeFunction | None = None,
        max_fds: int = 16,
        trace: Sequence[str] = (),
    ) -> None:
        self.function = function if function is not None else make_function()
        #: The server's transport trace events (those ``trace`` selects).
        self.trace = ListSink()
        self.server = VfioUserServer(
            self.function, options or ServerOptions(), trace=trace, trace_sink=self.trace
        )
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock = mine
        self.channel = Channel(mine, max_message=(1 << 21), max_fds=max_fds)
        self.thread = threading.Thread(target=self.server.serve_connection, args=(theirs,), daemon=True)
        self.thread.start()
        self._theirs = theirs
        self._id = 0
        self._closed = False

    # Section: messages

    def send(self, command: int, payload: bytes = b"", fds: list[int] | None = None, flags: int = 0) -> int:
        self._id = (self._id + 1) & 0xFFFF
        self.channel.send(vu.pack_message(self._id, command, flags, payload), fds)
        return self._id

    def raw(self, data: bytes, fds: list[int] | None = None) -> None:
        """Bytes exactly as given (header included), descriptors riding on the first of them."""
        self.channel.send(data, fds)

    def reply(self, timeout: float = 5.0) -> vu.Message:
        ready, _, _ = select.select([self.sock], [], [], timeout)
        assert ready, "no reply"
        return self.channel.receive()

    def assert_silent(self, timeout: float = 0.1) -> None:
        """Nothing arrives within ``timeout`` seconds."""
        ready, _, _ = select.select([self.sock], [], [], timeout)
        assert not ready, "unexpected message from the server"

    def call(self, command: int, payload: bytes = b"", fds: list[int] | None = None) -> vu.Message:
        msg_id = self.send(command, payload, fds)
        reply = self.reply()
        assert reply.msg_id == msg_id and reply.command == command and reply.is_reply
        return reply

    def ok(self, command: int, payload: bytes = b"", fds: list[int] | None = None) -> vu.Message:
        """A call that must succeed."""
        reply = self.call(command, payload, fds)
        assert not reply.is_error, (vu.command_name(command), reply.error)
        assert reply.error == 0
        return reply

    def expect_error(self, command: int, payload: bytes, err: int, fds: list[int] | None = None) -> None:
        reply = self.call(command, payload, fds)
        assert reply.is_error and reply.error == err, (reply.flags, reply.error)
        assert reply.payload == b""  # an error reply is the header only
        assert not reply.fds

    # Section: commands

    def version(
        self, caps: dict[str, object] | None = None, minor: int = vu.VERSION_MINOR
    ) -> dict[str, object]:
        body = {"capabilities": {"max_msg_fds": 8}} if caps is None else caps
        payload = vu.VERSION_MAJOR.to_bytes(2, LE) + minor.to_bytes(2, LE) + json.dumps(body).encode() + b"\0"
        reply = self.ok(Command.VERSION, payload)
        parsed: dict[str, object] = json.loads(reply.payload[4:].rstrip(b"\0"))
        return parsed

    def enable_decoding(self) -> None:
        """What firmware does before a driver runs: Memory Space and Bus Master Enable."""
        self.write_int(vu.PciRegion.CONFIG, 0x04, 2, 0x0006)

    def read(self, region: int, offset: int, count: int) -> bytes:
        """REGION_READ: the data, after checking the reply echoes the request."""
        reply = self.ok(Command.REGION_READ, vu.REGION_ACCESS.pack(offset, region, count))
        assert vu.REGION_ACCESS.unpack_from(reply.payload) == (offset, region, count)
        data = reply.payload[vu.REGION_ACCESS.size :]
        assert len(data) == count
        return data

    def read_int(self, region: int, offset: int, count: int) -> int:
        return int.from_bytes(self.read(region, offset, count), LE)

    def write(self, region: int, offset: int, data: bytes) -> None:
        """REGION_WRITE: the reply echoes offset, region and count, and carries no data."""
        reply = self.ok(Command.REGION_WRITE, vu.REGION_ACCESS.pack(offset, region, len(data)) + data)
        assert reply.payload == vu.REGION_ACCESS.pack(offset, region, len(data))

    def write_int(self, region: int, offset: int, count: int, value: int) -> None:
        self.write(region, offset, value.to_bytes(count, LE))

    def dma_map(
        self,
        address: int,
        size: int,
        fd: int,
        offset: int = 0,
        flags: int = vu.DmaFlags.READ | vu.DmaFlags.WRITE,
    ) -> None:
        reply = self.ok(Command.DMA_MAP, vu.DMA_MAP.pack(vu.DMA_MAP.size, flags, offset, address, size), [fd])
        assert reply.payload == b""

    def set_irqs(
        self, flags: int, index: int, start: int, count: int, data: bytes = b"", fds: list[int] | None = None
    ) -> None:
        payload = vu.IRQ_SET.pack(vu.IRQ_SET.size + len(data), flags, index, start, count) + data
        reply = self.ok(Command.DEVICE_SET_IRQS, payload, fds)
        assert reply.payload == b""

    def map_shared(self, base: int, size: int) -> mmap.mmap:
        """DMA_MAP ``size`` bytes of a new memfd at ``base``; returns the host's view of them."""
        fd = memfd(size)
        try:
            self.dma_map(base, size, fd)
            return mmap.mmap(fd, size)
        finally:
            os.close(fd)

    def enable_with_admin_queues(self, asq: int, acq: int) -> int:
        """Vector 0 on a new eventfd, 2-entry admin queues at ``asq`` / ``acq`` (memory the
        caller mapped), CC.EN = 1; returns the eventfd once CSTS.RDY is 1."""
        vector0 = eventfd()
        self.set_irqs(
            vu.IrqSetFlags.DATA_EVENTFD | vu.IrqSetFlags.ACTION_TRIGGER, vu.PciIrq.MSIX, 0, 1, fds=[vector0]
        )
        self.write_int(0, Reg.AQA, 4, (1 << 16) | 1)
        self.write_int(0, Reg.ASQ, 8, asq)
        self.write_int(0, Reg.ACQ, 8, acq)
        self.write_int(0, Reg.CC, 4, compose((CC.EN, 1), (CC.IOSQES, 6), (CC.IOCQES, 4)))
        assert CSTS.RDY.get(self.read_int(0, Reg.CSTS, 4))
        return vector0

    # Section: teardown

    def disconnect(self) -> None:
        """Hang up and wait for the server to notice."""
        if not self._closed:
            self._closed = True
            self.sock.close()
        self.thread.join(5)
        assert not self.thread.is_alive()

    def close(self) -> None:
        self.server.stop()
        if not self._closed:
            self._closed = True
            self.sock.close()
        self.thread.join(5)
        self._theirs.close()
        self.function.close()


def memfd(size: int = 1 << 20) -> int:
    fd = os.memfd_create("test-dma", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def fd_count() -> int:
    """Descriptors open in this process (the server thread's included)."""
    return len(os.listdir("/proc/self/fd"))


def eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def signalled(fd: int) -> int:
    """The eventfd's counter (0 when nothing was signalled), which reading resets."""
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


@contextmanager
def listening_server(
    function: NvmeFunction, options: ServerOptions | None = None
) -> Iterator[tuple[str, VfioUserServer]]:
    """A server on a real listening socket, serving one connection from a thread."""
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "s.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(1)
        server = VfioUserServer(function, options)

        def serve() -> None:
            conn, _ = listener.accept()
            try:
                server.serve_connection(conn)
            finally:
                conn.close()

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            yield path, server
        finally:
            thread.join(5)
            listener.close()
        assert not thread.is_alive()
