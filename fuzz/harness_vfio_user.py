#!/usr/bin/env python3
"""The vfio-user message path: framing with descriptors and every handler, in one thread.

The input becomes up to 8 raw messages (tests/vfio_user/test_vu_fuzz.py's :class:`Raw`: any
message id and command, sizes that lie, every flag bit, payloads laid out as each command's
structure with edge values or plausible ones, 0-3 descriptors), optionally the first part of
one more message with descriptors before a hang-up. All of it is written to one end of a
socketpair, that end is shut for writing, and the server serves the other end in this thread
until it sees the end of the stream: no thread and no waiting, so one input costs about a
millisecond. A DMA_READ / DMA_WRITE the server sends (memory mapped without a descriptor) finds
the client gone.

The oracle is test_random_messages' as far as a client that does not wait can check it: no
exception leaves the server and it logs no internal error; the replies come in order, one per
message that wants one, with the framing errno wherever framing decides (all of them, unless
the server stopped early because a DMA request went unanswered or it refused an oversized
message and closed); after a correct VERSION the final DEVICE_GET_INFO is answered exactly
(the stream stayed in sync); every guest memory region ever mapped was described by a DMA_MAP;
at the end nothing is mapped and the process holds exactly the descriptors it had before.
"""

from __future__ import annotations

import errno
import json
import socket

from _engine import Input, instrumented, run

with instrumented():
    from vfio_user.peer import PAGE, fd_count, make_function
    from vfio_user.test_vu_fuzz import (
        ADDRESSES,
        COMMANDS,
        COUNTS,
        DEVICE_INFO,
        FILE_OFFSETS,
        GET_INFO,
        HANDLED,
        MAX_MESSAGE,
        MEMFD_SIZE,
        REGION_INDICES,
        REGION_OFFSETS,
        REGION_SIZES,
        SIZES,
        U16,
        U32,
        VECTORS,
        XFER,
        Raw,
        _exact,
        _internal_errors,
        _make_fd,
        check_reply_errno,
    )
    from vnvme.memory import Buffer, GuestMemory, MemoryRegion, RemoteAccess
    from vnvme.vfio_user import protocol as vu
    from vnvme.vfio_user.protocol import Channel, Command
    from vnvme.vfio_user.server import ServerOptions, VfioUserServer

MAX_MESSAGES = 8
#: Everything the client writes stays below the socket's buffer (the server reads it only after).
MAX_WIRE = 96 * 1024
COMMAND_CHOICES = sorted(HANDLED) * 2 + COMMANDS
VERSION_PAYLOAD = (
    vu.VERSION_MAJOR.to_bytes(2, "little")
    + vu.VERSION_MINOR.to_bytes(2, "little")
    + json.dumps({"capabilities": {"max_msg_fds": 8}}).encode()
    + b"\0"
)
ENABLE_DECODING = vu.REGION_ACCESS.pack(0x04, int(vu.PciRegion.CONFIG), 2) + (6).to_bytes(2, "little")
CAP_VALUES: list[object] = [0, 1, 8, 16, 17, 4096, -1, True, None, "8", 1.5, 1 << 70, [], {}]


def _field(inp: Input, values: list[int], nbytes: int) -> int:
    """One of the interesting ``values``, or any ``nbytes``-wide number."""
    return inp.pick(values) if inp.flag() else inp.uint(nbytes)


def _argsz(inp: Input, size: int) -> int:
    return inp.pick([size, size, size, size, 0, size - 1, size + 1, U32])


def _fd_kinds(inp: Input, most: int) -> tuple[str, ...]:
    return tuple(inp.pick(["memfd", "memfd", "eventfd"]) for _ in range(inp.below(most + 1)))


def _version(inp: Input) -> bytes:
    major = inp.pick([vu.VERSION_MAJOR] * 4 + [1, U16])
    minor = inp.pick([0, 1, 2, U16])
    kind = inp.below(4)
    if kind == 0:
        keys = ("max_msg_fds", "max_data_xfer_size", "pgsizes", "migration")
        caps = {key: inp.pick(CAP_VALUES) for key in keys if inp.flag()}
        text = json.dumps({"capabilities": caps}).encode()
    elif kind == 1:
        text = inp.pick([b"", b"{", b"[1, 2]", b'{"capabilities": [1]}', b"\xff\xfe", b"[" * 1001])
    else:
        text = inp.bytes(inp.below(48))
    return major.to_bytes(2, "little") + minor.to_bytes(2, "little") + text + inp.pick([b"\0", b"", b"\0x"])


def _payload(inp: Input, command: int) -> tuple[bytes, tuple[str, ...]]:
    """The command's structure, plausible (handlers get past their checks) or with edge values."""
    plausible = inp.flag()
    if command == Command.VERSION:
        return _version(inp), ()
    if command == Command.DMA_MAP:
        if plausible:
            size = (1 + inp.below(4)) * PAGE
            offset = inp.below((MEMFD_SIZE - size) // PAGE + 1) * PAGE
            address = inp.pick([0, 1 << 32, 1 << 40]) + inp.below(8) * PAGE
            flags = inp.pick([1, 3, 3])
            return vu.DMA_MAP.pack(vu.DMA_MAP.size, flags, offset, address, size), inp.pick(
                [("memfd",), ("memfd",), ()]
            )
        payload = vu.DMA_MAP.pack(
            _argsz(inp, vu.DMA_MAP.size),
            _field(inp, [1, 3, 3, 2, 0, 7, 0x80000003], 4),
            _field(inp, FILE_OFFSETS, 8),
            _field(inp, ADDRESSES, 8),
            _field(inp, SIZES, 8),
        )
        return payload, _fd_kinds(inp, 3)
    if command == Command.DMA_UNMAP:
        if plausible:
            if inp.below(6) == 0:
                return vu.DMA_UNMAP.pack(vu.DMA_UNMAP.size, vu.DmaUnmapFlags.ALL, 0, 0), ()
            address = inp.pick([0, 1 << 32, 1 << 40]) + inp.below(8) * PAGE
            return vu.DMA_UNMAP.pack(vu.DMA_UNMAP.size, 0, address, (1 + inp.below(4)) * PAGE), ()
        return vu.DMA_UNMAP.pack(
            _argsz(inp, vu.DMA_UNMAP.size),
            _field(inp, [0, 0, 1, 2, 3, 4, 0x80000000], 4),
            _field(inp, ADDRESSES, 8),
            _field(inp, SIZES, 8),
        ), ()
    if command == Command.DEVICE_GET_INFO:
        return vu.DEVICE_INFO.pack(_argsz(inp, 16), _field(inp, [0], 4), _field(inp, [0], 4), 0), ()
    if command == Command.DEVICE_GET_REGION_INFO:
        argsz = inp.pick([32, 32, 32, 0, 31, 33, 64, 4096, U32])
        index = inp.below(10) if plausible else _field(inp, [U32], 4)
        return vu.REGION_INFO.pack(argsz, _field(inp, [0], 4), index, _field(inp, [0], 4), 0, 0), ()
    if command == Command.DEVICE_GET_IRQ_INFO:
        index = inp.below(6) if plausible else _field(inp, [U32], 4)
        return vu.IRQ_INFO.pack(_argsz(inp, 16), _field(inp, [0], 4), index, _field(inp, [0], 4)), ()
    if command == Command.DEVICE_SET_IRQS:
        return _set_irqs(inp, plausible)
    if command in (Command.REGION_READ, Command.REGION_WRITE):
        write = command == Command.REGION_WRITE
        if plausible:
            index = inp.pick(sorted(REGION_SIZES))
            count = inp.pick([1, 2, 4, 4, 8])
            offset = inp.below(REGION_SIZES[index] // count) * count
            if index == vu.PciRegion.BAR0:
                offset = inp.pick([offset, offset % 0x40, 0x1000 + offset % 0x400])
            header = vu.REGION_ACCESS.pack(offset, index, count)
            return header + (inp.bytes(count).ljust(count, b"\0") if write else b""), ()
        count = _field(inp, COUNTS, 4)
        header = vu.REGION_ACCESS.pack(_field(inp, REGION_OFFSETS, 8), _field(inp, REGION_INDICES, 4), count)
        if not write:
            return header, ()
        length = max(0, count + inp.pick([0, 0, 0, 1, -1])) if count <= XFER + 1 else inp.below(9)
        return header + inp.bytes(length).ljust(length, b"\0"), ()
    if command == Command.REGION_WRITE_MULTI:
        entries = [
            vu.WRITE_MULTI_ENTRY.pack(
                _field(inp, REGION_OFFSETS, 8),
                _field(inp, REGION_INDICES, 4),
                inp.pick([0, 1, 2, 4, 4, 8, 8, 9, U32]),
                inp.bytes(8).ljust(8, b"\0"),
            )
            for _ in range(inp.below(4))
        ]
        wr_cnt = inp.pick([len(entries)] * 3 + [0, len(entries) + 1, (1 << 64) - 1, 1 << 63])
        return vu.WRITE_MULTI_COUNT.pack(wr_cnt) + b"".join(entries), ()
    if command == Command.DEVICE_RESET:
        return inp.pick([b"", b"", b"\0" * 8]), ()
    return inp.bytes(inp.below(48)), ()


def _set_irqs(inp: Input, plausible: bool) -> tuple[bytes, tuple[str, ...]]:
    if plausible:
        index = int(inp.pick([vu.PciIrq.MSIX, vu.PciIrq.MSIX, vu.PciIrq.INTX]))
        vectors = VECTORS if index == vu.PciIrq.MSIX else 1
        action = inp.pick([0x20, 0x20, 0x08, 0x10])
        data_kind = 4 if action == 0x20 and inp.flag() else inp.pick([1, 2])
        count = inp.below(min(3, vectors) + 1)
        start = inp.below(vectors - count + 1)
        data = inp.bytes(count).ljust(count, b"\0") if data_kind == 2 else b""
        header = vu.IRQ_SET.pack(vu.IRQ_SET.size + len(data), data_kind | action, index, start, count)
        fds = tuple(inp.pick(["eventfd"] * 5 + ["memfd"]) for _ in range(count)) if data_kind == 4 else ()
        return header + data, fds
    data_kind = inp.pick([1, 2, 4, 4, 0, 3, 7])
    action = inp.pick([0x20, 0x20, 0x08, 0x10, 0, 0x18, 0x38])
    reserved = inp.pick([0, 0, 0, 1 << 6, 1 << 31])
    index = _field(inp, [0, 2, 2, 1, 3, 4, 5, U32], 4)
    start = inp.pick([0, 0, 1, 2, VECTORS - 1, VECTORS, VECTORS + 1, U32])
    fds = _fd_kinds(inp, 3) if data_kind == 4 else ()
    count = inp.pick([len(fds)] * 3 + [0, 1, 2, VECTORS, VECTORS - 1, U32])
    data = inp.bytes(min(count, VECTORS + 2))
    argsz = _argsz(inp, vu.IRQ_SET.size + len(data))
    return vu.IRQ_SET.pack(argsz, data_kind | action | reserved, index, start, count) + data, fds


def _message(inp: Input) -> Raw:
    command = inp.pick(COMMAND_CHOICES)
    payload, fds = _payload(inp, command)
    shape = inp.below(16)
    if shape == 0 and payload:
        payload = payload[: inp.below(len(payload))]
    elif shape == 1:
        payload = inp.bytes(inp.below(64))
    elif shape == 2:
        payload += inp.bytes(1 + inp.below(32))
    if not fds and inp.below(10) == 0:
        fds = _fd_kinds(inp, 3)
    true_size = vu.HEADER_SIZE + len(payload)
    mode = inp.below(16)
    if mode == 0:
        size = inp.below(vu.HEADER_SIZE)
    elif mode in (1, 2):
        size = true_size + 1 + inp.below(64)
    elif mode == 3:
        size = max(true_size, MAX_MESSAGE)
    elif mode == 4:
        size = max(true_size, MAX_MESSAGE + 1 + inp.u16() % 4096)
    else:
        size = true_size
    flags = inp.pick([vu.TYPE_COMMAND] * 12 + [vu.TYPE_REPLY, 2, 15])
    flags |= inp.pick([0] * 5 + [vu.FLAG_NO_REPLY]) | inp.pick([0] * 7 + [vu.FLAG_ERROR])
    flags |= inp.pick([0] * 5 + [1 << 6, 1 << 31, 0xFFFFFF00])
    return Raw(
        msg_id=_field(inp, [0, 1, U16], 2),
        command=command,
        size=size,
        flags=flags,
        error=inp.pick([0, 0, 0, errno.EIO, U32]),
        payload=payload,
        pad=inp.pick([0, 0xFF]),
        fds=fds,
    )


def _send(channel: Channel, data: bytes, kinds: tuple[str, ...]) -> None:
    fds = [_make_fd(kind) for kind in kinds]
    try:
        channel.send(data, fds)
    finally:
        for fd in fds:
            socket.close(fd)  # in flight, the message holds its own references


def one_input(data: bytes) -> None:
    inp = Input(data)
    setup = inp.u8()
    greeted = not setup & 1
    messages = [_exact(0xF000, Command.VERSION, VERSION_PAYLOAD)] if greeted else []
    if setup & 2:
        messages.append(_exact(0xF001, Command.REGION_WRITE, ENABLE_DECODING))
    wire = 0
    while inp.more() and len(messages) < MAX_MESSAGES:
        message = _message(inp)
        wire += message.consumed
        if wire > MAX_WIRE:
            break
        messages.append(message)
    hangup: tuple[Raw, int] | None = None
    if setup & 4 and inp.more():
        message = _message(inp)
        kinds = message.fds or ("memfd",)
        hangup = (Raw(**{**message.__dict__, "fds": kinds}), 1 + inp.u16() % (message.consumed - 1))
    else:
        messages.append(_exact(0xF002, Command.DEVICE_GET_INFO, GET_INFO))  # still in sync?

    base = fd_count()
    described: set[tuple[int, int]] = set()
    for message in messages:
        seen = message.seen_payload
        if message.command == Command.DMA_MAP and seen is not None and len(seen) >= vu.DMA_MAP.size:
            _, _, _, address, size = vu.DMA_MAP.unpack_from(seen)
            described.add((address, size))
    with _internal_errors() as internal:
        mapped: list[tuple[int, int]] = []

        class RecordingMemory(GuestMemory):
            """Guest memory that records every region mapped (compiled, GuestMemory's own
            methods cannot be replaced on an instance)."""

            def map(
                self, gpa: int, buffer: Buffer, *, writable: bool = True, owner: object = None
            ) -> MemoryRegion:
                mapped.append((gpa, len(memoryview(buffer))))
                return super().map(gpa, buffer, writable=writable, owner=owner)

            def map_remote(
                self, gpa: int, size: int, access: RemoteAccess, *, writable: bool = True
            ) -> MemoryRegion:
                mapped.append((gpa, size))
                return super().map_remote(gpa, size, access, writable=writable)

        memory = RecordingMemory()
        function = make_function(memory=memory)
        server = VfioUserServer(function, ServerOptions(max_data_xfer_size=XFER, dma_timeout=0.2))
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            client = Channel(mine, max_message=1 << 21, max_fds=16)
            for message in messages:
                _send(client, message.wire(), message.fds)
            if hangup is not None:
                message, cut = hangup
                _send(client, message.wire()[:cut], message.fds)
            mine.shutdown(socket.SHUT_WR)
            server.serve_connection(theirs)
            theirs.close()
            received: list[vu.Message] = []
            while True:
                try:
                    reply = client.receive()
                except (vu.Disconnected, ConnectionResetError):
                    # A server that hangs up on lost framing leaves the client's unread bytes
                    # behind: the kernel then ends the stream with a reset, after the replies.
                    break
                received.append(reply)
                assert not (reply.is_reply and reply.fds), "a reply with descriptors"
                reply.close_fds()
        finally:
            mine.close()
            theirs.close()
            function.close()
    replies = [m for m in received if m.is_reply]
    requests = [m for m in received if not m.is_reply]
    assert all(m.command in (Command.DMA_READ, Command.DMA_WRITE) for m in requests), requests
    wanted = [m for m in messages if not m.no_reply]
    assert len(replies) <= len(wanted), (replies, wanted)
    # The model's errnos are for after VERSION; before it every other command is EINVAL. A
    # VERSION sent with NO_REPLY may or may not have been taken.
    version_done = version_unknown = False
    answered = iter(zip(replies, wanted, strict=False))
    for sent in messages:
        if sent.no_reply:
            version_unknown = version_unknown or sent.command == Command.VERSION
            continue
        pair = next(answered, None)
        if pair is None:
            break
        reply, message = pair
        assert (reply.msg_id, reply.command) == (message.msg_id & U16, message.command), (reply, message)
        assert reply.flags in (vu.TYPE_REPLY, vu.TYPE_REPLY | vu.FLAG_ERROR), reply
        expected = message.framing_errno()
        if expected in (None, errno.ENOSYS) and message.command != Command.VERSION and not version_done:
            if version_unknown:
                expected = reply.error if reply.error in (expected, errno.EINVAL) else expected
            else:
                expected = errno.EINVAL
        if message.command == Command.VERSION and not reply.is_error:
            version_done = True
        check_reply_errno(reply, message, expected)
    if len(replies) < len(wanted):
        # The server may stop early only for a DMA request nobody answers, or after refusing
        # an oversized message (then it closes the connection).
        stopped_for_e2big = bool(replies) and replies[-1].is_error and replies[-1].error == errno.E2BIG
        # A posted (no-reply) oversized message is refused without a reply, then the hang-up.
        posted_too_large = any(m.no_reply and m.framing_errno() == errno.E2BIG for m in messages)
        assert requests or stopped_for_e2big or posted_too_large, (replies, wanted)
    elif greeted and hangup is None and not requests:
        last = replies[-1]
        assert (last.msg_id, last.flags, last.payload) == (0xF002, vu.TYPE_REPLY, DEVICE_INFO), last
    assert set(mapped) <= described, (mapped, described)
    assert memory.regions() == () and server.dma == {}
    assert fd_count() == base
    assert not internal.records, internal.records


if __name__ == "__main__":
    run(one_input)
