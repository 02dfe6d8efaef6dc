"""DMA_READ / DMA_WRITE: memory mapped without a file descriptor, reached by server requests.

The test plays the client by hand: it maps memory without an fd, enables the controller with its
admin queues there, rings the admin SQ doorbell and answers the requests the server sends.
"""

from __future__ import annotations

import errno
import select
import threading

import pytest

from vfio_user.peer import LE, PAGE, Peer, signalled
from vnvme.spec.commands import SQE, AdminOpcode, Cns
from vnvme.spec.registers import CSTS, Reg, sq_tail_doorbell
from vnvme.vfio_user import protocol as vu
from vnvme.vfio_user.protocol import Command
from vnvme.vfio_user.server import ServerOptions

BASE = 0x4000_0000
ASQ, ACQ, DATA = BASE, BASE + PAGE, BASE + 2 * PAGE


def _next(peer: Peer, timeout: float = 5.0) -> vu.Message:
    ready, _, _ = select.select([peer.sock], [], [], timeout)
    assert ready, "the server sent nothing"
    return peer.channel.receive()


def _answer_read(peer: Peer, request: vu.Message, memory: bytearray) -> tuple[int, int]:
    assert request.command == Command.DMA_READ and not request.is_reply
    address, count = vu.DMA_ACCESS.unpack(request.payload)
    start = address - BASE
    data = bytes(memory[start : start + count])
    peer.channel.send(
        vu.pack_message(
            request.msg_id, Command.DMA_READ, vu.TYPE_REPLY, vu.DMA_ACCESS.pack(address, count) + data
        )
    )
    return address, count


def _answer_write(peer: Peer, request: vu.Message, memory: bytearray) -> tuple[int, int]:
    assert request.command == Command.DMA_WRITE and not request.is_reply
    address, count = vu.DMA_ACCESS.unpack_from(request.payload)
    data = request.payload[vu.DMA_ACCESS.size :]
    assert len(data) == count
    memory[address - BASE : address - BASE + count] = data
    peer.channel.send(
        vu.pack_message(request.msg_id, Command.DMA_WRITE, vu.TYPE_REPLY, vu.DMA_ACCESS.pack(address, count))
    )
    return address, count


def _enable_with_admin_queues_in_message_memory(ready: Peer) -> int:
    flags = vu.DmaFlags.READ | vu.DmaFlags.WRITE
    reply = ready.call(Command.DMA_MAP, vu.DMA_MAP.pack(32, flags, 0, BASE, 16 * PAGE))  # no fd
    assert not reply.is_error
    assert ready.function.memory.is_remote(BASE)
    vector0 = ready.enable_with_admin_queues(ASQ, ACQ)
    return vector0


def test_admin_command_through_dma_messages(ready: Peer) -> None:
    memory = bytearray(16 * PAGE)
    vector0 = _enable_with_admin_queues_in_message_memory(ready)
    SQE.pack_into(
        memory, 0, AdminOpcode.IDENTIFY, 0, 0x42, 0, 0, 0, 0, DATA, 0, Cns.CONTROLLER, 0, 0, 0, 0, 0
    )
    doorbell = sq_tail_doorbell(0, 0)
    msg_id = ready.send(Command.REGION_WRITE, vu.REGION_ACCESS.pack(doorbell, 0, 4) + (1).to_bytes(4, LE))
    reply = _next(ready)
    assert reply.is_reply and reply.msg_id == msg_id  # the doorbell is answered before the work
    # The device fetches the SQE, writes the Identify data, then the CQE; only then the interrupt.
    assert _answer_read(ready, _next(ready), memory) == (ASQ, 64)
    assert signalled(vector0) == 0
    assert _answer_write(ready, _next(ready), memory) == (DATA, 4096)
    assert signalled(vector0) == 0
    assert _answer_write(ready, _next(ready), memory) == (ACQ, 16)
    ready_fds, _, _ = select.select([vector0], [], [], 5)
    assert ready_fds and signalled(vector0) == 1
    cid, status_phase = (
        int.from_bytes(memory[PAGE + 12 : PAGE + 14], LE),
        int.from_bytes(memory[PAGE + 14 : PAGE + 16], LE),
    )
    assert cid == 0x42 and status_phase == 1  # success, phase 1
    assert (
        memory[2 * PAGE + 4 : 2 * PAGE + 24].rstrip(b" ") == ready.function.controller.config.serial.encode()
    )
    assert ready.server.dma_messages == 3


def test_dma_error_reply_makes_the_controller_fatal_not_the_server(ready: Peer) -> None:
    _enable_with_admin_queues_in_message_memory(ready)
    doorbell = sq_tail_doorbell(0, 0)
    ready.send(Command.REGION_WRITE, vu.REGION_ACCESS.pack(doorbell, 0, 4) + (1).to_bytes(4, LE))
    assert _next(ready).is_reply
    request = _next(ready)
    assert request.command == Command.DMA_READ
    ready.channel.send(
        vu.pack_message(request.msg_id, Command.DMA_READ, vu.TYPE_REPLY | vu.FLAG_ERROR, b"", errno.EFAULT)
    )
    # The SQE could not be fetched: CSTS.CFS, and the server still answers.
    assert CSTS.CFS.get(ready.read_int(0, Reg.CSTS, 4))
    assert ready.function.fatal_reasons and "unreachable" in ready.function.fatal_reasons[0]


def test_commands_that_arrive_while_the_server_waits_are_served_after(ready: Peer) -> None:
    memory = bytearray(16 * PAGE)
    _enable_with_admin_queues_in_message_memory(ready)
    SQE.pack_into(memory, 0, AdminOpcode.IDENTIFY, 0, 7, 0, 0, 0, 0, DATA, 0, Cns.CONTROLLER, 0, 0, 0, 0, 0)
    ready.send(
        Command.REGION_WRITE, vu.REGION_ACCESS.pack(sq_tail_doorbell(0, 0), 0, 4) + (1).to_bytes(4, LE)
    )
    assert _next(ready).is_reply
    request = _next(ready)  # DMA_READ of the SQE: before answering, ask something ourselves
    read_id = ready.send(Command.REGION_READ, vu.REGION_ACCESS.pack(Reg.VS, 0, 4))
    _answer_read(ready, request, memory)
    _answer_write(ready, _next(ready), memory)  # identify data
    _answer_write(ready, _next(ready), memory)  # CQE
    reply = _next(ready)
    assert reply.is_reply and reply.msg_id == read_id  # served once the device pass was over
    assert int.from_bytes(reply.payload[16:], LE) == ready.function.controller.mmio_read(Reg.VS, 4)


def test_client_hanging_up_during_a_dma_request_ends_the_connection_cleanly(ready: Peer) -> None:
    _enable_with_admin_queues_in_message_memory(ready)
    ready.send(
        Command.REGION_WRITE, vu.REGION_ACCESS.pack(sq_tail_doorbell(0, 0), 0, 4) + (1).to_bytes(4, LE)
    )
    assert _next(ready).is_reply
    assert _next(ready).command == Command.DMA_READ
    ready.disconnect()  # never answers
    assert ready.function.memory.regions() == ()  # mappings dropped, controller reset
    assert not CSTS.RDY.get(ready.function.controller.csts)


def test_a_message_too_large_during_a_dma_request_is_answered_after_those_before_it(ready: Peer) -> None:
    """Instead of the DMA reply, a command and then a header declaring 4 GiB: the device's
    access fails (no more requests on a stream without framing), the command is answered, then
    E2BIG, then the server hangs up."""
    _enable_with_admin_queues_in_message_memory(ready)
    ready.send(
        Command.REGION_WRITE, vu.REGION_ACCESS.pack(sq_tail_doorbell(0, 0), 0, 4) + (1).to_bytes(4, LE)
    )
    assert _next(ready).is_reply
    assert _next(ready).command == Command.DMA_READ
    read_id = ready.send(Command.REGION_READ, vu.REGION_ACCESS.pack(Reg.VS, 0, 4))
    ready.raw(vu.HEADER.pack(0x77, Command.DMA_READ, 0xFFFF_FFF0, vu.TYPE_REPLY, 0))
    first = _next(ready)
    assert (first.msg_id, first.is_error) == (read_id, False)
    refused = _next(ready)
    assert (refused.msg_id, refused.command, refused.error) == (0x77, Command.DMA_READ, errno.E2BIG)
    with pytest.raises(vu.Disconnected):
        _next(ready)  # nothing after E2BIG: the end of the stream
    ready.thread.join(5)
    assert not ready.thread.is_alive()
    assert ready.server.errors["message_too_large"] == 1 and ready.server.dma_messages == 1


def test_commands_flooding_in_instead_of_a_dma_reply_fail_the_access_not_the_memory() -> None:
    """A client that answers a DMA_READ with command after command: the server keeps at most
    1024 of them for later (not as many as come in dma_timeout), fails the device's access
    then, and answers every command in order."""
    peer = Peer(ServerOptions(dma_timeout=60))
    try:
        peer.version()
        peer.enable_decoding()
        _enable_with_admin_queues_in_message_memory(peer)
        peer.send(
            Command.REGION_WRITE, vu.REGION_ACCESS.pack(sq_tail_doorbell(0, 0), 0, 4) + (1).to_bytes(4, LE)
        )
        assert _next(peer).is_reply
        assert _next(peer).command == Command.DMA_READ  # never answered
        ids: list[int] = []

        def flood() -> None:  # from a thread: the replies are read meanwhile
            ids.extend(
                peer.send(Command.REGION_READ, vu.REGION_ACCESS.pack(Reg.VS, 0, 4)) for _ in range(1500)
            )

        sender = threading.Thread(target=flood)
        sender.start()
        # Well before dma_timeout: the access failed once 1024 were waiting.
        replies = [_next(peer) for _ in range(1500)]
        sender.join(10)
        assert [r.msg_id for r in replies] == ids and not any(r.is_error for r in replies)
        assert peer.server.errors["deferred_overflow"] == 1
    finally:
        peer.close()
