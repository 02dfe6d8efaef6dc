"""Hostile peers against the server's real accept loop (serve._accept_clients), in this process:
a client that maps the most DMA regions, sends the most descriptors, stops part way through a
message, or never speaks. The server's descriptors (/proc/self/fd) and DMA mappings
(/proc/self/maps) stay within the bounds while it does and return to where they were once it is
gone; the next client is then served and does I/O."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import resource
import select
import socket
import termios
import threading
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from vfio_user.peer import PAGE, eventfd, fd_count, make_function
from vnvme.driver import NvmeDriver
from vnvme.driver.vfio_user import VfioUserTransport
from vnvme.serve import _accept_clients, listen
from vnvme.trace import ListSink
from vnvme.vfio_user import protocol as vu
from vnvme.vfio_user.protocol import Channel, Command
from vnvme.vfio_user.server import DMA_MAP_DESCRIPTORS, ServerOptions, VfioUserServer

MAX_DMA_MAPS = 32
MAX_MSG_FDS = 16
#: The kernel's limit of descriptors in one SCM_RIGHTS message (SCM_MAX_FD).
SCM_MAX_FD = 253
MEMFD_NAME = "vnvme-hostile"


@dataclass
class Served:
    path: str
    server: VfioUserServer
    trace: ListSink


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    """``vnvme serve``'s accept loop in a thread, with short timeouts and a small map limit."""
    options = ServerOptions(
        max_dma_maps=MAX_DMA_MAPS, max_msg_fds=MAX_MSG_FDS, handshake_timeout=0.3, message_timeout=0.3
    )
    yield from _serve(tmp_path, options)


def _serve(tmp_path: Path, options: ServerOptions) -> Generator[Served, None, None]:
    function = make_function()
    trace = ListSink()
    server = VfioUserServer(function, options, trace=["vfio_user_err_*"], trace_sink=trace)
    listener = listen(str(tmp_path / "s.sock"))
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    thread = threading.Thread(target=_accept_clients, args=(listener, server, wake_r), daemon=True)
    thread.start()
    try:
        yield Served(listener.path, server, trace)
    finally:
        server.stop()
        os.write(wake_w, b"x")
        thread.join(10)
        listener.close()
        os.close(wake_r)
        os.close(wake_w)
        function.close()
    assert not thread.is_alive()


def _memfd_mappings() -> int:
    """Mappings of the hostile peers' memfds (only the server maps them)."""
    with open("/proc/self/maps") as maps:
        return sum(1 for line in maps if MEMFD_NAME in line)


def _connect(path: str) -> tuple[socket.socket, Channel]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    return sock, Channel(sock, max_message=1 << 21, max_fds=4)


def _call(
    channel: Channel, msg_id: int, command: int, payload: bytes, fds: list[int] | None = None
) -> vu.Message:
    channel.send(vu.pack_message(msg_id, command, vu.TYPE_COMMAND, payload), fds)
    reply = _next(channel)
    assert (reply.msg_id, reply.command) == (msg_id, command) and reply.is_reply
    return reply


def _next(channel: Channel) -> vu.Message:
    assert select.select([channel.sock], [], [], 10)[0], "nothing from the server within 10 s"
    return channel.receive()


def _version(channel: Channel) -> None:
    payload = b"\0\0\1\0" + json.dumps({"capabilities": {"max_msg_fds": 4}}).encode() + b"\0"
    assert not _call(channel, 1, Command.VERSION, payload).is_error


def _hung_up_on(sock: socket.socket) -> bool:
    """The server closes the connection within 10 s (EOF, or a reset if it left bytes unread)."""
    sock.settimeout(10)
    try:
        while sock.recv(4096):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        return False
    finally:
        sock.close()
    return True


def _hang_up(sock: socket.socket) -> None:
    """Close our end and wait until the server has closed its own (its clean-up done)."""
    sock.shutdown(socket.SHUT_WR)
    assert _hung_up_on(sock)


def _read_by_server(sock: socket.socket) -> None:
    """Wait until the server has read everything we sent (our send queue is empty)."""
    for _ in range(1000):
        if fcntl.ioctl(sock, termios.TIOCOUTQ, b"\0\0\0\0") == b"\0\0\0\0":
            return
        time.sleep(0.01)
    raise AssertionError("the server did not read what was sent")


def _well_behaved_client_does_io(path: str) -> None:
    transport = VfioUserTransport(path, memory_size=4 << 20, timeout=10)
    try:
        driver = NvmeDriver(transport, io_queue_depth=8)
        driver.probe()
        driver.write(1, 8, b"\x5a" * 4096)
        assert driver.read(1, 8, 8) == b"\x5a" * 4096
        driver.shutdown()
        driver.close()
        _hang_up(transport.client.channel.sock)  # and wait for the server to clean up
    finally:
        transport.close()


@pytest.fixture
def baseline(served: Served) -> int:
    """The process's descriptors with the server warmed up by one well-behaved client."""
    _well_behaved_client_does_io(served.path)
    return fd_count()


def _dma_map(offset: int, address: int) -> bytes:
    flags = vu.DmaFlags.READ | vu.DmaFlags.WRITE
    return vu.DMA_MAP.pack(vu.DMA_MAP.size, flags, offset, address, PAGE)


def test_a_client_mapping_the_most_dma_regions(served: Served, baseline: int) -> None:
    sock, channel = _connect(served.path)
    _version(channel)
    memfd = os.memfd_create(MEMFD_NAME, os.MFD_CLOEXEC)
    os.ftruncate(memfd, (MAX_DMA_MAPS + 1) * PAGE)
    held = fd_count()  # ours: the socket and the memfd
    for i in range(MAX_DMA_MAPS):
        reply = _call(channel, 2 + i, Command.DMA_MAP, _dma_map(i * PAGE, 1 << 32 | i * 2 * PAGE), [memfd])
        assert not reply.is_error, reply.error
    # Each region is one mapping (and, before Python 3.13, one descriptor: mmap keeps a
    # duplicate); the descriptor that came with the message is closed once mapped.
    held += MAX_DMA_MAPS * DMA_MAP_DESCRIPTORS
    assert _memfd_mappings() == MAX_DMA_MAPS and fd_count() == held
    one_more = _dma_map(MAX_DMA_MAPS * PAGE, 1 << 33)
    refused = _call(channel, 100, Command.DMA_MAP, one_more, [memfd])
    assert refused.is_error and refused.error == errno.ENOSPC
    assert _memfd_mappings() == MAX_DMA_MAPS and fd_count() == held  # its descriptor closed too
    os.close(memfd)
    _hang_up(sock)
    assert _memfd_mappings() == 0 and fd_count() == baseline
    _well_behaved_client_does_io(served.path)


def test_a_client_sending_the_most_descriptors_in_one_message(served: Served, baseline: int) -> None:
    sock, channel = _connect(served.path)
    _version(channel)
    source = eventfd()
    many = [os.dup(source) for _ in range(SCM_MAX_FD)]
    held = fd_count()
    irq_set = vu.IRQ_SET.pack(
        vu.IRQ_SET.size, vu.IrqSetFlags.DATA_EVENTFD | vu.IrqSetFlags.ACTION_TRIGGER, vu.PciIrq.MSIX, 0, 2
    )
    refused = _call(channel, 2, Command.DEVICE_SET_IRQS, irq_set, many)
    assert refused.is_error and refused.error == errno.EINVAL
    # The kernel delivered MAX_MSG_FDS and closed the rest; the server closed those it got.
    assert fd_count() == held
    for fd in [source, *many]:
        os.close(fd)
    _hang_up(sock)
    assert fd_count() == baseline
    assert served.server.errors["DEVICE_SET_IRQS"] == 1
    _well_behaved_client_does_io(served.path)


def test_a_message_sent_in_pieces_each_with_descriptors_keeps_max_msg_fds(
    tmp_path: Path,
) -> None:
    # A message timeout long enough that the server still holds the message when we look.
    gen = _serve(tmp_path, ServerOptions(max_msg_fds=MAX_MSG_FDS, message_timeout=30))
    served = next(gen)
    try:
        _well_behaved_client_does_io(served.path)
        baseline = fd_count()
        sock, channel = _connect(served.path)
        _version(channel)
        source = eventfd()
        batch = [os.dup(source) for _ in range(MAX_MSG_FDS)]
        held = fd_count()
        # DEVICE_SET_IRQS declaring 4 KiB of body, sent a byte at a time, every byte with
        # MAX_MSG_FDS descriptors, and never finished.
        channel.send(vu.HEADER.pack(2, Command.DEVICE_SET_IRQS, 16 + 4096, vu.TYPE_COMMAND, 0), batch)
        for _ in range(40):
            channel.send(b"\0", batch)
        _read_by_server(sock)
        assert fd_count() - held <= MAX_MSG_FDS  # not 41 * 16 = 656
        for fd in [source, *batch]:
            os.close(fd)
        _hang_up(sock)  # mid-message: the server drops what it held
        assert fd_count() == baseline
        _well_behaved_client_does_io(served.path)
    finally:
        gen.close()


@pytest.mark.parametrize(
    ("declared", "sent"),
    [
        (16 + 4096, 8),  # half a header
        (16 + 4096, 16 + 100),  # a header and part of a body that fits the read buffer
        (16 + (512 << 10), 16 + (100 << 10)),  # part of a body larger than the read buffer
    ],
    ids=["half-header", "half-body", "half-large-body"],
)
def test_a_client_that_stops_part_way_through_a_message(
    served: Served, baseline: int, declared: int, sent: int
) -> None:
    sock, channel = _connect(served.path)
    _version(channel)
    header = vu.HEADER.pack(2, Command.REGION_WRITE, declared, vu.TYPE_COMMAND, 0)
    channel.send((header + bytes(declared - 16))[:sent])
    assert _hung_up_on(sock)  # after the message timeout, not never
    assert fd_count() == baseline
    assert served.server.errors["message_timeout"] == 1
    (event,) = served.trace.events
    assert event.name == "vfio_user_err_message_timeout"
    assert event.args[:3] == ("receiving", sent, declared if sent >= 16 else 16)
    _well_behaved_client_does_io(served.path)


def test_a_client_that_stops_reading_the_replies(served: Served, baseline: int) -> None:
    sock, channel = _connect(served.path)
    _version(channel)
    request = vu.pack_message(2, Command.DEVICE_GET_INFO, vu.TYPE_COMMAND, vu.DEVICE_INFO.pack(16, 0, 0, 0))
    # Far more replies than the socket buffers hold; none read. Our own send blocks once the
    # server stops reading (it is stuck sending), until it hangs up.
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        for _ in range(20_000):
            sock.sendall(request)
    assert _hung_up_on(sock)
    assert fd_count() == baseline
    assert served.server.errors["message_timeout"] == 1
    (event,) = served.trace.events
    assert event.name == "vfio_user_err_message_timeout" and event.args[0] == "sending"
    _well_behaved_client_does_io(served.path)


def test_a_client_that_connects_and_never_speaks(served: Served, baseline: int) -> None:
    sock, _ = _connect(served.path)
    assert _hung_up_on(sock)  # after the handshake timeout, not never
    assert fd_count() == baseline
    assert served.server.errors["handshake_timeout"] == 1
    assert [e.name for e in served.trace.events] == ["vfio_user_err_handshake_timeout"]
    _well_behaved_client_does_io(served.path)


def test_a_client_that_never_completes_version_is_timed_out_however_much_it_sends(
    served: Served, baseline: int
) -> None:
    sock, channel = _connect(served.path)
    hung_up = False
    give_up = time.monotonic() + 30  # a guard against a server that never hangs up
    msg_id = 0
    while time.monotonic() < give_up:
        # Commands before VERSION are refused (EINVAL) and do not extend the deadline.
        msg_id = (msg_id + 1) & 0xFFFF
        try:
            channel.send(vu.pack_message(msg_id, Command.DEVICE_GET_INFO, vu.TYPE_COMMAND, bytes(16)))
            reply = _next(channel)
        except (vu.Disconnected, ConnectionResetError, BrokenPipeError):
            hung_up = True
            break
        assert reply.error == errno.EINVAL
    assert hung_up
    sock.close()
    assert served.server.errors["handshake_timeout"] == 1
    _well_behaved_client_does_io(served.path)
    assert fd_count() == baseline


def test_an_idle_client_after_version_is_never_timed_out(served: Served) -> None:
    """QEMU sends nothing while its guest is idle: silence between messages is no stall."""
    sock, channel = _connect(served.path)
    _version(channel)
    # Several times both timeouts, in silence: the server must not hang up.
    assert not select.select([sock], [], [], 1.5)[0]
    reply = _call(channel, 2, Command.DEVICE_GET_INFO, vu.DEVICE_INFO.pack(16, 0, 0, 0))
    assert not reply.is_error and vu.DEVICE_INFO.unpack_from(reply.payload)[2:] == (9, 5)
    assert not served.server.errors
    sock.close()


def test_timeouts_must_be_positive() -> None:
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="handshake_timeout"):
            ServerOptions(handshake_timeout=bad)
        with pytest.raises(ValueError, match="message_timeout"):
            ServerOptions(message_timeout=bad)
    ServerOptions(handshake_timeout=None, message_timeout=None)  # no limits: allowed


@pytest.mark.skipif(not DMA_MAP_DESCRIPTORS, reason="mmap keeps no descriptor (Python 3.13+)")
def test_max_dma_maps_is_lowered_to_what_the_descriptor_limit_holds() -> None:
    """Each DMA region costs a descriptor here: a client mapping max_dma_maps of them must not
    run the server out of descriptors (accept() failing for the next client)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    function = make_function()
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (fd_count() + 300, hard))
        server = VfioUserServer(function, ServerOptions(max_dma_maps=4096))
        # Room left for the open descriptors, every interrupt vector's eventfd, two messages'
        # descriptors and some spare: fewer than the 300 free ones.
        assert 0 < server.max_dma_maps < 300
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert VfioUserServer(function, ServerOptions(max_dma_maps=8)).max_dma_maps == 8
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        function.close()
