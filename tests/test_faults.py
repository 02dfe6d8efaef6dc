"""Fault injection hooks (vnvme.controller.faults): delay, fail, media error; rules; vnvme serve."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from host import Rig, make_rig
from test_serve import Server
from vnvme.controller.faults import (
    Delay,
    Fail,
    FaultRule,
    IoCommand,
    MediaError,
    RuleHook,
    parse_fault_rule,
    set_fault_hook,
)
from vnvme.controller.namespace import Namespace, RamBackend
from vnvme.driver import NvmeDriver, NvmeError
from vnvme.driver.driver import QueuePair
from vnvme.driver.transport import DmaBuffer
from vnvme.spec.commands import LogPageId, NvmOpcode
from vnvme.spec.log_pages import ERROR_INFORMATION_ENTRY
from vnvme.spec.status import DNR, Status

_PATTERN = bytes(range(256)) * 16  # 4 KiB = 8 LBAs of 512 bytes


def _rig() -> Rig:
    r = make_rig(namespaces=[Namespace(1, RamBackend(1 << 20), 512)], trace=("pci_nvme_fault_injected",))
    r.driver.write(1, 0, _PATTERN)
    return r


def _submit(
    r: Rig, opcode: int, slba: int = 0, nlb: int = 8, fill: int = 0
) -> tuple[QueuePair, int, DmaBuffer]:
    """Submit and ring; the data buffer holds ``fill`` bytes before the command runs."""
    qp = r.driver.queue(1)
    buf = r.host_memory.alloc(4096)
    buf.view[:] = bytes([fill]) * 4096
    length = nlb * 512 if opcode in (NvmOpcode.READ, NvmOpcode.WRITE, NvmOpcode.COMPARE) else 0
    cid = qp.submit(r.driver.io_sqe(qp, opcode, 1, slba, nlb, buf, length=length))
    qp.ring_sq()
    return qp, cid, buf


def _newest_error(r: Rig) -> dict[str, int]:
    raw = r.driver.get_log_page(LogPageId.ERROR_INFORMATION, ERROR_INFORMATION_ENTRY.size)
    entry: dict[str, int] = ERROR_INFORMATION_ENTRY.unpack(raw)
    return entry


def _media_errors(r: Rig) -> int:
    return r.controller.smart.media_errors


def test_hook_sees_the_command_and_none_runs_it_unchanged() -> None:
    seen: list[IoCommand] = []

    def watch(command: IoCommand) -> None:
        seen.append(command)

    r = _rig()
    try:
        set_fault_hook(r.controller, 1, watch)
        assert r.driver.read(1, 16, 8) == bytes(4096)
        r.driver.flush(1)
        assert [(c.opcode, c.nsid, c.slba, c.nlb, c.sqid) for c in seen] == [
            (NvmOpcode.READ, 1, 16, 8, 1),
            (NvmOpcode.FLUSH, 1, 0, 0, 1),
        ]
        assert seen[0].is_read and seen[0].covers(23) and not seen[0].covers(24)
        assert not r.trace.named("pci_nvme_fault_injected")  # None is no fault
        set_fault_hook(r.controller, 1, None)  # removed: the plain command table again
        assert r.controller.io_handlers[NvmOpcode.READ].__name__ == "read"
    finally:
        r.close()


@pytest.mark.parametrize(
    ("opcode", "status"),
    [(NvmOpcode.READ, Status.UNRECOVERED_READ_ERROR), (NvmOpcode.WRITE, Status.WRITE_FAULT)],
)
def test_media_error_is_reported_with_an_error_log_entry_and_corrupts_nothing(
    opcode: int, status: int
) -> None:
    """§5.14.1.1: the Error Information entry names the command, its status and the LBA; SMART
    counts a media error; the data on the namespace stays what it was, for a write too."""
    r = _rig()
    try:
        set_fault_hook(r.controller, 1, lambda c: MediaError(lba=c.slba + 3) if c.covers(2) else None)
        before = _media_errors(r)
        # A write that went through would leave 0xcc on the namespace; a read, in the buffer.
        qp, cid, buf = _submit(r, opcode, slba=0, nlb=8, fill=0xCC)
        cqe = r.driver._wait_cid(qp, cid)
        assert cqe.status == status  # retryable: no DNR
        assert _media_errors(r) == before + 1
        entry = _newest_error(r)
        assert (entry["cid"], entry["sqid"], entry["nsid"], entry["lba"]) == (cid, 1, 1, 3)
        assert entry["status_field"] >> 1 == status
        if opcode == NvmOpcode.READ:
            assert bytes(buf.view) == b"\xcc" * 4096  # no data moved to the host
        set_fault_hook(r.controller, 1, None)
        assert r.driver.read(1, 0, 8) == _PATTERN
        assert r.trace.named("pci_nvme_fault_injected")
        assert not r.controller.fatal and r.controller.statistics().internal_errors == 0
    finally:
        r.close()


def test_fail_completes_with_the_chosen_status_and_does_not_run_the_command() -> None:
    r = _rig()
    try:
        chosen = Status.NAMESPACE_NOT_READY | DNR
        set_fault_hook(r.controller, 1, lambda c: Fail(chosen) if c.opcode == NvmOpcode.WRITE else None)
        errors = r.controller.statistics().error_completions
        with pytest.raises(NvmeError) as failure:
            r.driver.write(1, 0, b"\x77" * 4096)
        assert failure.value.status == chosen
        assert r.controller.statistics().error_completions == errors + 1
        assert _newest_error(r)["status_field"] >> 1 == chosen
        assert r.driver.read(1, 0, 8) == _PATTERN  # reads pass, and the write never happened
        assert _media_errors(r) == 0
    finally:
        r.close()


def test_delay_is_a_deadline_the_core_reports_not_a_sleep() -> None:
    """The command runs when fetched; its completion is held until ``process(now)`` reaches the
    deadline that ``next_deadline()`` reports. Time is only ever passed in."""
    r = _rig()
    ctrl = r.controller
    try:
        set_fault_hook(ctrl, 1, lambda c: Delay(1000.0) if c.is_read else None)
        qp, cid, buf = _submit(r, NvmOpcode.READ, slba=0, nlb=8)
        deadline = ctrl.next_deadline()
        assert deadline is not None and deadline >= time.monotonic() + 990
        assert bytes(buf.view) == _PATTERN  # the data is there: the command ran
        assert qp.reap() == [] and len(ctrl.delayed) == 1
        r.transport._handle(ctrl.process(now=deadline - 1.0))
        assert qp.reap() == []
        r.transport._handle(ctrl.process(now=deadline))
        got = qp.reap()
        assert [(c.cid, c.status) for c in got] == [(cid, 0)]
        assert ctrl.next_deadline() is None and not ctrl.delayed
        assert r.transport.fired.get(1, 0) >= 1  # and its interrupt went out then
    finally:
        r.close()


def test_delay_then_media_error_and_a_reset_drops_held_completions() -> None:
    r = _rig()
    ctrl = r.controller
    try:
        set_fault_hook(ctrl, 1, lambda c: Delay(50.0, MediaError()) if c.is_read else None)
        qp, cid, buf = _submit(r, NvmOpcode.READ, slba=4, nlb=2)
        deadline = ctrl.next_deadline()
        assert deadline is not None
        r.transport._handle(ctrl.process(now=deadline))
        (cqe,) = qp.reap()
        assert (cqe.cid, cqe.status) == (cid, Status.UNRECOVERED_READ_ERROR)
        assert bytes(buf.view) == bytes(4096)  # never ran
        assert _newest_error(r)["lba"] == 4
        # A held completion when the controller resets: gone with its queue, never posted.
        _submit(r, NvmOpcode.READ)
        assert len(ctrl.delayed) == 1
        r.driver.reset_controller()
        assert not ctrl.delayed and ctrl.delayed.dropped == 1 and ctrl.next_deadline() is None
        set_fault_hook(ctrl, 1, None)
        assert r.driver.read(1, 0, 8) == _PATTERN
    finally:
        r.close()


def test_a_hook_that_raises_fails_its_command_with_internal_error() -> None:
    def broken(command: IoCommand) -> None:
        raise RuntimeError("user hook bug")

    r = _rig()
    try:
        set_fault_hook(r.controller, 1, broken)
        with pytest.raises(NvmeError) as failure:
            r.driver.read(1, 0, 1)
        assert failure.value.status == Status.INTERNAL_ERROR
        assert not r.controller.fatal
    finally:
        r.close()


def test_hook_given_at_namespace_creation() -> None:
    ns = Namespace(1, RamBackend(1 << 20), 512, fault_hook=lambda c: Fail(0x4002))
    r = make_rig(namespaces=[ns], trace=())
    try:
        with pytest.raises(NvmeError) as failure:
            r.driver.read(1, 0, 1)
        assert failure.value.status == 0x4002
    finally:
        r.close()


# Section: rules


def test_parse_fault_rule() -> None:
    rule = parse_fault_rule("nsid=1,op=read+write,lba=100-199,after=2,count=1,media-error")
    assert rule == FaultRule(
        MediaError(), nsid=1, opcodes=frozenset({2, 1}), lbas=(100, 199), after=2, count=1
    )
    assert parse_fault_rule("delay=0.5").fault == Delay(0.5)
    assert parse_fault_rule("op=flush,delay=0.01,status=0x4006").fault == Delay(0.01, Fail(0x4006))
    assert parse_fault_rule("lba=7,media-error=dnr") == FaultRule(MediaError(dnr=True), lbas=(7, 7))
    assert parse_fault_rule("op=0x80,status=6").opcodes == frozenset({0x80})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("nsid=1", "needs delay="),
        ("status=0x281,media-error", "not both"),
        ("status=0", "non-zero"),
        ("status=0x8000", "15-bit"),
        ("delay=-1", "seconds >= 0"),
        ("delay=nan", "seconds >= 0"),
        ("delay=soon", "not a number"),
        ("lba=9-3,media-error", "ends before"),
        ("op=erase,media-error", "not a number"),
        ("colour=red,media-error", "unknown"),
        ("nsid=,media-error", "needs a value"),
        ("media-error=always", "only 'dnr'"),
        ("count=1,count=2,media-error", "twice"),
    ],
)
def test_parse_fault_rule_rejects(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_fault_rule(text)


def test_rule_hook_matches_namespace_opcode_lbas_after_and_count() -> None:
    hook = RuleHook([parse_fault_rule("nsid=1,op=read,lba=10-19,after=1,count=2,media-error")])

    def read(slba: int, nlb: int = 1, nsid: int = 1, opcode: int = NvmOpcode.READ) -> bool:
        return hook(IoCommand(opcode, nsid, slba, nlb, 1, 0)) is not None

    assert not read(0, 10)  # ends just before the range
    assert not read(5, 6)  # overlaps: first match, let through (after=1)
    assert read(19)  # second match: faulted
    assert not read(12, nsid=2)  # another namespace
    assert not read(12, opcode=NvmOpcode.WRITE)
    assert read(12)  # third match: faulted (count=2)
    assert not read(12)  # fourth: count used up


# Section: vnvme serve


def test_faults_from_vnvme_serve_cli_and_toml(tmp_path: Path) -> None:
    config = tmp_path / "vnvme.toml"
    config.write_text('namespace = ["ram,size=1M"]\nfault = ["nsid=1,op=read,lba=8,count=1,media-error"]\n')
    s = Server(
        tmp_path,
        "--config",
        str(config),
        "--fault",
        "nsid=1,op=write,lba=100,status=0x4002",
        "--fault",
        "op=flush,delay=0.05",
        "--trace",
        "pci_nvme_fault_injected",
        "--trace-file",
        str(tmp_path / "trace.jsonl"),
    )
    try:
        transport = s.transport()
        try:
            driver = NvmeDriver(transport, io_queue_depth=16)
            driver.probe()
            driver.write(1, 8, _PATTERN)
            with pytest.raises(NvmeError) as failure:
                driver.read(1, 8, 8)
            assert failure.value.status == Status.UNRECOVERED_READ_ERROR
            entry: dict[str, int] = ERROR_INFORMATION_ENTRY.unpack(
                driver.get_log_page(LogPageId.ERROR_INFORMATION, ERROR_INFORMATION_ENTRY.size)
            )
            assert (entry["lba"], entry["nsid"], entry["status_field"] >> 1) == (8, 1, 0x281)
            assert driver.read(1, 8, 8) == _PATTERN  # count=1: once only, and nothing was lost
            with pytest.raises(NvmeError) as failure:
                driver.write(1, 100, b"\x01" * 512)
            assert failure.value.status == 0x4002
            started = time.monotonic()
            driver.flush(1)  # held by the server's loop until its deadline
            assert time.monotonic() - started >= 0.05
            driver.close()
        finally:
            transport.close()
        stats = s.stop_for_statistics()
        assert stats["controller"]["internal_errors"] == 0
        faults = [json.loads(line) for line in (tmp_path / "trace.jsonl").read_text().splitlines()]
        assert len(faults) == 3 and {f["event"] for f in faults} == {"pci_nvme_fault_injected"}
    finally:
        s.kill()


def test_serve_refuses_bad_fault_rules(tmp_path: Path) -> None:
    for rule in ("nsid=1,op=read", "nsid=3,media-error"):
        proc = subprocess.run(
            [sys.executable, "-m", "vnvme", "serve", "--socket", str(tmp_path / "x.sock"), "--fault", rule],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith("vnvme serve: ") and "Traceback" not in proc.stderr
        assert not (tmp_path / "x.sock").exists()
