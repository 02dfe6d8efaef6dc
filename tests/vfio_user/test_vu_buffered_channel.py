"""Buffered channels (what the server and the client use): one read brings what the socket holds,
messages are handed out one by one, descriptors go to the message they were sent with."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator

import pytest

from vfio_user.peer import eventfd, fd_count
from vnvme.vfio_user import protocol as vu
from vnvme.vfio_user.protocol import Channel, Command


@pytest.fixture
def pair() -> Iterator[tuple[Channel, Channel]]:
    """(plain sender, buffered receiver) over a socketpair."""
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    sender = Channel(mine, max_message=1 << 20, max_fds=8)
    receiver = Channel(theirs, max_message=1 << 20, max_fds=8, buffered=True)
    try:
        yield sender, receiver
    finally:
        sender.close()
        receiver.close()


def _message(msg_id: int, payload: bytes = b"") -> bytes:
    return vu.pack_message(msg_id, Command.REGION_WRITE, vu.TYPE_COMMAND, payload)


def test_messages_sent_together_come_out_one_by_one(pair: tuple[Channel, Channel]) -> None:
    sender, receiver = pair
    sender.send(_message(1, b"a" * 20) + _message(2) + _message(3, b"c" * 5))
    first = receiver.receive()
    assert (first.msg_id, first.payload) == (1, b"a" * 20)
    assert receiver.buffered_header()  # the rest came with the same read: poll() cannot tell
    assert receiver.receive().msg_id == 2
    third = receiver.receive()
    assert (third.msg_id, third.payload) == (3, b"c" * 5)
    assert not receiver.buffered_header()


def test_descriptors_go_to_the_message_they_came_with(pair: tuple[Channel, Channel]) -> None:
    sender, receiver = pair
    fd = eventfd()
    try:
        sender.send(_message(1, b"x" * 8))
        sender.send(_message(2, b"y" * 8), [fd])
        sender.send(_message(3))
        first, second, third = receiver.receive(), receiver.receive(), receiver.receive()
        assert (first.msg_id, first.fds) == (1, [])
        assert second.msg_id == 2 and len(second.fds) == 1
        assert (third.msg_id, third.fds) == (3, [])
        second.close_fds()
    finally:
        os.close(fd)


def test_a_message_longer_than_the_read_buffer(pair: tuple[Channel, Channel]) -> None:
    sender, receiver = pair
    big = bytes(range(256)) * 1024  # 256 KiB: more than one read takes (and the socket holds)
    writer = threading.Thread(target=sender.send, args=(_message(1, big) + _message(2, b"after"),))
    writer.start()
    try:
        first = receiver.receive()
        assert first.msg_id == 1 and first.payload == big
        second = receiver.receive()
        assert (second.msg_id, second.payload) == (2, b"after")
    finally:
        writer.join(5)


def test_receive_nowait(pair: tuple[Channel, Channel]) -> None:
    sender, receiver = pair
    assert receiver.receive_nowait() is None
    sender.send(_message(7, b"z"))
    message = receiver.receive_nowait()
    assert message is not None and (message.msg_id, message.payload) == (7, b"z")
    assert receiver.receive_nowait() is None


def test_a_hang_up_mid_message_closes_its_descriptors(pair: tuple[Channel, Channel]) -> None:
    sender, receiver = pair
    base = fd_count()
    fd = eventfd()
    whole = _message(1, b"q" * 40)
    sender.send(whole[:20], [fd])
    os.close(fd)
    sender.sock.close()
    with pytest.raises(vu.Disconnected):
        receiver.receive()
    assert fd_count() == base - 1  # the sender's socket is gone; nothing was kept
