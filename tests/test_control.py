"""``vnvme serve --control PATH`` and ``vnvme ctl``: fault rules changed while serving."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from host import make_rig
from test_serve import Server
from test_user_data_safety import USER_TEXT, _one_line_error, _serve
from vnvme.control import MAX_CLIENTS, MAX_REQUEST, ControlServer, request
from vnvme.driver import NvmeDriver
from vnvme.driver.driver import NvmeError
from vnvme.spec.status import DNR, Status

_PATTERN = bytes(range(256)) * 16  # 8 LBAs of 512 bytes


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Server, str]]:
    control = str(tmp_path / "control.sock")
    s = Server(tmp_path, "--quiet", "--control", control, "--namespace", "ram,size=8M")
    try:
        yield s, control
    finally:
        s.kill()


def _ctl(control: str, *words: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vnvme", "ctl", "--control", control, *words],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_media_errors_turned_on_and_off_while_a_client_does_io(served: tuple[Server, str]) -> None:
    """The control socket is served in the loop that serves the attached client: a rule added
    mid-run fails the next reads of its range with Unrecovered Read Error and DNR (Linux then
    does not retry), leaves the neighbours alone, and is gone after ``fault clear``."""
    server, control = served
    transport = server.transport()
    driver = NvmeDriver(transport, io_queue_depth=16)
    try:
        driver.probe()
        driver.write(1, 16, _PATTERN)
        driver.write(1, 24, _PATTERN)
        assert (
            request(control, "fault add lba=16-23,media-error=dnr") == "ok rule 1: lba=16-23,media-error=dnr"
        )
        with pytest.raises(NvmeError) as failure:
            driver.read(1, 16, 8)
        assert failure.value.status == Status.UNRECOVERED_READ_ERROR | DNR
        with pytest.raises(NvmeError) as failure:
            driver.write(1, 20, _PATTERN[:512])
        assert failure.value.status == Status.WRITE_FAULT | DNR
        assert driver.read(1, 24, 8) == _PATTERN  # the next 4 KiB is outside the rule
        assert request(control, "fault list") == "ok 1 rule(s): 1: lba=16-23,media-error=dnr (matched 2)"
        assert request(control, "fault clear") == "ok cleared 1 rule(s)"
        assert driver.read(1, 16, 8) == _PATTERN  # the media error touched no data
    finally:
        driver.close()
        transport.close()


def test_a_silent_or_half_sent_control_client_does_not_stall_the_device(served: tuple[Server, str]) -> None:
    server, control = served
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    half = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    transport = server.transport()
    driver = NvmeDriver(transport, io_queue_depth=16)
    try:
        silent.connect(control)
        half.connect(control)
        half.sendall(b"fault add lba=0")  # no newline, ever
        driver.probe()
        driver.write(1, 0, _PATTERN)
        assert driver.read(1, 0, 8) == _PATTERN  # the half request was never applied
        assert request(control, "fault list") == "ok 0 rule(s)"
    finally:
        driver.close()
        transport.close()
        silent.close()
        half.close()


def test_bad_requests_get_one_error_line_and_the_server_goes_on(served: tuple[Server, str]) -> None:
    server, control = served
    for words, needle in [
        (["fault", "add", "lba=9-3,media-error"], "ends before it starts"),
        (["fault", "add", "nsid=2,media-error"], "nsid=2: no such namespace"),
        (["fault", "add"], "needs a SPEC"),
        (["fault", "remove", "1"], "no such rule"),
        (["fault", "clear", "now"], "takes no argument"),
        (["reboot"], "unknown request 'reboot'"),
    ]:
        result = _ctl(control, *words)
        assert result.returncode == 1, (words, result)
        assert result.stdout.startswith("error ") and needle in result.stdout, result.stdout
        assert result.stdout.count("\n") == 1 and not result.stderr
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
        raw.connect(control)
        raw.sendall(b"\xff\xfe\n" + b"x" * MAX_REQUEST)
        reply = raw.makefile("rb").read()  # the server answers both, then hangs up
    assert reply == (
        b"error a request is a line of UTF-8 text\n"
        + f"error a request is at most {MAX_REQUEST} bytes, newline included\n".encode()
    )
    assert _ctl(control, "fault", "list").stdout == "ok 0 rule(s)\n"
    assert server.proc.poll() is None


def test_one_client_too_many_is_told_and_closed(served: tuple[Server, str]) -> None:
    _, control = served
    clients = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(MAX_CLIENTS)]
    try:
        for client in clients:
            client.connect(control)
            client.sendall(b"help\n")
            assert client.recv(4096).startswith(b"ok requests:")  # accepted and answered
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as extra:
            extra.connect(control)
            assert (
                extra.makefile("rb").read()
                == f"error more than {MAX_CLIENTS} control clients at once\n".encode()
            )
        clients.pop().close()
        deadline = time.monotonic() + 10
        refused = f"error more than {MAX_CLIENTS} control clients at once"
        while True:  # the server notices the hang-up on its next look, maybe after our connect
            try:
                reply = request(control, "fault list", timeout=2)
            except OSError:
                reply = refused
            if reply != refused:
                break
            assert time.monotonic() < deadline
        assert reply == "ok 0 rule(s)"
    finally:
        for client in clients:
            client.close()


def test_fault_rules_given_at_start_are_listed_and_cleared(tmp_path: Path) -> None:
    control = str(tmp_path / "control.sock")
    server = Server(
        tmp_path,
        "--quiet",
        "--control",
        control,
        "--namespace",
        "ram,size=8M",
        "--fault",
        "lba=8,media-error",
    )
    try:
        assert request(control, "fault list") == "ok 1 rule(s): 1: lba=8,media-error (matched 0)"
        transport = server.transport()
        driver = NvmeDriver(transport, io_queue_depth=16)
        try:
            driver.probe()
            with pytest.raises(NvmeError):
                driver.read(1, 8, 1)
            assert request(control, "fault remove 1") == "ok removed rule 1"
            driver.read(1, 8, 1)  # no fault any more
        finally:
            driver.close()
            transport.close()
        assert server.stop()[0] == 0
        assert not Path(control).exists()  # removed with the server, as --socket is
    finally:
        server.kill()


def test_control_path_follows_the_socket_rules(tmp_path: Path) -> None:
    """Never a user's file removed or replaced; --control and --socket apart."""
    notes = tmp_path / "notes.txt"
    notes.write_bytes(USER_TEXT)
    sock = str(tmp_path / "vnvme.sock")
    _one_line_error(
        _serve("--socket", sock, "--control", str(notes)), str(notes), "regular file", "--control"
    )
    assert notes.read_bytes() == USER_TEXT
    assert not Path(sock).exists()
    _one_line_error(_serve("--socket", sock, "--control", sock), "must differ")
    assert not Path(sock).exists()


def test_ctl_says_so_when_nobody_listens(tmp_path: Path) -> None:
    result = _ctl(str(tmp_path / "nobody.sock"), "fault", "list")
    assert result.returncode == 2
    assert result.stderr.startswith("vnvme ctl: ") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("kind", ["directory", "file"])
def test_ctl_names_a_path_that_is_no_socket(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "control"
    if kind == "directory":
        path.mkdir()
    else:
        path.write_text("mine")
    result = _ctl(str(path), "fault", "list")
    assert result.returncode == 2
    assert result.stderr == f"vnvme ctl: {path}: not a socket (vnvme serve --control PATH makes one)\n"
    assert kind == "directory" or path.read_text() == "mine"


def test_control_server_in_process_rule_ids_and_hooks(tmp_path: Path) -> None:
    """Requests straight to a ControlServer: ids count up across removals, and each namespace
    gets the rules naming it (or none) in the order added."""
    r = make_rig(trace=())
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(tmp_path / "c.sock"))
        listener.listen(1)
        ctl = ControlServer(listener, r.controller)
        try:
            assert ctl.request(b"fault add lba=0,media-error") == "ok rule 1: lba=0,media-error"
            assert ctl.request(b"  fault   remove 1  ") == "ok removed rule 1"
            assert ctl.request(b"fault add nsid=1,op=read,status=0x4002") == (
                "ok rule 2: nsid=1,op=read,status=0x4002"
            )
            assert r.controller.namespaces[1].fault_hook is not None
            with pytest.raises(NvmeError) as failure:
                r.driver.read(1, 0, 1)
            assert failure.value.status == 0x4002
            assert ctl.request(b"fault clear") == "ok cleared 1 rule(s)"
            assert r.controller.namespaces[1].fault_hook is None
            r.driver.read(1, 0, 1)
        finally:
            ctl.close()


def test_control_socket_from_the_config_file(tmp_path: Path) -> None:
    control = tmp_path / "from-toml.sock"
    config = tmp_path / "serve.toml"
    config.write_text(f'control = "{control}"\nnamespace = ["ram,size=8M"]\nfault = ["lba=3,media-error"]\n')
    server = Server(tmp_path, "--quiet", "--config", str(config))
    try:
        assert request(str(control), "fault list") == "ok 1 rule(s): 1: lba=3,media-error (matched 0)"
    finally:
        server.kill()
