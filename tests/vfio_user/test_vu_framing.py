"""Framing: what every message goes through before its handler. Sizes, message types, unknown
commands, descriptors; the stream stays in sync after every refusal."""

from __future__ import annotations

import errno
import os
import time

import pytest

from vfio_user.peer import Peer, eventfd, fd_count, memfd
from vnvme.spec.registers import Reg
from vnvme.vfio_user import protocol as vu
from vnvme.vfio_user.protocol import Command
from vnvme.vfio_user.server import ServerOptions

GET_INFO = vu.DEVICE_INFO.pack(16, 0, 0, 0)


def _in_sync(peer: Peer) -> None:
    reply = peer.ok(Command.DEVICE_GET_INFO, GET_INFO)
    assert vu.DEVICE_INFO.unpack(reply.payload)[2:] == (9, 5)


def test_unknown_command_and_unexpected_fds(ready: Peer) -> None:
    ready.expect_error(99, b"", errno.ENOSYS)
    ready.expect_error(Command.DEVICE_FEATURE, b"\0" * 8, errno.ENOSYS)
    before = fd_count()
    fd = memfd()
    ready.expect_error(Command.REGION_READ, vu.REGION_ACCESS.pack(0, 7, 4), errno.EINVAL, [fd])
    os.close(fd)
    assert fd_count() == before  # the server closed the descriptor it was not owed


def _assert_hung_up(peer: Peer) -> None:
    """The server closed the connection: end of stream, and its thread is done."""
    with pytest.raises(vu.Disconnected):
        peer.reply()
    peer.thread.join(5)
    assert not peer.thread.is_alive()


@pytest.mark.parametrize("size", [0xFFFF_FFF0, 4096 + vu.MESSAGE_OVERHEAD + 1])
def test_a_message_too_large_is_refused_before_its_body_then_the_server_hangs_up(size: int) -> None:
    """The header alone gets E2BIG (the server no longer waits for a body it would discard:
    4 GiB that may never come), then the connection closes: what follows has no framing, so a
    well-formed message right behind it gets no answer."""
    p = Peer(ServerOptions(max_data_xfer_size=4096), trace=["vfio_user_err_*", "vfio_user_disconnect"])
    try:
        p.version()
        p.raw(
            vu.HEADER.pack(7, Command.REGION_WRITE, size, 0, 0)
            + vu.pack_message(8, Command.DEVICE_GET_INFO, 0, GET_INFO)
        )
        reply = p.reply()
        assert (reply.msg_id, reply.command, reply.flags, reply.error, reply.payload) == (
            7,
            Command.REGION_WRITE,
            vu.TYPE_REPLY | vu.FLAG_ERROR,
            errno.E2BIG,
            b"",
        )
        _assert_hung_up(p)
        assert p.server.errors["message_too_large"] == 1
        assert p.server.messages["DEVICE_GET_INFO"] == 0
        limit = p.server.max_message
        (event,) = p.trace.named("vfio_user_err_message_too_large")
        assert event.args == ("REGION_WRITE", 7, size, limit)
        assert not p.trace.named("vfio_user_err_message")  # one event, not two
        (gone,) = p.trace.named("vfio_user_disconnect")
        assert "framing lost" in str(gone.args[0])
    finally:
        p.close()


def test_a_posted_message_too_large_gets_no_reply_and_the_server_hangs_up(ready: Peer) -> None:
    """NO_REPLY is kept even here, as for every refused message: the client gets the hang-up."""
    ready.raw(vu.HEADER.pack(9, Command.REGION_WRITE, 0xFFFF_FFF0, vu.FLAG_NO_REPLY, 0))
    _assert_hung_up(ready)
    assert ready.server.errors["message_too_large"] == 1


def test_the_device_resets_as_on_a_disconnect_after_a_message_too_large(ready: Peer) -> None:
    fd = memfd()
    try:
        ready.dma_map(0x1_0000_0000, 1 << 20, fd)
        ready.write_int(0, Reg.AQA, 4, 0x001F001F)
        ready.raw(vu.HEADER.pack(10, Command.DMA_MAP, 1 << 31, 0, 0))
        assert ready.reply().error == errno.E2BIG
        _assert_hung_up(ready)
        assert ready.server.dma == {} and ready.function.memory.regions() == ()
        assert ready.function.controller.aqa == 0 and ready.function.pci.read(0x04, 2) == 0
    finally:
        os.close(fd)


def test_undersized_messages_keep_the_stream_in_sync() -> None:
    p = Peer(ServerOptions(max_data_xfer_size=4096))
    try:
        p.version()
        p.raw(vu.HEADER.pack(8, Command.DEVICE_GET_INFO, 4, 0, 0))  # size smaller than a header
        reply = p.reply()
        assert reply.msg_id == 8 and reply.error == errno.EINVAL
        reply = p.call(Command.DEVICE_GET_INFO, vu.DEVICE_INFO.pack(16, 0, 0, 0))
        assert not reply.is_error
        # A reply where a command belongs.
        p.raw(vu.pack_message(9, Command.DEVICE_GET_INFO, vu.TYPE_REPLY, vu.DEVICE_INFO.pack(16, 0, 0, 0)))
        assert p.reply().error == errno.EINVAL
    finally:
        p.close()


def test_a_message_of_exactly_the_maximum_size_is_read() -> None:
    p = Peer(ServerOptions(max_data_xfer_size=4096))
    try:
        p.version()
        size = p.server.max_message
        data = b"\0" * (size - vu.HEADER_SIZE - vu.REGION_ACCESS.size)
        # Read whole, then refused by its handler (more data than a transfer may hold), not E2BIG.
        p.raw(
            vu.HEADER.pack(11, Command.REGION_WRITE, size, 0, 0)
            + vu.REGION_ACCESS.pack(0, 7, len(data))
            + data
        )
        reply = p.reply()
        assert reply.msg_id == 11 and reply.error == errno.EINVAL
        _in_sync(p)
    finally:
        p.close()


def test_a_message_too_large_with_descriptors_closes_them() -> None:
    p = Peer(ServerOptions(max_data_xfer_size=4096))
    fd = memfd()
    try:
        p.version()
        before = fd_count()
        big = p.server.max_message + 100
        p.raw(vu.HEADER.pack(12, Command.DMA_MAP, big, 0, 0) + b"\0" * 64, [fd, fd])
        reply = p.reply()
        assert (reply.msg_id, reply.error) == (12, errno.E2BIG)
        _assert_hung_up(p)
        assert fd_count() == before
    finally:
        p.close()
        os.close(fd)


@pytest.mark.parametrize("size", [0, 1, 15])
def test_a_size_smaller_than_the_header(ready: Peer, size: int) -> None:
    ready.raw(vu.HEADER.pack(13, Command.DEVICE_GET_INFO, size, 0, 0))
    reply = ready.reply()
    assert (reply.msg_id, reply.command, reply.error, reply.payload) == (
        13,
        Command.DEVICE_GET_INFO,
        errno.EINVAL,
        b"",
    )
    _in_sync(ready)


@pytest.mark.parametrize("msg_type", [vu.TYPE_REPLY, 2, 7, 15])
def test_anything_but_a_command_is_einval(ready: Peer, msg_type: int) -> None:
    ready.raw(vu.pack_message(14, Command.DEVICE_GET_INFO, msg_type, GET_INFO))
    reply = ready.reply()
    assert reply.is_reply and reply.msg_id == 14 and reply.error == errno.EINVAL
    _in_sync(ready)


def test_an_error_reply_where_a_command_belongs(ready: Peer) -> None:
    ready.raw(vu.pack_message(15, Command.DMA_READ, vu.TYPE_REPLY | vu.FLAG_ERROR, b"", errno.EIO))
    assert ready.reply().error == errno.EINVAL
    _in_sync(ready)


@pytest.mark.parametrize(
    "command",
    [
        0,
        Command.DEVICE_GET_REGION_IO_FDS,
        Command.DMA_READ,  # server to client only
        Command.DMA_WRITE,
        14,  # DIRTY_PAGES, gone from the protocol
        Command.DEVICE_FEATURE,
        Command.MIG_DATA_READ,
        Command.MIG_DATA_WRITE,
        19,
        0xFFFF,
    ],
)
def test_unknown_commands_are_enosys(ready: Peer, command: int) -> None:
    ready.expect_error(command, b"\0" * 24, errno.ENOSYS)
    assert ready.server.errors[vu.command_name(command)] == 1
    _in_sync(ready)


def test_an_unknown_posted_command_is_silent(ready: Peer) -> None:
    ready.send(99, b"", flags=vu.FLAG_NO_REPLY)
    ready.assert_silent()
    _in_sync(ready)


@pytest.mark.parametrize(
    ("command", "payload"),
    [
        (Command.VERSION, b"\0\0\1\0{}\0"),
        (Command.DMA_UNMAP, vu.DMA_UNMAP.pack(24, vu.DmaUnmapFlags.ALL, 0, 0)),
        (Command.DEVICE_GET_INFO, GET_INFO),
        (Command.DEVICE_GET_REGION_INFO, vu.REGION_INFO.pack(32, 0, 0, 0, 0, 0)),
        (Command.DEVICE_GET_IRQ_INFO, vu.IRQ_INFO.pack(16, 0, 2, 0)),
        (Command.REGION_READ, vu.REGION_ACCESS.pack(0, 7, 4)),
        (Command.REGION_WRITE, vu.REGION_ACCESS.pack(0x3C, 7, 1) + b"\1"),
        (Command.REGION_WRITE_MULTI, vu.WRITE_MULTI_COUNT.pack(0)),
        (Command.DEVICE_RESET, b""),
    ],
)
def test_descriptors_where_none_belong_are_einval_and_closed(
    ready: Peer, command: int, payload: bytes
) -> None:
    fds = [memfd(4096), eventfd()]
    try:
        before = fd_count()
        ready.expect_error(command, payload, errno.EINVAL, fds)
        assert fd_count() == before
        _in_sync(ready)
    finally:
        for fd in fds:
            os.close(fd)


def test_an_unknown_command_with_descriptors_is_enosys_and_closes_them(ready: Peer) -> None:
    fd = memfd(4096)
    try:
        before = fd_count()
        ready.expect_error(99, b"", errno.ENOSYS, [fd])
        assert fd_count() == before
    finally:
        os.close(fd)


def test_too_many_descriptors_are_einval_and_every_one_is_closed(ready: Peer) -> None:
    assert ready.server.options.max_msg_fds == 16
    fds = [eventfd() for _ in range(20)]
    try:
        flags = vu.IrqSetFlags.DATA_EVENTFD | vu.IrqSetFlags.ACTION_TRIGGER
        before = fd_count()
        payload = vu.IRQ_SET.pack(20, flags, vu.PciIrq.MSIX, 0, 17)
        ready.expect_error(Command.DEVICE_SET_IRQS, payload, errno.EINVAL, fds[:17])
        assert fd_count() == before  # those that came and those the kernel dropped
        assert set(ready.function.eventfds[vu.PciIrq.MSIX]) == {-1}
        _in_sync(ready)
        # Sixteen is the limit, and is fine.
        ready.set_irqs(flags, vu.PciIrq.MSIX, 0, 16, fds=fds[:16])
        assert fd_count() == before + 16
    finally:
        for fd in fds:
            os.close(fd)


def test_a_header_in_pieces(ready: Peer) -> None:
    message = vu.pack_message(21, Command.REGION_READ, 0, vu.REGION_ACCESS.pack(Reg.VS, 0, 4))
    for start, end in ((0, 1), (1, 7), (7, 16), (16, 20), (20, len(message))):
        ready.raw(message[start:end])
        time.sleep(0.01)
    reply = ready.reply()
    assert reply.msg_id == 21 and reply.payload[16:] == (0x00010300).to_bytes(4, "little")


def test_pipelined_messages_are_answered_in_order(ready: Peer) -> None:
    batch = b"".join(
        vu.pack_message(100 + i, Command.REGION_READ, 0, vu.REGION_ACCESS.pack(0x3C, 7, 1)) for i in range(50)
    )
    batch += vu.pack_message(150, 99, 0)  # one refused in between
    batch += vu.pack_message(151, Command.DEVICE_GET_INFO, 0, GET_INFO)
    ready.raw(batch)
    ids = []
    for _ in range(52):
        reply = ready.reply()
        ids.append(reply.msg_id)
        assert reply.is_error == (reply.msg_id == 150)
    assert ids == list(range(100, 152))


@pytest.mark.parametrize("msg_id", [0, 1, 0x7FFF, 0xFFFF])
def test_the_message_id_is_echoed(ready: Peer, msg_id: int) -> None:
    ready.raw(vu.pack_message(msg_id, Command.DEVICE_GET_INFO, 0, GET_INFO))
    assert ready.reply().msg_id == msg_id
    ready.raw(vu.pack_message(msg_id, 99, 0))
    reply = ready.reply()
    assert (reply.msg_id, reply.command, reply.error) == (msg_id, 99, errno.ENOSYS)


@pytest.mark.parametrize("cut", [0, 5, 16, 20])
def test_a_client_vanishing_mid_message_ends_the_connection_cleanly(ready: Peer, cut: int) -> None:
    fd = memfd()
    try:
        ready.dma_map(0x1_0000_0000, 1 << 20, fd)
        message = vu.pack_message(30, Command.REGION_READ, 0, vu.REGION_ACCESS.pack(Reg.VS, 0, 4))
        if cut:
            ready.raw(message[:cut])
        ready.disconnect()
        assert ready.function.memory.regions() == () and ready.server.dma == {}
        assert ready.server.clients_served == 1
    finally:
        os.close(fd)
