"""The command line as a new user meets it: help, broken pipes, and ``vnvme bench`` failing or
interrupted (one line on stderr, the documented exit status, nothing left behind)."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vnvme.cli import build_parser


def _parsers(
    parser: argparse.ArgumentParser, name: str = "vnvme"
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, subparser in action.choices.items():
                yield from _parsers(subparser, f"{name} {sub}")


def test_every_option_has_help_and_no_help_shows_markup() -> None:
    for name, parser in _parsers(build_parser()):
        text = parser.format_help()
        assert "``" not in text, name  # reStructuredText from a docstring
        for action in parser._actions:
            if not isinstance(action, argparse._SubParsersAction):
                assert action.help, f"{name} {action.option_strings or action.dest}"
    bench = dict(_parsers(build_parser()))["vnvme bench"].format_help()
    for status in ("0 ", "1 ", "2 ", "130", "143"):
        assert f"\n  {status}" in bench  # the exit statuses, one per line of the epilog
    serve = dict(_parsers(build_parser()))["vnvme serve"].format_help()
    assert "stdout  the banner and the statistics" in serve


def test_trace_events_into_a_closed_pipe_ends_quietly() -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # as `vnvme trace-events | head` once head has exited
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "vnvme", "trace-events"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    finally:
        os.close(write_end)
    assert proc.returncode == 128 + signal.SIGPIPE  # what a tool killed by SIGPIPE reports
    assert proc.stderr == ""


# Section: vnvme bench failing


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A directory with a short name: pytest's own are too long for the bench's socket paths."""
    path = Path(tempfile.mkdtemp(prefix="vb-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path)


def _env(tmp: Path) -> dict[str, str]:
    """Temporary files (the bench's sockets and server logs) go under tmp, to be checked empty."""
    tmp.mkdir(exist_ok=True)
    return {**os.environ, "TMPDIR": str(tmp)}


def _bench(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "vnvme",
            "bench",
            "--number_ios",
            "50",
            "--iodepth",
            "1",
            "--cpu",
            "any",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(tmp),
    )


def _one_line(stderr: str) -> str:
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("vnvme bench: ")
    return lines[0]


def test_bench_socket_missing_or_not_a_socket(tmp_path: Path) -> None:
    proc = _bench(tmp_path / "tmp", "--socket", str(tmp_path / "missing.sock"))
    assert proc.returncode == 1
    assert _one_line(proc.stderr) == f"vnvme bench: {tmp_path / 'missing.sock'}: No such file or directory"
    regular = tmp_path / "notes.txt"
    regular.write_text("not a server\n")
    proc = _bench(tmp_path / "tmp", "--socket", str(regular))
    assert proc.returncode == 1
    assert _one_line(proc.stderr) == f"vnvme bench: {regular}: not a socket"
    assert regular.read_text() == "not a server\n"
    assert os.listdir(tmp_path / "tmp") == []


def test_bench_against_a_server_that_hangs_up(tmp_path: Path) -> None:
    path = str(tmp_path / "rude.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(4)

    def hang_up() -> None:
        with listener:
            conn, _ = listener.accept()
            conn.close()

    thread = threading.Thread(target=hang_up, daemon=True)
    thread.start()
    proc = _bench(tmp_path / "tmp", "--socket", path)
    thread.join(10)
    assert proc.returncode == 1
    assert _one_line(proc.stderr).startswith(f"vnvme bench: {path}: ")
    assert os.listdir(tmp_path / "tmp") == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ("--namespace", "ram,size=banana"),
            "vnvme bench: the server exited (status 2): vnvme serve: not a size: 'banana'",
        ),
        (
            ("--server-cmd", "sh -c 'echo cannot open the device >&2; exit 3' {socket}"),
            "vnvme bench: the server exited (status 3): cannot open the device",
        ),
        (
            ("--server-cmd", "/nonexistent/server {socket}"),
            "vnvme bench: cannot start the server '/nonexistent/server': No such file or directory",
        ),
    ],
)
def test_bench_server_that_does_not_start(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    proc = _bench(tmp_path / "tmp", *args)
    assert proc.returncode == 1
    assert _one_line(proc.stderr) == message
    assert os.listdir(tmp_path / "tmp") == []


def _running_bench(tmp: Path) -> tuple[subprocess.Popen[str], int]:
    """A bench measuring for a long time, and the PID of the server it started, once listening."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "vnvme", "bench", "--runtime", "120", "--iodepth", "1", "--cpu", "any"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(tmp),
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        sockets = list(tmp.glob("vnvme-bench-*/*.sock"))
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        if sockets and children:
            return proc, int(children[0])
        time.sleep(0.02)
    proc.kill()
    out, err = proc.communicate()
    raise AssertionError(f"the bench did not start its server: {err}")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_bench_interrupted_stops_its_server(short_tmp: Path, sig: signal.Signals) -> None:
    proc, server_pid = _running_bench(short_tmp)
    try:
        time.sleep(0.3)  # into the measurement (any moment will do: the outcome must not depend on it)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + sig
    assert _one_line(err) == f"vnvme bench: interrupted by {sig.name}"
    assert not os.path.exists(f"/proc/{server_pid}")  # stopped and reaped
    assert os.listdir(short_tmp) == []  # its socket and directory are gone


def test_bench_server_dies_during_the_run(short_tmp: Path) -> None:
    proc, server_pid = _running_bench(short_tmp)
    try:
        time.sleep(0.3)
        os.kill(server_pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1
    assert _one_line(err) == "vnvme bench: the server exited (signal 9)"
    assert os.listdir(short_tmp) == []


def test_bench_report_that_cannot_be_written_is_refused_before_the_run(tmp_path: Path) -> None:
    for option, path in (("--json-output", str(tmp_path / "no" / "dir.json")), ("--plot", str(tmp_path))):
        proc = _bench(tmp_path / "tmp", option, path)
        assert proc.returncode == 2
        assert _one_line(proc.stderr).startswith(f"vnvme bench: {option} {path}: ")
        assert os.listdir(tmp_path / "tmp") == []


def test_demo_interrupted_says_so_in_one_line() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "vnvme", "demo", "--number-ios", "100000000", "--iodepth", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # As from a terminal: a test run started in the background (a non-interactive shell's
        # `&`) ignores SIGINT, the demo inherits that, and rightly goes on.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        assert proc.stdout is not None
        proc.stdout.readline()  # it is running
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130
    assert "Traceback" not in err and err.strip().splitlines() == ["vnvme demo: interrupted"]
