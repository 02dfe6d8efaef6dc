"""Namespace specs and storage backends: null, ram, file; durability and errors as NVMe statuses."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from host import Rig, make_rig
from vnvme.controller.namespace import (
    Backend,
    FileBackend,
    Namespace,
    NullBackend,
    RamBackend,
    make_backend,
    parse_namespace_spec,
    parse_size,
)
from vnvme.driver import NvmeError
from vnvme.spec.commands import NSID_BROADCAST, FeatureId, NvmOpcode
from vnvme.spec.status import DNR, Status

MIB = 1 << 20
_FUA = 1 << 30
_DEAC = 1 << 25


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# Section: spec parsing


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("0", 0),
        ("4096", 4096),
        ("64k", 64 << 10),
        ("64K", 64 << 10),
        ("16M", 16 << 20),
        ("1g", 1 << 30),
        ("2T", 2 << 40),
        ("1GiB", 1 << 30),
        ("8kb", 8 << 10),
        ("512B", 512),
        (" 12 M ", 12 << 20),
    ],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "k", "1.5G", "-1", "1P", "0x1000", "1 G B", "10 MiBs", "one"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="not a size"):
        parse_size(text)


def test_parse_namespace_spec_null_and_ram() -> None:
    ns = parse_namespace_spec("null", 1)
    assert (ns.nsid, ns.lba_size, ns.nlba, ns.backend.kind) == (1, 512, (1 << 30) // 512, "null")
    ns = parse_namespace_spec("null,size=16G,lba=4096", 2)
    assert (ns.lba_size, ns.nlba, ns.size_bytes) == (4096, 4 << 20, 16 << 30)
    ns = parse_namespace_spec(" RAM , Size=1M , LBA=4k ", 7)
    assert isinstance(ns.backend, RamBackend)
    assert (ns.nsid, ns.lba_size, ns.nlba, ns.lba_shift) == (7, 4096, 256, 12)
    ns.backend.close()
    ns = parse_namespace_spec("ram", 3)
    assert ns.backend.size == 64 << 20
    ns.backend.close()


def test_parse_namespace_spec_file(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    ns = parse_namespace_spec(f"file={path},size=2M", 1)
    assert isinstance(ns.backend, FileBackend)
    assert (ns.nlba, path.stat().st_size) == (4096, 2 * MIB)
    ns.backend.close()
    # An existing file gives its own size.
    ns = parse_namespace_spec(f"file={path},lba=4096", 2)
    assert (ns.lba_size, ns.nlba) == (4096, 512)
    ns.backend.close()
    assert make_backend("file", path=str(path)).describe() == f"file {path} {2 * MIB} bytes"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        (" , ", "empty"),
        ("tape", "unknown backend"),
        ("file", "needs a path"),
        ("ram,size", "needs a value"),
        ("ram,foo=1", "unknown namespace option"),
        ("ram,size=1M,lba=1024", "512 or 4096"),
        ("ram,size=1M,lba=2k", "512 or 4096"),
        ("ram,size=100", "smaller than one LBA"),
        ("ram,size=0", "positive"),
        ("null,size=lots", "not a size"),
    ],
)
def test_parse_namespace_spec_rejects(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_namespace_spec(text, 1)


def test_bad_file_spec_leaves_no_descriptor_and_no_file(tmp_path: Path) -> None:
    before = _open_fds()
    path = tmp_path / "bad.img"
    with pytest.raises(ValueError, match="512 or 4096"):
        parse_namespace_spec(f"file={path},size=1M,lba=1000", 1)
    assert not path.exists()  # the LBA size is checked before the file is created
    with pytest.raises(ValueError, match="smaller than one LBA"):
        parse_namespace_spec(f"file={path},size=100", 1)
    with pytest.raises(ValueError, match="invalid NSID"):
        parse_namespace_spec(f"file={path},size=1M", 0)
    empty = tmp_path / "empty.img"
    empty.touch()
    with pytest.raises(ValueError, match="give a size"):
        parse_namespace_spec(f"file={empty}", 1)
    assert _open_fds() == before


# Section: backends directly


def test_null_backend() -> None:
    backend = NullBackend(1 << 30)
    for length in (512, 3 * MIB + 512):  # the second crosses the 1 MiB zero chunk
        dest = bytearray(b"\xff" * length)
        backend.read_into(4096, memoryview(dest))
        assert dest == bytes(length)
    backend.write(0, memoryview(b"\x01" * 512), sync=True)
    backend.write_zeroes(0, 10 * MIB, sync=False)
    backend.deallocate(0, 512)
    backend.flush()
    dest = bytearray(512)
    backend.read_into(0, memoryview(dest))
    assert dest == bytes(512)
    assert not backend.volatile_cache
    assert backend.describe() == f"null {1 << 30} bytes"
    with pytest.raises(ValueError, match="positive"):
        NullBackend(0)


def _roundtrip(backend: Backend) -> None:
    """Shared checks for the backends that store data."""
    data = os.urandom(3 * MIB)
    backend.write(4096, memoryview(data), sync=False)
    out = bytearray(len(data))
    backend.read_into(4096, memoryview(out))
    assert out == data
    # Write Zeroes across the 1 MiB chunk boundary, from an unaligned start.
    backend.write_zeroes(4096 + 100, 2 * MIB + 7, sync=False)
    backend.read_into(4096, memoryview(out))
    assert out == data[:100] + bytes(2 * MIB + 7) + data[100 + 2 * MIB + 7 :]
    backend.write(8192, memoryview(b"\x77" * 4096), sync=True)
    backend.deallocate(8192, 2048)
    small = bytearray(4096)
    backend.read_into(8192, memoryview(small))
    assert small == bytes(2048) + b"\x77" * 2048
    backend.flush()


def test_ram_backend() -> None:
    backend = RamBackend(8 * MIB)
    try:
        assert not backend.volatile_cache
        _roundtrip(backend)
        last = bytearray(512)
        backend.write(8 * MIB - 512, memoryview(b"\x42" * 512), sync=False)
        backend.read_into(8 * MIB - 512, memoryview(last))
        assert last == b"\x42" * 512
    finally:
        backend.close()


def test_file_backend(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    backend = FileBackend(path, 8 * MIB)
    try:
        assert backend.volatile_cache
        assert path.stat().st_size == 8 * MIB
        _roundtrip(backend)
        with path.open("rb") as f:  # on the file itself, at the same offsets
            f.seek(8192)
            assert f.read(4096) == bytes(2048) + b"\x77" * 2048
    finally:
        backend.close()
    backend.close()  # closing twice is harmless
    assert backend.fd == -1


def test_file_backend_reads_zeroes_past_the_end_of_a_short_file(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    backend = FileBackend(path, 1 * MIB)
    try:
        backend.write(0, memoryview(b"\xab" * 8192), sync=False)
        os.truncate(path, 4096)  # someone shrank the file behind our back
        out = bytearray(b"\xff" * 16384)
        backend.read_into(0, memoryview(out))
        assert out == b"\xab" * 4096 + bytes(12288)
    finally:
        backend.close()


def test_file_backend_grows_a_smaller_file_when_asked_and_keeps_its_data(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    path.write_bytes(b"\x5c" * 4096)
    backend = FileBackend(path, 1 * MIB, grow=True)
    try:
        assert path.stat().st_size == 1 * MIB and backend.size == 1 * MIB
        out = bytearray(8192)
        backend.read_into(0, memoryview(out))
        assert out == b"\x5c" * 4096 + bytes(4096)
    finally:
        backend.close()


# Section: file namespaces through the driver


def _file_rig(*paths: Path, size: int | None = 4 * MIB, lba: int = 512, **options: object) -> Rig:
    namespaces = [Namespace(i + 1, FileBackend(p, size), lba) for i, p in enumerate(paths)]
    return make_rig(namespaces=namespaces, trace=(), **options)  # type: ignore[arg-type]


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    return tmp_path / "disk.img"


@pytest.fixture
def file_rig(disk: Path) -> Iterator[Rig]:
    r = _file_rig(disk)
    try:
        yield r
    finally:
        r.close()


@pytest.mark.parametrize("lba", [512, 4096])
def test_file_data_persists_across_close_and_reopen(disk: Path, lba: int) -> None:
    data = os.urandom(64 * lba)
    r = _file_rig(disk, lba=lba)
    try:
        r.driver.write(1, 10, data)
        r.driver.write_zeroes(1, 20, 4)
    finally:
        r.close()
    assert r.controller.namespaces[1].backend.fd == -1  # type: ignore[attr-defined]
    with disk.open("rb") as f:
        f.seek(10 * lba)
        on_disk = f.read(64 * lba)
    expected = data[: 10 * lba] + bytes(4 * lba) + data[14 * lba :]
    assert on_disk == expected
    # A new controller on the same file (size taken from the file) sees the same blocks.
    r = _file_rig(disk, size=None, lba=lba)
    try:
        assert r.driver.namespaces[1].nlba == 4 * MIB // lba
        assert r.driver.read(1, 10, 64) == expected
    finally:
        r.close()


class SyscallLog:
    """Counts the syscalls the file backend makes for durability, and can make them fail."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.fdatasync: list[int] = []
        self.fsync: list[int] = []
        self.pwritev_flags: list[int] = []
        self.preadv_calls = 0
        self.fail: dict[str, int] = {}  # syscall name -> errno to raise
        real_fdatasync, real_fsync = os.fdatasync, os.fsync
        real_pwritev, real_preadv = os.pwritev, os.preadv

        def fdatasync(fd: int) -> None:
            self._maybe_fail("fdatasync")
            self.fdatasync.append(fd)
            real_fdatasync(fd)

        def fsync(fd: int) -> None:
            self._maybe_fail("fsync")
            self.fsync.append(fd)
            real_fsync(fd)

        def pwritev(fd: int, buffers: list[memoryview], offset: int, flags: int = 0) -> int:
            self._maybe_fail("pwritev")
            self.pwritev_flags.append(flags)
            return real_pwritev(fd, buffers, offset, flags)

        def preadv(fd: int, buffers: list[memoryview], offset: int, flags: int = 0) -> int:
            self._maybe_fail("preadv")
            self.preadv_calls += 1
            return real_preadv(fd, buffers, offset, flags)

        monkeypatch.setattr(os, "fdatasync", fdatasync)
        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "pwritev", pwritev)
        monkeypatch.setattr(os, "preadv", preadv)

    def _maybe_fail(self, name: str) -> None:
        code = self.fail.get(name)
        if code is not None:
            raise OSError(code, os.strerror(code))

    @property
    def syncs(self) -> int:
        return len(self.fdatasync) + len(self.fsync)

    def reset(self) -> None:
        self.fdatasync.clear()
        self.fsync.clear()
        self.pwritev_flags.clear()
        self.preadv_calls = 0


@pytest.fixture
def syscalls(monkeypatch: pytest.MonkeyPatch) -> SyscallLog:
    return SyscallLog(monkeypatch)


def test_flush_calls_fdatasync(file_rig: Rig, syscalls: SyscallLog) -> None:
    fd = file_rig.controller.namespaces[1].backend.fd  # type: ignore[attr-defined]
    file_rig.driver.write(1, 0, b"\x01" * 4096)
    assert syscalls.syncs == 0  # the write cache is on: no sync for a plain write
    assert syscalls.pwritev_flags == [0]
    file_rig.driver.flush(1)
    assert syscalls.fdatasync == [fd]


def test_broadcast_flush_syncs_every_file(tmp_path: Path, syscalls: SyscallLog) -> None:
    r = _file_rig(tmp_path / "a.img", tmp_path / "b.img")
    try:
        fds = sorted(ns.backend.fd for ns in r.controller.namespaces.values())  # type: ignore[attr-defined]
        syscalls.reset()
        qp = r.driver.queue(1)
        cqe = r.driver.io_command(qp, r.driver.io_sqe(qp, NvmOpcode.FLUSH, NSID_BROADCAST), check=False)
        assert cqe.status == Status.SUCCESS
        assert sorted(syscalls.fdatasync) == fds
    finally:
        r.close()


def test_shutdown_makes_data_durable(file_rig: Rig, syscalls: SyscallLog) -> None:
    file_rig.driver.write(1, 0, b"\x02" * 512)
    syscalls.reset()
    file_rig.driver.shutdown()
    assert syscalls.syncs == 1


def test_ram_flush_makes_no_syscall(rig: Rig, syscalls: SyscallLog) -> None:
    rig.driver.write(1, 0, b"\x01" * 512)
    rig.driver.flush(1)
    rig.driver.flush(2)
    assert syscalls.syncs == 0 and syscalls.pwritev_flags == []


def test_fua_writes_reach_stable_storage(file_rig: Rig, syscalls: SyscallLog) -> None:
    file_rig.driver.write(1, 0, b"\x03" * 4096, fua=True)
    assert syscalls.pwritev_flags == [os.RWF_DSYNC]
    assert file_rig.driver.read(1, 0, 8) == b"\x03" * 4096
    syscalls.reset()
    qp = file_rig.driver.queue(1)
    for cdw12 in (_FUA, 0):  # Write Zeroes: with FUA every write syncs; without, none
        sqe = file_rig.driver.io_sqe(qp, NvmOpcode.WRITE_ZEROES, 1, 0, 4096, cdw12_flags=cdw12)
        assert file_rig.driver.io_command(qp, sqe).status == Status.SUCCESS
        assert syscalls.pwritev_flags and set(syscalls.pwritev_flags) == {os.RWF_DSYNC if cdw12 else 0}
        syscalls.reset()
    assert syscalls.syncs == 0


def test_write_zeroes_deallocate_with_fua_is_durable(file_rig: Rig, syscalls: SyscallLog) -> None:
    """DEAC + FUA: the zeroes deallocated blocks read back must be on stable storage too."""
    file_rig.driver.write(1, 0, b"\x04" * 4096)
    syscalls.reset()
    qp = file_rig.driver.queue(1)
    sqe = file_rig.driver.io_sqe(qp, NvmOpcode.WRITE_ZEROES, 1, 0, 8, cdw12_flags=_FUA | _DEAC)
    assert file_rig.driver.io_command(qp, sqe).status == Status.SUCCESS
    durable = syscalls.syncs + syscalls.pwritev_flags.count(os.RWF_DSYNC)
    assert durable >= 1
    assert file_rig.driver.read(1, 0, 8) == bytes(4096)
    # Without FUA (write cache on) nothing is forced.
    syscalls.reset()
    file_rig.driver.write_zeroes(1, 8, 8, deallocate=True)
    assert syscalls.syncs == 0 and os.RWF_DSYNC not in syscalls.pwritev_flags


# Section: the volatile write cache


@pytest.mark.parametrize(
    "kind",
    [
        "file",
        "ram",
        "null",
    ],
)
def test_identify_vwc_matches_the_backends(tmp_path: Path, kind: str) -> None:
    backend = make_backend(kind, size=1 * MIB, path=str(tmp_path / "disk.img"))
    r = make_rig(namespaces=[Namespace(1, backend, 512)], trace=())
    try:
        present = bool(r.driver.controller_info["vwc"] & 1)
        assert present == backend.volatile_cache
    finally:
        r.close()


def test_write_cache_feature_controls_syncing_on_a_file(file_rig: Rig, syscalls: SyscallLog) -> None:
    driver = file_rig.driver
    assert driver.controller_info["vwc"] & 1
    assert driver.get_features(FeatureId.VOLATILE_WRITE_CACHE) == 1  # enabled by default
    driver.write(1, 0, b"\x05" * 512)
    assert syscalls.pwritev_flags == [0] and syscalls.syncs == 0
    # Turning the cache off makes what it held durable, once.
    syscalls.reset()
    driver.set_features(FeatureId.VOLATILE_WRITE_CACHE, 0)
    assert syscalls.fdatasync == [file_rig.controller.namespaces[1].backend.fd]  # type: ignore[attr-defined]
    assert driver.get_features(FeatureId.VOLATILE_WRITE_CACHE) == 0
    # From now on every write is synchronous, FUA or not; so are Write Zeroes and deallocation.
    syscalls.reset()
    driver.write(1, 0, b"\x06" * 512)
    driver.write_zeroes(1, 1, 1)
    assert syscalls.pwritev_flags == [os.RWF_DSYNC, os.RWF_DSYNC]
    syscalls.reset()
    driver.write_zeroes(1, 2, 1, deallocate=True)
    driver.deallocate(1, [(3, 1)])
    assert syscalls.syncs + syscalls.pwritev_flags.count(os.RWF_DSYNC) >= 2
    # And back on: no more syncing, no flush needed for the 0 -> 1 transition.
    syscalls.reset()
    driver.set_features(FeatureId.VOLATILE_WRITE_CACHE, 1)
    driver.write(1, 0, b"\x07" * 512)
    assert syscalls.pwritev_flags == [0] and syscalls.syncs == 0
    assert driver.read(1, 0, 1) == b"\x07" * 512


# Section: backend errors become statuses


def _raw_status(rig: Rig, opcode: int, slba: int = 0, nlb: int = 1, cdw12_flags: int = 0) -> int:
    qp = rig.driver.queue(1)
    buf = rig.host_memory.alloc(nlb * 512)
    try:
        sqe = rig.driver.io_sqe(qp, opcode, 1, slba, nlb, buf, length=nlb * 512, cdw12_flags=cdw12_flags)
        return rig.driver.io_command(qp, sqe, check=False).status
    finally:
        rig.host_memory.free(buf)


def _dsm_status(rig: Rig) -> int:
    try:
        rig.driver.deallocate(1, [(0, 8)])
    except NvmeError as exc:
        return exc.status
    return Status.SUCCESS


_Op = Callable[[Rig], int]
_OPS: dict[str, _Op] = {
    "read": lambda r: _raw_status(r, NvmOpcode.READ, nlb=8),
    "compare": lambda r: _raw_status(r, NvmOpcode.COMPARE, nlb=8),
    "write": lambda r: _raw_status(r, NvmOpcode.WRITE, nlb=8),
    "write_fua": lambda r: _raw_status(r, NvmOpcode.WRITE, nlb=8, cdw12_flags=_FUA),
    "write_zeroes": lambda r: _raw_status(r, NvmOpcode.WRITE_ZEROES, nlb=8),
    "flush": lambda r: _raw_status(r, NvmOpcode.FLUSH),
    "dsm": _dsm_status,
}


@pytest.mark.parametrize(
    ("op", "syscall", "code", "status"),
    [
        ("read", "preadv", errno.EIO, Status.UNRECOVERED_READ_ERROR),
        ("compare", "preadv", errno.EIO, Status.UNRECOVERED_READ_ERROR),
        ("write", "pwritev", errno.EIO, Status.WRITE_FAULT),
        ("write", "pwritev", errno.ENOSPC, Status.CAPACITY_EXCEEDED | DNR),
        ("write", "pwritev", errno.EROFS, Status.WRITE_FAULT),
        ("write_fua", "pwritev", errno.EIO, Status.WRITE_FAULT),
        ("write_zeroes", "pwritev", errno.ENOSPC, Status.CAPACITY_EXCEEDED | DNR),
        ("write_zeroes", "pwritev", errno.EIO, Status.WRITE_FAULT),
        ("dsm", "pwritev", errno.EIO, Status.WRITE_FAULT),
        ("flush", "fdatasync", errno.EIO, Status.WRITE_FAULT),
        ("flush", "fdatasync", errno.ENOSPC, Status.CAPACITY_EXCEEDED | DNR),
    ],
)
def test_os_errors_become_nvme_statuses(
    file_rig: Rig, syscalls: SyscallLog, op: str, syscall: str, code: int, status: int
) -> None:
    file_rig.driver.write(1, 0, bytes(4096))  # what Compare compares with (a zeroed buffer)
    media_errors = file_rig.controller.smart.media_errors
    errors = file_rig.controller.statistics().error_completions
    syscalls.fail[syscall] = code
    assert _OPS[op](file_rig) == status
    # A full backing store is not a media (data integrity) error: SMART does not count it.
    counted = 0 if code == errno.ENOSPC else 1
    assert file_rig.controller.smart.media_errors == media_errors + counted
    assert file_rig.controller.statistics().error_completions == errors + 1
    # The controller is fine; once the disk is, so is I/O.
    assert not file_rig.controller.fatal and not file_rig.transport.fatal_reasons
    del syscalls.fail[syscall]
    assert _OPS[op](file_rig) == Status.SUCCESS
    file_rig.driver.write(1, 0, b"\x09" * 512)
    assert file_rig.driver.read(1, 0, 1) == b"\x09" * 512


@pytest.mark.parametrize(("method", "opcode"), [("read_into", NvmOpcode.READ), ("write", NvmOpcode.WRITE)])
def test_unexpected_backend_exception_is_internal_error(
    disk: Path, caplog: pytest.LogCaptureFixture, method: str, opcode: int
) -> None:
    """A backend bug fails the command with Internal Error; the controller keeps serving, and
    the logged traceback does not keep the host's memory exported (it can still be unmapped)."""
    r = _file_rig(disk)
    backend = r.controller.namespaces[1].backend

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("backend bug")

    with pytest.MonkeyPatch.context() as m:
        m.setattr(backend, method, broken)
        assert _raw_status(r, opcode) == Status.INTERNAL_ERROR
    assert any(record.exc_info for record in caplog.records)  # the traceback is still alive
    assert not r.controller.fatal and not r.transport.fatal_reasons
    assert _raw_status(r, opcode) == Status.SUCCESS
    r.close()  # HostMemory.close raises BufferError if a view into it is still exported


def test_error_on_one_namespace_leaves_the_others_working(tmp_path: Path) -> None:
    r = _file_rig(tmp_path / "a.img", tmp_path / "b.img")
    try:
        bad_fd = r.controller.namespaces[1].backend.fd  # type: ignore[attr-defined]
        real = os.pwritev

        def pwritev(fd: int, buffers: list[memoryview], offset: int, flags: int = 0) -> int:
            if fd == bad_fd:
                raise OSError(errno.EIO, "injected")
            return real(fd, buffers, offset, flags)

        with pytest.MonkeyPatch.context() as m:
            m.setattr(os, "pwritev", pwritev)
            assert _raw_status(r, NvmOpcode.WRITE) == Status.WRITE_FAULT
            r.driver.write(2, 0, b"\x0a" * 512)
        assert r.driver.read(2, 0, 1) == b"\x0a" * 512
    finally:
        r.close()


def test_controller_close_closes_every_backend_even_if_a_flush_fails(tmp_path: Path) -> None:
    r = _file_rig(tmp_path / "a.img", tmp_path / "b.img")
    first, second = (ns.backend for ns in r.controller.namespaces.values())
    assert isinstance(first, FileBackend) and isinstance(second, FileBackend)

    def failing_flush() -> None:
        raise OSError(errno.EIO, "injected")

    first.flush = failing_flush  # type: ignore[method-assign]
    with contextlib.suppress(OSError):
        r.close()
    try:
        assert first.fd == -1
        assert second.fd == -1
    finally:
        second.close()
