"""``vnvme vm soak``'s host side without a guest: the plan it draws, and how it judges a boot
from what the guest reported (each kind of failure must be caught)."""

from __future__ import annotations

import argparse
import json
import random
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from test_serve import Server
from test_vm_harness import _read_newc
from vnvme.control import request
from vnvme.vm import soak
from vnvme.vm.command import add_arguments
from vnvme.vm.guest import Block, BootResult, scenario_archive
from vnvme.vm.soak import (
    FAULT_AREA,
    LBA_BYTES,
    REGIONS,
    BootPlan,
    FaultWindow,
    _Conductor,
    judge_boot,
    plan_boot,
    soak_init_script,
)


@pytest.mark.parametrize("io_seconds", [15, 30, 60])
def test_plans_keep_faults_in_their_area_and_inside_the_io_time(io_seconds: int) -> None:
    for seed in range(200):
        plan = plan_boot(random.Random(seed), 0, io_seconds)
        assert plan.resets and all(0 < t < io_seconds for t in plan.resets)
        windows = plan.windows
        assert len({w.first for w in windows}) == len(windows)  # a range per window
        for w in windows:
            assert 0 < w.start < w.end < io_seconds
            assert w.first % 4096 == 0 and w.size % 4096 == 0
            assert FAULT_AREA[0] <= w.first and w.first + w.size <= sum(FAULT_AREA)
            assert not any(w.covers(offset, size) for offset, size in REGIONS)
            first, last = map(int, w.lbas.split("-"))
            assert (first * LBA_BYTES, (last + 1) * LBA_BYTES) == (w.first, w.first + w.size)
        for earlier, later in zip(windows, windows[1:], strict=False):
            assert earlier.end <= later.start  # one window at a time
    assert plan_boot(random.Random(7), 3, 30) == plan_boot(random.Random(7), 3, 30)


def _window(first: int, applied: bool = True) -> FaultWindow:
    return FaultWindow(4.0, 8.0, first, 64 << 10, applied=4.1 if applied else None)


def _job(ios: int, error: int = 0, total_err: int = 0) -> dict[str, Any]:
    return {"error": error, "total_err": total_err, "read": {"total_ios": ios}, "write": {"total_ios": ios}}


def _boot(
    *,
    verify_jobs: list[dict[str, Any]] | None = None,
    verify_err: str = "",
    fault_lines: list[int] = (),  # type: ignore[assignment]
    fault_total_err: int | None = None,
    notes: list[str] | None = None,
    console: str = "",
    timed_out: bool = False,
) -> BootResult:
    jobs = verify_jobs if verify_jobs is not None else [_job(100), _job(100)]
    log = "".join(
        f"fio: io_u error on file /dev/nvme0n1: No data available: read offset={o}, buflen=4096\n"
        for o in fault_lines
    )
    total = len(fault_lines) if fault_total_err is None else fault_total_err
    blocks = [
        Block("verify-json", 0, json.dumps({"jobs": jobs})),
        Block("verify-stderr", 0, verify_err),
        Block("faults-json", 0, json.dumps({"jobs": [_job(50, total_err=total)]})),
        Block("faults-stderr", 0, log),
    ]
    default_notes = ["reset 1 begin 10.0", "reset 1 live 10.2", "sums-after aa bb"]
    return BootResult("soak0", 0, timed_out, 60.0, blocks, default_notes if notes is None else notes, console)


def _plan(*windows: FaultWindow) -> BootPlan:
    return BootPlan(0, 1, [5.0], list(windows))


def test_a_clean_boot_has_no_problems() -> None:
    inside = FAULT_AREA[0] + 4096
    report = judge_boot(_plan(_window(FAULT_AREA[0])), _boot(fault_lines=[inside, inside]), None, 60.0)
    assert report.problems == []
    assert (report.verify_ios, report.fault_job_ios) == (400, 100)
    assert (report.errors_inside, report.errors_outside, report.windows_unseen) == (2, 0, 0)
    assert (report.resets_planned, report.resets_survived) == (1, 1)
    assert report.sums_after == ["aa", "bb"]


@pytest.mark.parametrize(
    ("boot", "needle"),
    [
        (_boot(fault_lines=[FAULT_AREA[0] + 4096, FAULT_AREA[0] + (64 << 10)]), "1 I/O error(s) outside"),
        (_boot(fault_lines=[]), "never saw fail"),
        (_boot(fault_lines=[FAULT_AREA[0]], fault_total_err=3), "counted 3 errors but logged 1"),
        (
            _boot(
                fault_lines=[FAULT_AREA[0]],
                verify_err="verify: bad magic header 0, wanted acca at file /dev/nvme0n1 offset 8192\n",
                verify_jobs=[_job(100, error=84), _job(100)],
            ),
            "1 verify mismatch(es)",
        ),
        (
            _boot(fault_lines=[FAULT_AREA[0]], verify_jobs=[_job(100, error=84), _job(100)]),
            "1 verify mismatch",
        ),
        (
            _boot(fault_lines=[FAULT_AREA[0]], verify_jobs=[_job(100, error=5), _job(100)]),
            "outside the fault",
        ),
        (_boot(fault_lines=[FAULT_AREA[0]], verify_jobs=[_job(100)]), "1 verify jobs reported"),
        (
            _boot(fault_lines=[FAULT_AREA[0]], notes=["reset 1 failed state=dead", "sums-after a b"]),
            "0/1 resets came back live",
        ),
        (_boot(fault_lines=[FAULT_AREA[0]], notes=["reset 1 live 3.0"]), "no checksums at the end"),
        (
            _boot(fault_lines=[FAULT_AREA[0]], console="nvme nvme0: I/O 7 (Read) QID 1 timeout, aborting\n"),
            "I/O timeout(s)",
        ),
        (_boot(fault_lines=[FAULT_AREA[0]], timed_out=True), "hang: the boot did not end"),
    ],
)
def test_each_kind_of_failure_is_a_problem(boot: BootResult, needle: str) -> None:
    report = judge_boot(_plan(_window(FAULT_AREA[0])), boot, None, 60.0)
    assert any(needle in problem for problem in report.problems), report.problems


def test_a_window_that_never_turned_on_counts_its_errors_as_outside() -> None:
    """Errors on a range whose rule the control socket never confirmed are not excused."""
    report = judge_boot(
        _plan(_window(FAULT_AREA[0], applied=False)), _boot(fault_lines=[FAULT_AREA[0]]), None, 1
    )
    assert report.errors_outside == 1
    assert any("never turned on" in p for p in report.problems)


def test_a_hang_the_conductor_saw_is_reported() -> None:
    report = judge_boot(
        _plan(_window(FAULT_AREA[0])), _boot(fault_lines=[FAULT_AREA[0]]), "no I/O progress", 1
    )
    assert report.hang == "no I/O progress"
    assert "hang: no I/O progress" in report.problems


def test_the_soak_init_replaces_init_in_the_boots_own_archive() -> None:
    entries = _read_newc(scenario_archive({"BOOT": "0"}, {"init": soak_init_script()}))
    mode, body = entries["init"]
    assert mode & 0o777 == 0o755 and body.startswith(b"#!/bin/busybox sh")
    assert b"reset_controller" in body and b"continue_on_error" in body


def test_soak_options() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["soak", "--minutes", "10", "--kernel", "6.12", "--seed", "5"])
    assert (args.minutes, args.kernel, args.seed, args.io_seconds) == (10.0, "6.12", 5, 30)
    for bad in (["--minutes", "0"], ["--minutes", "x"], ["--io-seconds", "10"]):
        with pytest.raises(SystemExit):
            parser.parse_args(["soak", *bad])


def test_the_conductor_switches_windows_through_the_control_socket(tmp_path: Path) -> None:
    """Against a real ``vnvme serve --control``: the window's rule is added once the guest says
    its I/O started, removed at its end, and each switch is timed from that moment."""
    control = str(tmp_path / "control.sock")
    server = Server(tmp_path, "--quiet", "--control", control, "--namespace", "ram,size=32M")
    try:
        window = FaultWindow(0.2, 0.6, FAULT_AREA[0], 64 << 10)
        guest = SimpleNamespace(proc=None)
        conductor = _Conductor(BootPlan(0, 1, [], [window]), control, guest, lambda line: None)  # type: ignore[arg-type]
        conductor.start()
        time.sleep(0.4)
        assert window.applied is None  # nothing before the guest's I/O starts
        conductor.on_line("@@note io-start 5.0")
        deadline = time.monotonic() + 10
        while window.removed is None and time.monotonic() < deadline:
            conductor.on_line("@@note progress 5.1 1 1")
            time.sleep(0.05)
        conductor.finish()
        assert window.applied is not None and window.removed is not None
        assert 0.2 <= window.applied < 0.6 <= window.removed
        assert conductor.control_errors == [] and conductor.hang is None
        assert request(control, "fault list") == "ok 0 rule(s)"
    finally:
        server.kill()


def test_the_conductor_stops_a_guest_without_progress(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(soak, "HANG_SECONDS", 0.5)
    proc = subprocess.Popen(["sleep", "60"])
    try:
        guest = SimpleNamespace(proc=proc)
        conductor = _Conductor(BootPlan(0, 1, [], []), "/nonexistent", guest, lambda line: None)  # type: ignore[arg-type]
        conductor.start()
        conductor.on_line("@@note io-start 5.0")
        conductor.on_line("@@note progress 5.1 10 10")
        conductor.on_line("@@note progress 5.2 10 10")  # the same counts: no progress
        assert proc.wait(10) == -signal.SIGTERM
        conductor.finish()
        assert conductor.hang is not None and "no I/O progress" in conductor.hang
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_verify_job_ended_by_an_io_error_counts_once() -> None:
    line = "fio: io_u error on file /dev/nvme0n1: No data available: read offset=4096, buflen=4096\n"
    boot = _boot(fault_lines=[FAULT_AREA[0]], verify_err=line, verify_jobs=[_job(100, error=61), _job(100)])
    report = judge_boot(_plan(_window(FAULT_AREA[0])), boot, None, 1)
    assert report.errors_outside == 1
