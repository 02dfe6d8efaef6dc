"""VfioUserClient against the real server over a listening socket, and against a scripted one
for the replies a server should never send."""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import select
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from vfio_user.peer import eventfd, fd_count, listening_server, make_function, memfd, signalled
from vnvme.spec.registers import Reg
from vnvme.vfio_user import protocol as vu
from vnvme.vfio_user.client import VfioUserClient, VfioUserError
from vnvme.vfio_user.protocol import Channel, Command
from vnvme.vfio_user.server import ServerOptions

CONFIG = vu.PciRegion.CONFIG


def _enable_decoding(client: VfioUserClient) -> None:
    """What firmware does before a driver runs: Memory Space and Bus Master Enable."""
    client.region_write(CONFIG, 0x04, (0x0006).to_bytes(2, "little"))


def test_client_class_round_trip() -> None:
    """VfioUserClient against the server over a real listening socket, in a thread."""
    function = make_function()
    try:
        with listening_server(function) as (path, server), VfioUserClient(path) as client:
            caps = client.negotiate()
            assert caps["max_msg_fds"] == 16
            assert client.device_info()[1:] == (9, 5)
            assert client.region_info(0).size == function.bar0_size
            assert client.region_read(0, Reg.VS, 4) == b"\xff" * 4  # not decoded yet
            _enable_decoding(client)
            vs = int.from_bytes(client.region_read(0, Reg.VS, 4), "little")
            assert vs == function.controller.mmio_read(Reg.VS, 4)
            with pytest.raises(VfioUserError) as info:
                client.region_read(9, 0, 4)
            assert info.value.errno == errno.EINVAL
    finally:
        function.close()
    assert server.clients_served == 1


def test_every_command_through_the_client() -> None:
    function = make_function()
    fd = memfd(2 << 20)
    efds = [eventfd() for _ in range(3)]
    try:
        with listening_server(function) as (path, server), VfioUserClient(path) as client:
            assert client.negotiate(max_data_xfer_size=8192) == client.server_caps
            _enable_decoding(client)
            assert server.peer_max_fds == 16 and server.peer_max_xfer == 8192
            flags, regions, irqs = client.device_info()
            assert flags == vu.DeviceFlags.RESET | vu.DeviceFlags.PCI and (regions, irqs) == (9, 5)
            info = client.region_info(vu.PciRegion.CONFIG)
            assert (info.index, info.size, info.fd, info.sparse) == (7, 4096, -1, [])
            assert info.flags == vu.RegionFlags.READ | vu.RegionFlags.WRITE
            assert client.irq_info(vu.PciIrq.MSIX)[1] == function.vectors
            assert client.irq_info(vu.PciIrq.MSI) == (0, 0)
            # DMA: the device sees the client's memfd; read-only when asked.
            client.dma_map(0x1_0000_0000, 1 << 20, fd)
            client.dma_map(0x2_0000_0000, 4096, fd, 1 << 20, writable=False)
            assert [(r.gpa, r.writable) for r in function.memory.regions()] == [
                (0x1_0000_0000, True),
                (0x2_0000_0000, False),
            ]
            client.dma_unmap(0x2_0000_0000, 4096)
            with pytest.raises(VfioUserError) as err:
                client.dma_unmap(0x2_0000_0000, 4096)
            assert err.value.errno == errno.ENOENT
            # Interrupts.
            client.set_irq_eventfds(vu.PciIrq.MSIX, 0, efds)
            function._raise(2)
            assert [signalled(e) for e in efds] == [0, 0, 1]
            client.clear_irq_eventfds(vu.PciIrq.MSIX, 0, 3)
            assert set(function.eventfds[vu.PciIrq.MSIX]) == {-1}
            # Regions, posted or not.
            client.region_write(vu.PciRegion.BAR0, Reg.AQA, (0x001F001F).to_bytes(4, "little"))
            client.region_write(vu.PciRegion.BAR0, Reg.INTMS, (4).to_bytes(4, "little"), posted=True)
            assert client.region_read(vu.PciRegion.BAR0, Reg.INTMS, 4) == (4).to_bytes(4, "little")
            assert client.stats.posted_writes == 1
            assert function.controller.aqa == 0x001F001F
            client.reset()
            assert function.controller.aqa == 0
            assert client.stats.requests == server.messages.total() - 1  # all but the posted write
    finally:
        function.close()
        os.close(fd)
        for e in efds:
            os.close(e)


def test_eventfds_go_in_chunks_of_the_servers_max_msg_fds() -> None:
    function = make_function()
    efds = [eventfd() for _ in range(5)]
    try:
        options = ServerOptions(max_msg_fds=2)
        with listening_server(function, options) as (path, server), VfioUserClient(path) as client:
            assert client.negotiate()["max_msg_fds"] == 2
            _enable_decoding(client)
            client.set_irq_eventfds(vu.PciIrq.MSIX, 10, efds)
            assert server.messages["DEVICE_SET_IRQS"] == 3
            assert all(fd >= 0 for fd in function.eventfds[vu.PciIrq.MSIX][10:15])
            function._raise(14)
            assert signalled(efds[4]) == 1
    finally:
        function.close()
        for e in efds:
            os.close(e)


def test_the_sparse_doorbell_area() -> None:
    function = make_function(mappable_doorbells=True)
    try:
        with listening_server(function) as (path, _server), VfioUserClient(path) as client:
            client.negotiate()
            info = client.region_info(vu.PciRegion.BAR0)
            try:
                assert info.sparse == [(0x1000, 0x1000)] and info.fd >= 0
                assert info.flags & vu.RegionFlags.MMAP and info.flags & vu.RegionFlags.CAPS
                page = mmap.mmap(info.fd, 0x1000, offset=info.offset + 0x1000)
                page[0:4] = (5).to_bytes(4, "little")
                assert bytes(function._db_page.view[0:4]) == (5).to_bytes(4, "little")
                page.close()
            finally:
                os.close(info.fd)
    finally:
        function.close()


def test_an_error_reply_is_a_vfio_user_error() -> None:
    function = make_function()
    try:
        with listening_server(function) as (path, _server), VfioUserClient(path) as client:
            with pytest.raises(VfioUserError) as err:
                client.device_info()  # before VERSION
            assert isinstance(err.value, OSError) and err.value.errno == errno.EINVAL
            client.negotiate()
            with pytest.raises(VfioUserError) as err:
                client.request(99)
            assert err.value.errno == errno.ENOSYS and "UNKNOWN_99" in str(err.value)
    finally:
        function.close()


@contextmanager
def _scripted_server(timeout: float = 5.0) -> Iterator[tuple[VfioUserClient, Channel]]:
    """A client connected to a socket the test answers by hand."""
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "s.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(1)
        try:
            with VfioUserClient(path, timeout=timeout) as client:
                conn, _ = listener.accept()
                try:
                    yield client, Channel(conn, max_message=1 << 21, max_fds=4)
                finally:
                    conn.close()
        finally:
            listener.close()


def test_a_reply_to_another_message_is_eproto() -> None:
    with _scripted_server() as (client, server):
        server.send(
            vu.pack_message(77, Command.DEVICE_GET_INFO, vu.TYPE_REPLY, vu.DEVICE_INFO.pack(16, 3, 9, 5))
        )
        with pytest.raises(vu.ProtocolError) as err:
            client.device_info()
        assert err.value.errno == errno.EPROTO
        assert server.receive().command == Command.DEVICE_GET_INFO


def test_a_reply_for_another_command_is_eproto() -> None:
    with _scripted_server() as (client, server):
        server.send(vu.pack_message(1, Command.DEVICE_RESET, vu.TYPE_REPLY))
        with pytest.raises(vu.ProtocolError) as err:
            client.device_info()
        assert err.value.errno == errno.EPROTO


def test_an_error_reply_without_an_errno_is_eio() -> None:
    with _scripted_server() as (client, server):
        server.send(vu.pack_message(1, Command.DEVICE_RESET, vu.TYPE_REPLY | vu.FLAG_ERROR, b"", 0))
        with pytest.raises(VfioUserError) as err:
            client.reset()
        assert err.value.errno == errno.EIO


def test_no_reply_is_a_timeout() -> None:
    with _scripted_server(timeout=0.1) as (client, server):
        with pytest.raises(TimeoutError):
            client.reset()
        assert server.receive().command == Command.DEVICE_RESET


def test_descriptors_on_a_refused_reply_are_closed() -> None:
    fd = memfd(4096)
    try:
        with _scripted_server() as (client, server):
            server.send(
                vu.pack_message(1, Command.DEVICE_RESET, vu.TYPE_REPLY | vu.FLAG_ERROR, b"", errno.EPERM),
                [fd],
            )
            before = fd_count()
            with pytest.raises(VfioUserError):
                client.reset()
            assert fd_count() == before
    finally:
        os.close(fd)


def test_a_reply_declaring_more_than_the_maximum_is_e2big_at_its_header() -> None:
    """The client's channel refuses it without waiting for the 4 GiB it declares, and refuses
    every read after it (what follows cannot be framed)."""
    with _scripted_server(timeout=2.0) as (client, server):
        server.send(vu.HEADER.pack(1, Command.DEVICE_RESET, 0xFFFF_FFF0, vu.TYPE_REPLY, 0))
        with pytest.raises(vu.MessageTooLarge) as err:
            client.reset()
        assert err.value.errno == errno.E2BIG and err.value.msg_id == 1
        server.send(vu.pack_message(2, Command.DEVICE_RESET, vu.TYPE_REPLY))
        with pytest.raises(vu.MessageTooLarge):
            client.reset()


def test_a_server_asking_without_end_cannot_hold_a_request_past_the_timeout() -> None:
    """DMA requests that keep coming must not keep the client from timing out its request."""
    with _scripted_server(timeout=0.5) as (client, server):
        flooding = threading.Event()
        stop = threading.Event()

        def flood() -> None:
            """DMA_READs many at a time, so that one is always waiting when the client looks,
            reading the client's EFAULT replies as they come (neither side blocks)."""
            flooding.set()
            give_up = time.monotonic() + 30  # the client should give up long before this
            request = vu.DMA_ACCESS.pack(0xDEAD_0000, 8)
            batch = b"".join(
                vu.pack_message(i, Command.DMA_READ, vu.TYPE_COMMAND, request) for i in range(256)
            )
            pending = b""
            sock = server.sock
            with contextlib.suppress(OSError):
                while not stop.is_set() and time.monotonic() < give_up:
                    readable, writable, _ = select.select([sock], [sock], [], 0.1)
                    if readable and not sock.recv(1 << 16):
                        break
                    if writable:
                        pending = pending or batch
                        pending = pending[sock.send(pending, socket.MSG_DONTWAIT) :]
            flooding.clear()

        thread = threading.Thread(target=flood, daemon=True)
        thread.start()
        try:
            with pytest.raises(TimeoutError, match="kept coming"):
                client.device_info()
            assert flooding.is_set()  # it timed out while the requests still came
        finally:
            stop.set()
            thread.join(35)
