"""scripts/hostile_peers.py against `vnvme serve` in its own process: every hostile peer leaves
the server with the descriptors and memfd mappings it had (/proc/PID/fd, /proc/PID/maps), within
the stated bounds meanwhile, and the next client is served and does verified I/O."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import vnvme
from vnvme.vfio_user.server import DMA_MAP_DESCRIPTORS

SCRIPT = Path(__file__).parents[2] / "scripts" / "hostile_peers.py"


def test_hostile_peers_against_vnvme_serve() -> None:
    env = dict(os.environ, PYTHONPATH=str(Path(vnvme.__file__).parents[1]))
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--timeout", "0.3", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [row["peer"] for row in rows] == ["a", "b", "b", "c", "c", "c", "d"]
    for row in rows:
        assert row["next_client_io"], row
        assert row["after"]["fds"] == row["before"]["fds"], row
        assert row["after"]["maps"] == 0, row
    dma, one_message, pieces, half_header, half_body, never_reads, silent = rows
    limit = dma["notes"]["max_dma_maps"]
    assert dma["notes"]["mapped"] == limit and dma["notes"]["one_more"] == "ENOSPC"
    assert dma["peak"]["maps"] == limit
    # The hostile peer's socket, and one descriptor per region where mmap keeps one.
    assert dma["peak"]["fds"] <= dma["before"]["fds"] + 1 + limit * DMA_MAP_DESCRIPTORS
    assert one_message["notes"]["reply"] == "EINVAL"
    max_fds = one_message["notes"]["max_msg_fds"]
    for row in (one_message, pieces):
        assert row["peak"]["fds"] <= row["before"]["fds"] + 1 + max_fds, row
    for row in (pieces, half_header, half_body, never_reads, silent):
        assert row["notes"]["hung_up_after_s"] is not None, row


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("hostile_peers", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)  # its dataclasses look their module up there
    spec.loader.exec_module(sys.modules[spec.name])
    return sys.modules[spec.name]


def test_a_peer_that_never_reads_is_hung_up_on_when_the_server_had_read_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server paused (SIGSTOP, our own child) from the peer's VERSION until its send queue
    is full: it then finds every request at once, and must still end up stuck on replies the
    peer never reads, and hang up."""
    peers = _script()
    server = peers.Server(str(tmp_path), 0.3)
    version = peers.version

    def version_then_pause(channel: Any) -> Any:
        caps = version(channel)
        os.kill(server.proc.pid, signal.SIGSTOP)
        return caps

    monkeypatch.setattr(peers, "version", version_then_pause)
    try:
        # never_reads calls peak() once its queue is full: the server goes on from there.
        notes = peers.never_reads(server.path, lambda: os.kill(server.proc.pid, signal.SIGCONT))
        assert notes["hung_up_after_s"] is not None, notes
        monkeypatch.undo()
        assert peers.well_behaved_client(server.path)
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
        server.stop()
