"""VERSION: the first message of every connection, negotiating the protocol and capabilities."""

from __future__ import annotations

import errno
import json
import os

import pytest

from vfio_user.peer import LE, PAGE, Peer, eventfd, fd_count, memfd
from vnvme.vfio_user import protocol as vu
from vnvme.vfio_user.protocol import Command


def test_version_negotiates_capabilities(peer: Peer) -> None:
    caps = peer.version()["capabilities"]
    assert isinstance(caps, dict)
    assert caps["max_msg_fds"] == 16
    assert caps["max_data_xfer_size"] == 1 << 20
    assert caps["pgsizes"] == PAGE
    assert "migration" not in caps
    assert peer.server.peer_max_fds == 8


def test_version_reply_layout(peer: Peer) -> None:
    payload = b"\x00\x00\x01\x00" + json.dumps({"capabilities": {"max_msg_fds": 4}}).encode() + b"\0"
    reply = peer.ok(Command.VERSION, payload)
    assert int.from_bytes(reply.payload[0:2], LE) == vu.VERSION_MAJOR
    assert int.from_bytes(reply.payload[2:4], LE) == vu.VERSION_MINOR
    assert reply.payload.endswith(b"\0") and reply.payload.count(b"\0", 4) == 1  # one NUL-terminated string
    caps = json.loads(reply.payload[4:-1])["capabilities"]
    assert caps == {
        "max_msg_fds": 16,
        "max_data_xfer_size": 1 << 20,
        "max_dma_maps": 4096,
        "pgsizes": PAGE,
        "write_multiple": True,
    }
    assert not reply.fds


def test_commands_before_version_are_refused(peer: Peer) -> None:
    peer.expect_error(Command.DEVICE_GET_INFO, vu.DEVICE_INFO.pack(16, 0, 0, 0), errno.EINVAL)
    peer.version()  # and the server still serves


@pytest.mark.parametrize(
    "command",
    [Command.DMA_MAP, Command.REGION_READ, Command.DEVICE_RESET, Command.DEVICE_FEATURE, 99],
)
def test_every_command_before_version_is_einval(peer: Peer, command: int) -> None:
    # Even one the server does not implement: VERSION comes first is checked first.
    peer.expect_error(command, b"\0" * 32, errno.EINVAL)
    assert not peer.server.version_done


@pytest.mark.parametrize(
    ("body", "err"),
    [
        (b"\x01\x00\x00\x00{}\0", errno.ENOTSUP),  # major 1
        (b"\x00\x00", errno.EINVAL),  # too short
        (b"\x00\x00\x01\x00{not json\0", errno.EINVAL),
        (b'\x00\x00\x01\x00{"capabilities": {"max_msg_fds": "many"}}\0', errno.EINVAL),
        (b"\xff\xff\x01\x00{}\0", errno.ENOTSUP),  # major 0xffff
        (b"", errno.EINVAL),
        (b"\x00\x00\x01\x00[1, 2]\0", errno.EINVAL),  # not an object
        (b'\x00\x00\x01\x00{"capabilities": [1]}\0', errno.EINVAL),
        (b'\x00\x00\x01\x00{"capabilities": {"max_msg_fds": -1}}\0', errno.EINVAL),
        (b'\x00\x00\x01\x00{"capabilities": {"max_data_xfer_size": 0}}\0', errno.EINVAL),
        (b'\x00\x00\x01\x00{"capabilities": {"max_data_xfer_size": 4096.5}}\0', errno.EINVAL),
        (b'\x00\x00\x01\x00{"capabilities": {"max_msg_fds": true}}\0', errno.EINVAL),
        (b"\x00\x00\x01\x00\xff\xfe\0", errno.EINVAL),  # not UTF-8
    ],
    ids=[
        "major-1",
        "short",
        "bad-json",
        "fds-string",
        "major-ffff",
        "empty",
        "json-array",
        "caps-array",
        "fds-negative",
        "xfer-zero",
        "xfer-float",
        "fds-bool",
        "not-utf8",
    ],
)
def test_bad_version_messages(peer: Peer, body: bytes, err: int) -> None:
    peer.expect_error(Command.VERSION, body, err)
    assert not peer.server.version_done
    peer.version()


def test_a_minor_version_higher_than_ours_is_answered_with_ours(peer: Peer) -> None:
    payload = vu.VERSION_MAJOR.to_bytes(2, LE) + (7).to_bytes(2, LE) + b"{}\0"
    reply = peer.ok(Command.VERSION, payload)
    assert int.from_bytes(reply.payload[0:2], LE) == vu.VERSION_MAJOR
    assert int.from_bytes(reply.payload[2:4], LE) == vu.VERSION_MINOR


def test_a_lower_minor_version_is_answered_with_the_clients(peer: Peer) -> None:
    reply = peer.ok(Command.VERSION, vu.VERSION_MAJOR.to_bytes(2, LE) + b"\x00\x00{}\0")
    assert reply.payload[0:4] == b"\x00\x00\x00\x00"


def test_unknown_capabilities_are_ignored(peer: Peer) -> None:
    caps = peer.version(
        {
            "capabilities": {
                "max_msg_fds": 3,
                "frobnicate": {"level": 11},
                "migration": {"pgsize": 4096, "max_bitmap_size": 1 << 20},
                "twin_socket": {"supported": True},
            },
            "vendor": "someone else",
        }
    )["capabilities"]
    assert isinstance(caps, dict) and "frobnicate" not in caps and "migration" not in caps
    assert peer.server.peer_max_fds == 3
    assert not peer.ok(Command.DEVICE_GET_INFO, vu.DEVICE_INFO.pack(16, 0, 0, 0)).is_error


@pytest.mark.parametrize("json_part", [b"", b"\0", b"{}\0", b'{"capabilities": {}}\0', b"{}"])
def test_no_capabilities_means_the_defaults(peer: Peer, json_part: bytes) -> None:
    peer.server.peer_max_fds = 99
    peer.ok(Command.VERSION, b"\x00\x00\x01\x00" + json_part)
    assert peer.server.peer_max_fds == vu.DEFAULT_MAX_MSG_FDS
    assert peer.server.peer_max_xfer == vu.DEFAULT_MAX_DATA_XFER_SIZE
    assert peer.server.version_done


def test_the_clients_limits_are_recorded(peer: Peer) -> None:
    peer.version({"capabilities": {"max_msg_fds": 0, "max_data_xfer_size": 8192}})
    assert (peer.server.peer_max_fds, peer.server.peer_max_xfer) == (0, 8192)


def test_a_second_version_starts_the_session_over(ready: Peer) -> None:
    fn = ready.function
    fd = memfd()
    efd = eventfd()
    try:
        ready.dma_map(0x1_0000_0000, 1 << 20, fd)
        eventfd_trigger = vu.IrqSetFlags.DATA_EVENTFD | vu.IrqSetFlags.ACTION_TRIGGER
        ready.set_irqs(eventfd_trigger, vu.PciIrq.MSIX, 0, 1, fds=[efd])
        ready.write_int(vu.PciRegion.CONFIG, 0x04, 2, 0x6)
        assert fn.memory.regions() and fn.eventfds[vu.PciIrq.MSIX][0] >= 0
        before = fd_count()
        caps = ready.version({"capabilities": {"max_msg_fds": 2}})["capabilities"]
        assert isinstance(caps, dict) and caps["max_msg_fds"] == 16
        # As after a disconnect: mappings dropped, eventfds closed, config space at power-on.
        assert fn.memory.regions() == () and ready.server.dma == {}
        assert fn.eventfds[vu.PciIrq.MSIX][0] == -1
        assert fd_count() == before - 2  # the eventfd and the mapping's own descriptor
        assert ready.read_int(vu.PciRegion.CONFIG, 0x04, 2) == 0
        assert ready.server.peer_max_fds == 2
        # And the new session works.
        ready.dma_map(0x1_0000_0000, 1 << 20, fd)
        assert [r.gpa for r in fn.memory.regions()] == [0x1_0000_0000]
    finally:
        os.close(fd)
        os.close(efd)


def test_a_refused_second_version_changes_nothing(ready: Peer) -> None:
    fd = memfd()
    try:
        ready.dma_map(0x1_0000_0000, 1 << 20, fd)
        ready.expect_error(Command.VERSION, b"\x01\x00\x00\x00{}\0", errno.ENOTSUP)
        assert len(ready.function.memory.regions()) == 1 and ready.server.version_done
        assert ready.server.peer_max_fds == 8
    finally:
        os.close(fd)
