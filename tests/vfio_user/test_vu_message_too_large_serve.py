"""`vnvme serve` in its own process: a client whose header declares a message larger than the
maximum gets E2BIG and is hung up on, and the next client is served (the server's own accept
loop, not a test double)."""

from __future__ import annotations

import errno
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vnvme.vfio_user import protocol as vu
from vnvme.vfio_user.client import VfioUserClient
from vnvme.vfio_user.protocol import Channel, Command


def _start(tmp_path: Path, *args: str) -> tuple[subprocess.Popen[str], str]:
    path = str(tmp_path / "vnvme.sock")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vnvme", "serve", "--socket", path, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 20
    while not os.path.exists(path):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out, err = proc.communicate(timeout=10)
            raise RuntimeError(f"server did not start: {out}{err}")
        time.sleep(0.02)
    return proc, path


def _next(channel: Channel) -> vu.Message:
    assert select.select([channel.sock], [], [], 5)[0], "nothing from the server within 5 s"
    return channel.receive()


def test_the_next_client_is_served_after_a_message_too_large(tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    proc, path = _start(
        tmp_path, "--namespace", "ram,size=1M", "--trace", "vfio_user_err_*", "--trace-file", str(trace)
    )
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
        channel = Channel(sock, max_message=1 << 21, max_fds=4)
        try:
            version = b"\0\0\1\0" + json.dumps({"capabilities": {}}).encode() + b"\0"
            channel.send(vu.pack_message(1, Command.VERSION, vu.TYPE_COMMAND, version))
            assert not _next(channel).is_error
            # The header alone, no body byte ever: the answer must not wait for one.
            channel.send(vu.HEADER.pack(2, Command.REGION_WRITE, 0xFFFF_FFF0, vu.TYPE_COMMAND, 0))
            refused = _next(channel)
            assert (refused.msg_id, refused.command, refused.error) == (2, Command.REGION_WRITE, errno.E2BIG)
            with pytest.raises(vu.Disconnected):
                _next(channel)
        finally:
            channel.close()
        second = VfioUserClient(path, timeout=5)
        try:
            second.negotiate()
            assert second.device_info()[1:] == (9, 5)  # regions, interrupt types
        finally:
            second.close()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    stats = json.loads(out.strip().splitlines()[-1])
    assert stats["message_errors"] == {"message_too_large": 1}
    assert stats["clients_served"] == 2
    (event,) = [json.loads(line) for line in trace.read_text().splitlines()]
    assert event["event"] == "vfio_user_err_message_too_large"
    assert (event["command"], event["msg_id"], event["size"]) == ("REGION_WRITE", 2, 0xFFFF_FFF0)
