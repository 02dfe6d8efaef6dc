"""When the device acts on a doorbell relative to its reply: first when the client shares the
server's one CPU (it then finds the completion with the reply), after the reply otherwise."""

from __future__ import annotations

import mmap
import os
import select

import pytest

from vfio_user.peer import LE, PAGE, Peer, signalled
from vnvme.spec.commands import SQE, AdminOpcode, Cns
from vnvme.spec.registers import sq_tail_doorbell
from vnvme.vfio_user import server as server_module

BASE = 0x4000_0000
ASQ, ACQ, DATA = BASE, BASE + PAGE, BASE + 2 * PAGE


def _identify_placed(ready: Peer) -> tuple[int, mmap.mmap]:
    """Admin queues in mapped memory, controller enabled, an Identify in the SQ (not rung yet).
    Returns the vector 0 eventfd and the host's view of the memory."""
    memory = ready.map_shared(BASE, 16 * PAGE)
    vector0 = ready.enable_with_admin_queues(ASQ, ACQ)
    SQE.pack_into(
        memory, 0, AdminOpcode.IDENTIFY, 0, 0x42, 0, 0, 0, 0, DATA, 0, Cns.CONTROLLER, 0, 0, 0, 0, 0
    )
    return vector0, memory


def _completed(memory: mmap.mmap) -> bool:
    """CQE 0 holds CID 42h, success, phase 1."""
    return int.from_bytes(memory[PAGE + 12 : PAGE + 16], LE) == 0x42 | (1 << 16)


def _peer(monkeypatch: pytest.MonkeyPatch, *, same_cpu: bool) -> Peer:
    """A ready peer whose server sees the client on its CPU or not (patched before the first
    write, when the server looks at affinities)."""
    monkeypatch.setattr(server_module, "_shares_one_cpu_with_peer", lambda sock: same_cpu)
    peer = Peer()
    peer.version()
    peer.enable_decoding()
    return peer


@pytest.mark.pure_python
def test_a_client_on_our_cpu_finds_the_completion_with_the_reply(monkeypatch: pytest.MonkeyPatch) -> None:
    peer = _peer(monkeypatch, same_cpu=True)
    vector0, memory = _identify_placed(peer)
    try:
        peer.write_int(0, sq_tail_doorbell(0, 0), 4, 1)  # returns with the reply
        assert _completed(memory) and signalled(vector0) == 1  # both there before the reply
    finally:
        os.close(vector0)
        memory.close()
        peer.close()


def test_otherwise_the_work_follows_the_reply(monkeypatch: pytest.MonkeyPatch) -> None:
    # (Whether the reply really came first cannot be seen from a thread of the server's own
    # process: the GIL may let the server finish before the reply is read.)
    peer = _peer(monkeypatch, same_cpu=False)
    vector0, memory = _identify_placed(peer)
    try:
        peer.write_int(0, sq_tail_doorbell(0, 0), 4, 1)
        ready_fds, _, _ = select.select([vector0], [], [], 5)
        assert ready_fds and signalled(vector0) == 1
        assert _completed(memory)
    finally:
        os.close(vector0)
        memory.close()
        peer.close()
