"""vfio-user server: raw messages over a socketpair, replies, errnos and descriptors checked."""

from __future__ import annotations

import errno
import json
import os
import select
import socket
import threading
from collections.abc import Iterator

import pytest

from vnvme.controller.namespace import Namespace, RamBackend
from vnvme.function import NvmeFunction
from vnvme.spec.registers import CSTS, Reg
from vnvme.vfio_user import protocol as vu
from vnvme.vfio_user.client import VfioUserClient, VfioUserError
from vnvme.vfio_user.protocol import Channel, Command
from vnvme.vfio_user.server import ServerOptions, VfioUserServer

PAGE = 4096


class Peer:
    """The client end of a socketpair whose other end a server thread serves."""

    def __init__(self, max_data_xfer_size: int = 1 << 20) -> None:
        self.function = NvmeFunction([Namespace(1, RamBackend(1 << 20), 512)])
        self.server = VfioUserServer(self.function, ServerOptions(max_data_xfer_size=max_data_xfer_size))
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock = mine
        self.channel = Channel(mine, max_message=(1 << 21), max_fds=16)
        self.thread = threading.Thread(target=self.server.serve_connection, args=(theirs,), daemon=True)
        self.thread.start()
        self._theirs = theirs
        self._id = 0

    def send(self, command: int, payload: bytes = b"", fds: list[int] | None = None, flags: int = 0) -> int:
        self._id += 1
        self.channel.send(vu.pack_message(self._id, command, flags, payload), fds)
        return self._id

    def raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self, timeout: float = 5.0) -> vu.Message:
        ready, _, _ = select.select([self.sock], [], [], timeout)
        assert ready, "no reply"
        return self.channel.receive()

    def call(self, command: int, payload: bytes = b"", fds: list[int] | None = None) -> vu.Message:
        msg_id = self.send(command, payload, fds)
        reply = self.reply()
        assert reply.msg_id == msg_id and reply.command == command and reply.is_reply
        return reply

    def expect_error(self, command: int, payload: bytes, err: int, fds: list[int] | None = None) -> None:
        reply = self.call(command, payload, fds)
        assert reply.is_error and reply.error == err, (reply.flags, reply.error)
        assert reply.payload == b""  # an error reply is the header only

    def version(self) -> dict[str, object]:
        caps = {"capabilities": {"max_msg_fds": 8}}
        reply = self.call(Command.VERSION, b"\x00\x00\x01\x00" + json.dumps(caps).encode() + b"\0")
        assert not reply.is_error
        parsed: dict[str, object] = json.loads(reply.payload[4:].rstrip(b"\0"))
        return parsed

    def close(self) -> None:
        self.server.stop()
        self.sock.close()
        self.thread.join(5)
        self._theirs.close()
        self.function.close()


@pytest.fixture
def peer() -> Iterator[Peer]:
    p = Peer()
    try:
        yield p
    finally:
        p.close()


@pytest.fixture
def ready(peer: Peer) -> Peer:
    peer.version()
    return peer


def _memfd(size: int = 1 << 20) -> int:
    fd = os.memfd_create("test-dma", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_version_negotiates_capabilities(peer: Peer) -> None:
    caps = peer.version()["capabilities"]
    assert isinstance(caps, dict)
    assert caps["max_msg_fds"] == 16
    assert caps["max_data_xfer_size"] == 1 << 20
    assert caps["pgsizes"] == PAGE
    assert "migration" not in caps
    assert peer.server.peer_max_fds == 8


def test_commands_before_version_are_refused(peer: Peer) -> None:
    peer.expect_error(Command.DEVICE_GET_INFO, vu.DEVICE_INFO.pack(16, 0, 0, 0), errno.EINVAL)
    peer.version()  # and the server still serves


@pytest.mark.parametrize(
    ("body", "err"),
    [
        (b"\x01\x00\x00\x00{}\0", errno.ENOTSUP),  # major 1
        (b"\x00\x00", errno.EINVAL),  # too short
        (b"\x00\x00\x01\x00{not json\0", errno.EINVAL),
        (b'\x00\x00\x01\x00{"capabilities": {"max_msg_fds": "many"}}\0', errno.EINVAL),
    ],
)
def test_bad_version_messages(peer: Peer, body: bytes, err: int) -> None:
    peer.expect_error(Command.VERSION, body, err)
    peer.version()


def test_device_info_and_regions(ready: Peer) -> None:
    reply = ready.call(Command.DEVICE_GET_INFO, vu.DEVICE_INFO.pack(16, 0, 0, 0))
    argsz, flags, regions, irqs = vu.DEVICE_INFO.unpack(reply.payload)
    assert (argsz, flags, regions, irqs) == (16, vu.DeviceFlags.RESET | vu.DeviceFlags.PCI, 9, 5)
    sizes = {}
    for index in range(vu.PCI_NUM_REGIONS):
        reply = ready.call(Command.DEVICE_GET_REGION_INFO, vu.REGION_INFO.pack(32, 0, index, 0, 0, 0))
        argsz, rflags, rindex, _cap, size, _off = vu.REGION_INFO.unpack(reply.payload)
        assert rindex == index and not reply.fds
        sizes[index] = (size, rflags)
    fn = ready.function
    rw = vu.RegionFlags.READ | vu.RegionFlags.WRITE
    assert sizes[vu.PciRegion.BAR0] == (fn.bar0_size, rw)
    assert sizes[vu.PciRegion.BAR4] == (fn.bar4_size, rw)
    assert sizes[vu.PciRegion.CONFIG] == (4096, rw)
    assert sizes[vu.PciRegion.VGA] == (0, 0) and sizes[vu.PciRegion.BAR2] == (0, 0)
    ready.expect_error(Command.DEVICE_GET_REGION_INFO, vu.REGION_INFO.pack(32, 0, 9, 0, 0, 0), errno.EINVAL)
    ready.expect_error(Command.DEVICE_GET_REGION_INFO, b"\x20\x00", errno.EINVAL)


def test_irq_info(ready: Peer) -> None:
    reply = ready.call(Command.DEVICE_GET_IRQ_INFO, vu.IRQ_INFO.pack(16, 0, vu.PciIrq.MSIX, 0))
    _argsz, flags, index, count = vu.IRQ_INFO.unpack(reply.payload)
    assert index == vu.PciIrq.MSIX and count == ready.function.vectors and flags & vu.IrqInfoFlags.EVENTFD
    reply = ready.call(Command.DEVICE_GET_IRQ_INFO, vu.IRQ_INFO.pack(16, 0, vu.PciIrq.MSI, 0))
    assert vu.IRQ_INFO.unpack(reply.payload)[3] == 0  # no MSI
    ready.expect_error(Command.DEVICE_GET_IRQ_INFO, vu.IRQ_INFO.pack(16, 0, 5, 0), errno.EINVAL)


def test_config_space_reads_the_nvme_class_code(ready: Peer) -> None:
    reply = ready.call(Command.REGION_READ, vu.REGION_ACCESS.pack(0x08, vu.PciRegion.CONFIG, 4))
    offset, region, count = vu.REGION_ACCESS.unpack_from(reply.payload)
    assert (offset, region, count) == (0x08, vu.PciRegion.CONFIG, 4)
    assert int.from_bytes(reply.payload[16:], "little") >> 8 == 0x010802


def test_region_access_errors(ready: Peer) -> None:
    bar0 = ready.function.bar0_size
    for payload in (
        vu.REGION_ACCESS.pack(bar0 - 2, 0, 4),  # runs past the end
        vu.REGION_ACCESS.pack(0, 3, 4),  # no such BAR
        vu.REGION_ACCESS.pack(0, 0, 0),  # zero bytes
        vu.REGION_ACCESS.pack(1, 0, 4),  # misaligned register access
        vu.REGION_ACCESS.pack(0, 0, 3),  # odd width
    ):
        ready.expect_error(Command.REGION_READ, payload, errno.EINVAL)
    # A write whose count disagrees with the data that came.
    ready.expect_error(Command.REGION_WRITE, vu.REGION_ACCESS.pack(0x14, 0, 4) + b"\0" * 8, errno.EINVAL)
    ready.expect_error(Command.REGION_WRITE, b"\0" * 8, errno.EINVAL)
    # A read-only register through BAR0: the controller ignores it; CAP is unchanged.
    before = ready.call(Command.REGION_READ, vu.REGION_ACCESS.pack(Reg.CAP, 0, 8)).payload[16:]
    ready.call(Command.REGION_WRITE, vu.REGION_ACCESS.pack(Reg.CAP, 0, 8) + b"\xff" * 8)
    assert ready.call(Command.REGION_READ, vu.REGION_ACCESS.pack(Reg.CAP, 0, 8)).payload[16:] == before


def test_unknown_command_and_unexpected_fds(ready: Peer) -> None:
    ready.expect_error(99, b"", errno.ENOSYS)
    ready.expect_error(Command.DEVICE_FEATURE, b"\0" * 8, errno.ENOSYS)
    before = _fd_count()
    fd = _memfd()
    ready.expect_error(Command.REGION_READ, vu.REGION_ACCESS.pack(0, 7, 4), errno.EINVAL, [fd])
    os.close(fd)
    assert _fd_count() == before  # the server closed the descriptor it was not owed


def test_oversized_and_undersized_messages_keep_the_stream_in_sync() -> None:
    p = Peer(max_data_xfer_size=4096)
    try:
        p.version()
        big = 4096 + vu.MESSAGE_OVERHEAD + 1
        p.raw(vu.HEADER.pack(7, Command.REGION_WRITE, big, 0, 0) + b"\0" * (big - 16))
        reply = p.reply()
        assert reply.msg_id == 7 and reply.is_error and reply.error == errno.E2BIG
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


def test_dma_map_and_unmap(ready: Peer) -> None:
    fd = _memfd(2 << 20)
    base = 0x1_0000_0000
    flags = vu.DmaFlags.READ | vu.DmaFlags.WRITE
    before = _fd_count()
    ready.call(Command.DMA_MAP, vu.DMA_MAP.pack(32, flags, 0, base, 1 << 20), [fd])
    regions = ready.function.memory.regions()
    assert [(r.gpa, r.size, r.writable) for r in regions] == [(base, 1 << 20, True)]
    # The device sees what the client writes into its memfd.
    os.pwrite(fd, b"hello", 16)
    assert ready.function.memory.read(base + 16, 5) == b"hello"
    ready.expect_error(Command.DMA_MAP, vu.DMA_MAP.pack(32, flags, 0, base + PAGE, PAGE), errno.EEXIST, [fd])
    ready.expect_error(
        Command.DMA_MAP, vu.DMA_MAP.pack(32, flags, 0, base + 0x10_0000_0, 100), errno.EINVAL, [fd]
    )
    # No fd: memory the device reaches by DMA_READ / DMA_WRITE messages (an offset makes no sense).
    ready.expect_error(Command.DMA_MAP, vu.DMA_MAP.pack(32, flags, PAGE, 0x9_0000_0000, PAGE), errno.EINVAL)
    ready.call(Command.DMA_MAP, vu.DMA_MAP.pack(32, flags, 0, 0x9_0000_0000, PAGE))
    assert ready.function.memory.is_remote(0x9_0000_0000)
    ready.call(Command.DMA_UNMAP, vu.DMA_UNMAP.pack(24, 0, 0x9_0000_0000, PAGE))
    ready.expect_error(
        Command.DMA_MAP, vu.DMA_MAP.pack(32, flags, 0, 0x9_0000_0000, PAGE), errno.EINVAL, [fd, fd]
    )
    ready.expect_error(Command.DMA_MAP, vu.DMA_MAP.pack(32, 0, 0, 0x9_0000_0000, PAGE), errno.EINVAL, [fd])
    ready.expect_error(Command.DMA_MAP, b"\0" * 16, errno.EINVAL)
    # Read-only mapping: the device may not write there.
    ready.call(Command.DMA_MAP, vu.DMA_MAP.pack(32, vu.DmaFlags.READ, 1 << 20, 0x2_0000_0000, PAGE), [fd])
    assert not [r for r in ready.function.memory.regions() if r.gpa == 0x2_0000_0000][0].writable
    ready.expect_error(Command.DMA_UNMAP, vu.DMA_UNMAP.pack(24, 0, base, PAGE), errno.ENOENT)
    reply = ready.call(Command.DMA_UNMAP, vu.DMA_UNMAP.pack(24, 0, base, 1 << 20))
    assert vu.DMA_UNMAP.unpack(reply.payload) == (24, 0, base, 1 << 20)
    ready.call(Command.DMA_UNMAP, vu.DMA_UNMAP.pack(24, vu.DmaUnmapFlags.ALL, 0, 0))
    assert ready.function.memory.regions() == ()
    assert _fd_count() == before  # every descriptor passed was closed by the server
    os.close(fd)


def test_set_irqs_eventfds_mask_unmask_and_trigger(ready: Peer) -> None:
    msix = vu.PciIrq.MSIX
    eventfd_trigger = vu.IrqSetFlags.DATA_EVENTFD | vu.IrqSetFlags.ACTION_TRIGGER
    efds = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(2)]
    try:
        ready.expect_error(
            Command.DEVICE_SET_IRQS, vu.IRQ_SET.pack(20, eventfd_trigger, msix, 0, 3), errno.EINVAL, efds
        )
        ready.expect_error(
            Command.DEVICE_SET_IRQS, vu.IRQ_SET.pack(20, eventfd_trigger, msix, 1000, 2), errno.EINVAL, efds
        )
        ready.expect_error(
            Command.DEVICE_SET_IRQS,
            vu.IRQ_SET.pack(20, vu.IrqSetFlags.DATA_NONE | vu.IrqSetFlags.DATA_BOOL | 32, msix, 0, 1),
            errno.EINVAL,
        )
        ready.call(Command.DEVICE_SET_IRQS, vu.IRQ_SET.pack(20, eventfd_trigger, msix, 0, 2), efds)
        trigger = vu.IrqSetFlags.DATA_NONE | vu.IrqSetFlags.ACTION_TRIGGER
        ready.call(Command.DEVICE_SET_IRQS, vu.IRQ_SET.pack(20, trigger, msix, 1, 1))
        assert os.eventfd_read(efds[1]) == 1
        with pytest.raises(BlockingIOError):
            os.eventfd_read(efds[0])
        mask = vu.IrqSetFlags.DATA_NONE | vu.IrqSetFlags.ACTION_MASK
        unmask = vu.IrqSetFlags.DATA_BOOL | vu.IrqSetFlags.ACTION_UNMASK
        ready.call(Command.DEVICE_SET_IRQS, vu.IRQ_SET.pack(20, mask, msix, 0, 1))
        ready.call(Command.DEVICE_SET_IRQS, vu.IRQ_SET.pack(20, trigger, msix, 0, 1))
        with pytest.raises(BlockingIOError):
            os.eventfd_read(efds[0])  # masked: held pending
        ready.call(Command.DEVICE_SET_IRQS, vu.IRQ_SET.pack(21, unmask, msix, 0, 1) + b"\x01")
        assert os.eventfd_read(efds[0]) == 1  # delivered on unmask
        # De-assign (no fds): the vector is dead, the server closed its copies.
        before = _fd_count()
        ready.call(Command.DEVICE_SET_IRQS, vu.IRQ_SET.pack(20, eventfd_trigger, msix, 0, 2))
        assert _fd_count() == before - 2
        assert ready.function.eventfds[msix][:2] == [-1, -1]
    finally:
        for fd in efds:
            os.close(fd)


def test_posted_writes_get_no_reply_and_stay_ordered(ready: Peer) -> None:
    payload = vu.REGION_ACCESS.pack(Reg.INTMS, 0, 4) + (5).to_bytes(4, "little")
    ready.send(Command.REGION_WRITE, payload, flags=vu.FLAG_NO_REPLY)
    reply = ready.call(Command.REGION_READ, vu.REGION_ACCESS.pack(Reg.INTMS, 0, 4))
    assert int.from_bytes(reply.payload[16:], "little") == 5  # the read did not pass the posted write
    assert ready.server.messages["REGION_WRITE"] == 1


def test_region_write_multi(ready: Peer) -> None:
    entries = [
        vu.WRITE_MULTI_ENTRY.pack(Reg.INTMS, 0, 4, (3).to_bytes(4, "little") + b"\0" * 4),
        vu.WRITE_MULTI_ENTRY.pack(Reg.INTMC, 0, 4, (1).to_bytes(4, "little") + b"\0" * 4),
    ]
    reply = ready.call(Command.REGION_WRITE_MULTI, vu.WRITE_MULTI_COUNT.pack(2) + b"".join(entries))
    assert vu.WRITE_MULTI_COUNT.unpack(reply.payload) == (2,)
    assert ready.function.controller.intms == 2
    ready.expect_error(Command.REGION_WRITE_MULTI, vu.WRITE_MULTI_COUNT.pack(3) + entries[0], errno.EINVAL)


def test_device_reset_and_disconnect_reset_the_controller(ready: Peer) -> None:
    ctrl = ready.function.controller
    ready.call(
        Command.REGION_WRITE, vu.REGION_ACCESS.pack(Reg.AQA, 0, 4) + (0x001F001F).to_bytes(4, "little")
    )
    assert ctrl.aqa == 0x001F001F
    ready.call(Command.DEVICE_RESET)
    assert ctrl.aqa == 0 and not CSTS.RDY.get(ctrl.csts)


def test_client_class_round_trip(tmp_path: object) -> None:
    """VfioUserClient against the server over a real listening socket, in a thread."""
    import tempfile

    path = os.path.join(tempfile.mkdtemp(), "s.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    function = NvmeFunction([Namespace(1, RamBackend(1 << 20), 512)])
    server = VfioUserServer(function)

    def serve() -> None:
        conn, _ = listener.accept()
        server.serve_connection(conn)
        conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with VfioUserClient(path) as client:
            caps = client.negotiate()
            assert caps["max_msg_fds"] == 16
            assert client.device_info()[1:] == (9, 5)
            assert client.region_info(0).size == function.bar0_size
            vs = int.from_bytes(client.region_read(0, Reg.VS, 4), "little")
            assert vs == function.controller.mmio_read(Reg.VS, 4)
            with pytest.raises(VfioUserError) as info:
                client.region_read(9, 0, 4)
            assert info.value.errno == errno.EINVAL
    finally:
        thread.join(5)
        listener.close()
        function.close()
    assert server.clients_served == 1


def test_region_info_offers_the_doorbell_page_as_a_sparse_mmap_area() -> None:
    function = NvmeFunction([Namespace(1, RamBackend(1 << 20), 512)], mappable_doorbells=True)
    server = VfioUserServer(function)
    server.version_done = True
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    channel = Channel(theirs, max_message=1 << 21, max_fds=4)
    client = Channel(mine, max_message=1 << 21, max_fds=4)
    try:
        # Too little room: the reply says how much the full answer needs, and carries no caps.
        client.send(
            vu.pack_message(1, Command.DEVICE_GET_REGION_INFO, 0, vu.REGION_INFO.pack(32, 0, 0, 0, 0, 0))
        )
        server._handle_one(channel)
        reply = client.receive()
        argsz, flags, _index, cap_offset, size, _offset = vu.REGION_INFO.unpack(reply.payload)
        assert argsz == 32 + 8 + 8 + 16 and cap_offset == 0 and size == function.bar0_size
        for fd in reply.fds:
            os.close(fd)
        client.send(
            vu.pack_message(2, Command.DEVICE_GET_REGION_INFO, 0, vu.REGION_INFO.pack(argsz, 0, 0, 0, 0, 0))
        )
        server._handle_one(channel)
        reply = client.receive()
        argsz, flags, _index, cap_offset, size, offset = vu.REGION_INFO.unpack_from(reply.payload)
        assert flags & vu.RegionFlags.MMAP and flags & vu.RegionFlags.CAPS and cap_offset == 32
        cap_id, version, nxt = vu.CAP_HEADER.unpack_from(reply.payload, cap_offset)
        assert (cap_id, version, nxt) == (vu.REGION_INFO_CAP_SPARSE_MMAP, 1, 0)
        nr, _ = vu.SPARSE_MMAP.unpack_from(reply.payload, cap_offset + 8)
        area = vu.SPARSE_AREA.unpack_from(reply.payload, cap_offset + 16)
        assert nr == 1 and area == (0x1000, 0x1000)
        assert len(reply.fds) == 1
        # A store through the client's mapping is what the device scans.
        import mmap

        mapping = mmap.mmap(reply.fds[0], area[1], offset=offset + area[0])
        mapping[0:4] = (3).to_bytes(4, "little")
        assert bytes(function._db_view[0:4]) == (3).to_bytes(4, "little")
        mapping.close()
        os.close(reply.fds[0])
    finally:
        mine.close()
        theirs.close()
        function.close()
