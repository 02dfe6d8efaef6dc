"""scripts/hostile_peers.py against `vnvme serve` in its own process: every hostile peer leaves
the server with the descriptors and memfd mappings it had (/proc/PID/fd, /proc/PID/maps), within
the stated bounds meanwhile, and the next client is served and does verified I/O."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
