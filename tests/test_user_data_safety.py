"""A user's files are never removed, written or resized unless they asked for exactly that.

Every check reads the file's bytes and size back after the command: the users of this project
run it as root, so permission bits do not protect them.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from host import make_rig
from test_serve import Server
from vnvme.controller.namespace import FileBackend, Namespace, parse_namespace_spec
from vnvme.driver import NvmeDriver
from vnvme.driver.driver import NvmeError
from vnvme.spec.commands import FeatureId, NvmOpcode
from vnvme.spec.status import DNR, Status

MIB = 1 << 20
USER_TEXT = b"my notes, 48 bytes long, which nobody may lose\n"


def _serve(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    """``vnvme serve`` expected to refuse its start: it must exit by itself."""
    return subprocess.run(
        [sys.executable, "-m", "vnvme", "serve", "--quiet", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def _one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("vnvme serve: "), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# Section: --socket PATH


def test_serve_refuses_a_regular_file_at_the_socket_path(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_bytes(USER_TEXT)
    result = _serve("--socket", str(notes))
    _one_line_error(result, str(notes), "regular file")
    assert notes.read_bytes() == USER_TEXT


def test_serve_refuses_a_directory_symlink_and_fifo_at_the_socket_path(tmp_path: Path) -> None:
    directory = tmp_path / "dir"
    directory.mkdir()
    (directory / "inside").write_bytes(USER_TEXT)
    target = tmp_path / "target.txt"
    target.write_bytes(USER_TEXT)
    link = tmp_path / "link"
    link.symlink_to(target)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path, kind in [(directory, "directory"), (link, "symbolic link"), (fifo, "FIFO")]:
        _one_line_error(_serve("--socket", str(path)), str(path), kind)
    assert (directory / "inside").read_bytes() == USER_TEXT
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_bytes() == USER_TEXT
    assert fifo.is_fifo()


def test_serve_refuses_a_dangling_symlink_even_to_a_stale_socket(tmp_path: Path) -> None:
    stale = tmp_path / "stale.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(stale))
    sock.close()  # nothing accepts on it any more
    link = tmp_path / "link.sock"
    link.symlink_to(stale)
    _one_line_error(_serve("--socket", str(link)), str(link), "symbolic link")
    assert link.is_symlink() and stale.is_socket()


def test_serve_replaces_a_stale_socket_and_removes_only_its_own(tmp_path: Path) -> None:
    path = tmp_path / "vnvme.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.close()  # a server that is gone left its socket behind
    proc = subprocess.Popen(
        [sys.executable, "-m", "vnvme", "serve", "--quiet", "--socket", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while True:  # the stale socket refuses; the new server's accepts
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(path))
                break
            except OSError:
                assert proc.poll() is None, "the server exited"
                assert time.monotonic() < deadline, "the server never accepted"
                time.sleep(0.02)
            finally:
                probe.close()
        # Someone replaces the socket while the server runs: the server must not remove it.
        path.unlink()
        path.write_bytes(USER_TEXT)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert path.read_bytes() == USER_TEXT


def test_serve_refuses_to_start_beside_a_live_server(tmp_path: Path) -> None:
    server = Server(tmp_path)
    try:
        result = _serve("--socket", server.socket)
        _one_line_error(result, server.socket, "another server is listening")
        assert server.proc.poll() is None
        assert Path(server.socket).is_socket()
    finally:
        server.kill()


def test_serve_says_why_a_socket_path_is_too_long(tmp_path: Path) -> None:
    """Unix socket paths hold at most 107 bytes (a deep --work-dir of vnvme vm compare's reaches
    that); the error once ended in ': None'."""
    deep = tmp_path / ("d" * 60)
    deep.mkdir()
    path = deep / "vnvme.sock"
    _one_line_error(_serve("--socket", str(path)), str(path), "path too long")


def test_serve_names_a_socket_path_in_a_missing_directory(tmp_path: Path) -> None:
    path = tmp_path / "missing" / "vnvme.sock"
    _one_line_error(_serve("--socket", str(path)), str(path), "does not exist")
    assert not path.parent.exists()


# Section: read-only files and the readonly option


@pytest.fixture
def read_only_image(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(range(256)) * (MIB // 256))
    path.chmod(0o444)
    try:
        yield path
    finally:
        path.chmod(0o644)


def test_a_file_whose_mode_allows_no_write_is_refused_unless_readonly(read_only_image: Path) -> None:
    before = read_only_image.read_bytes()
    with pytest.raises(ValueError, match="readonly"):
        parse_namespace_spec(f"file={read_only_image}", 1)
    result = _serve(
        "--socket", str(read_only_image.parent / "s.sock"), "--namespace", f"file={read_only_image}"
    )
    _one_line_error(result, str(read_only_image), "mode 0444", ",readonly")
    assert read_only_image.read_bytes() == before


def test_readonly_namespace_is_write_protected(read_only_image: Path) -> None:
    before = read_only_image.read_bytes()
    ns = parse_namespace_spec(f"file={read_only_image},readonly", 1)
    assert isinstance(ns.backend, FileBackend) and ns.write_protected
    rig = make_rig(namespaces=[ns])
    try:
        driver: NvmeDriver = rig.driver
        info = driver.identify_namespace(1)
        assert info.write_protected  # NSATTR bit 0
        assert driver.read(1, 0, 8) == before[:4096]
        driver.flush(1)
        qp = driver.queue(1)
        # DSM without Deallocate: integral hints only, allowed.
        sqe = driver.io_sqe(qp, NvmOpcode.DATASET_MANAGEMENT, 1)._replace(cdw10=0, cdw11=0)
        assert driver.io_command(qp, sqe, check=False).status == 0
        expected = Status.NAMESPACE_WRITE_PROTECTED | DNR
        attempts: list[Callable[[], None]] = [
            lambda: driver.write(1, 0, b"\xff" * 4096),
            lambda: driver.write(1, 8, b"\xff" * 512, fua=True),
            lambda: driver.write_zeroes(1, 0, 8),
            lambda: driver.write_zeroes(1, 0, 8, deallocate=True),
            lambda: driver.deallocate(1, [(0, 8)]),
        ]
        for attempt in attempts:
            with pytest.raises(NvmeError) as failure:
                attempt()
            assert failure.value.status & 0x47FF == expected
        # Write protection here is the backing file's, not a Set Features setting: the
        # Namespace Write Protection Config feature (84h) is not offered (NWPC = 0).
        assert driver.identify_controller()["nwpc"] == 0
        with pytest.raises(NvmeError) as failure:
            driver.get_features(FeatureId.NAMESPACE_WRITE_PROTECTION_CONFIG, nsid=1)
        assert failure.value.status & 0x7FF == Status.INVALID_FIELD
    finally:
        rig.close()
    assert read_only_image.read_bytes() == before


def test_a_writable_namespace_is_not_write_protected(tmp_path: Path) -> None:
    ns = parse_namespace_spec(f"file={tmp_path / 'disk.img'},size=1M", 1)
    rig = make_rig(namespaces=[ns])
    try:
        assert not rig.driver.identify_namespace(1).write_protected
        rig.driver.write(1, 0, b"\x11" * 512)
    finally:
        rig.close()


def test_readonly_over_vnvme_serve_leaves_the_file_as_it_was(read_only_image: Path) -> None:
    before = read_only_image.read_bytes()
    server = Server(read_only_image.parent, "--namespace", f"file={read_only_image},readonly")
    try:
        transport = server.transport()
        driver = NvmeDriver(transport, io_queue_depth=16)
        driver.probe()
        assert driver.namespaces[1].write_protected
        with pytest.raises(NvmeError) as failure:
            driver.write(1, 0, b"\x00" * 4096)
        assert failure.value.status & 0x7FF == Status.NAMESPACE_WRITE_PROTECTED
        driver.close()
        transport.close()
        code, out, err = server.stop()
        assert code == 0, err
    finally:
        server.kill()
    assert read_only_image.read_bytes() == before


@pytest.mark.parametrize("kind", ["null", "ram"])
def test_readonly_applies_to_every_backend(kind: str) -> None:
    ns = parse_namespace_spec(f"{kind},size=1M,readonly", 1)
    try:
        assert ns.write_protected and ns.backend.describe().endswith("read-only")
    finally:
        ns.backend.close()


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("file={path},readonly,grow", "contradict"),
        ("ram,size=1M,grow", "file namespaces only"),
        ("file={path},readonly=maybe", "yes or no"),
        ("file={missing},readonly", "does not exist"),
    ],
)
def test_readonly_and_grow_misuse(tmp_path: Path, spec: str, message: str) -> None:
    path = tmp_path / "disk.img"
    path.write_bytes(USER_TEXT * 100)
    missing = tmp_path / "missing.img"
    with pytest.raises(ValueError, match=message):
        parse_namespace_spec(spec.format(path=path, missing=missing), 1)
    assert path.read_bytes() == USER_TEXT * 100
    assert not missing.exists()


# Section: sizes and files created


def test_a_size_beyond_an_existing_file_is_refused_unless_grow(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    path.write_bytes(b"\x5a" * MIB)
    with pytest.raises(ValueError, match=r"grow"):
        parse_namespace_spec(f"file={path},size=4M", 1)
    result = _serve("--socket", str(tmp_path / "s.sock"), "--namespace", f"file={path},size=4M")
    _one_line_error(result, str(path), ",grow")
    assert path.stat().st_size == MIB and path.read_bytes() == b"\x5a" * MIB
    ns = parse_namespace_spec(f"file={path},size=4M,grow", 1)
    ns.backend.close()
    assert path.stat().st_size == 4 * MIB


def test_an_empty_existing_file_is_not_grown_without_grow(tmp_path: Path) -> None:
    path = tmp_path / "empty.img"
    path.touch()
    with pytest.raises(ValueError, match="grow"):
        parse_namespace_spec(f"file={path},size=1M", 1)
    assert path.stat().st_size == 0


def test_a_missing_file_without_a_size_is_not_created(tmp_path: Path) -> None:
    path = tmp_path / "new.img"
    result = _serve("--socket", str(tmp_path / "s.sock"), "--namespace", f"file={path}")
    _one_line_error(result, str(path), "give a size")
    assert not path.exists()


def test_a_failed_start_removes_the_file_it_created(tmp_path: Path) -> None:
    new = tmp_path / "new.img"
    # The second namespace is bad: the first one's new file must go again.
    result = _serve(
        "--socket",
        str(tmp_path / "s.sock"),
        "--namespace",
        f"file={new},size=1M",
        "--namespace",
        "ram,size=x",
    )
    _one_line_error(result, "not a size")
    assert not new.exists()
    # The socket is refused after the namespaces exist: the same.
    notes = tmp_path / "notes.txt"
    notes.write_bytes(USER_TEXT)
    result = _serve("--socket", str(notes), "--namespace", f"file={new},size=1M")
    _one_line_error(result, "regular file")
    assert not new.exists() and notes.read_bytes() == USER_TEXT
    # A file that existed before is never removed by a failed start.
    existing = tmp_path / "existing.img"
    existing.write_bytes(b"\x01" * MIB)
    result = _serve("--socket", str(notes), "--namespace", f"file={existing}")
    _one_line_error(result, "regular file")
    assert existing.read_bytes() == b"\x01" * MIB


def test_a_created_file_is_kept_once_the_server_started(tmp_path: Path) -> None:
    new = tmp_path / "new.img"
    server = Server(tmp_path, "--namespace", f"file={new},size=1M")
    code, _, err = server.stop()
    assert code == 0, err
    assert new.stat().st_size == MIB


def test_a_size_smaller_than_the_file_is_stated_in_the_banner(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    path.write_bytes(b"\x00" * (4 * MIB))
    server = Server(tmp_path, "--namespace", f"file={path},size=1M")
    code, out, err = server.stop()
    assert code == 0, err
    banner = out.splitlines()[0]
    assert f"the first {MIB} of its {4 * MIB} bytes" in banner, banner
    assert path.stat().st_size == 4 * MIB


def test_namespace_object_reports_write_protection_from_its_backend(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    path.write_bytes(b"\x00" * MIB)
    backend = FileBackend(path, read_only=True)
    try:
        assert Namespace(1, backend).write_protected
        with pytest.raises(OSError):
            os.write(backend.fd, b"x")  # opened read-only: the kernel refuses writes too
    finally:
        backend.close()
