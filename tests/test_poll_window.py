"""The adaptive poll window: how long an idle polling server spins before it rearms and sleeps.

Unit tests pass synthetic times (no clock); the served ones check the window's statistics and
that a server whose window stays shut serves as the event-driven controller does.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from test_serve import Server
from vnvme.bench.engine import JobResult, JobSpec, run_job
from vnvme.driver import NvmeDriver
from vnvme.vfio_user.server import POLL_WINDOW_START, PollBudget, PollWindow

US = 1e-6


def _idle_then_work(window: PollWindow, start: float, waited: float) -> bool:
    """An idle period from ``start``, polled while the window says so, ended by work after
    ``waited``: whether the window still polled when the work came."""
    polled = window.idle(start)
    t = start
    while polled and t + 1 * US < start + waited:
        t += 1 * US
        polled = window.idle(t)
    window.work(start + waited)
    return polled


def test_the_window_opens_and_doubles_while_work_comes_just_after_it() -> None:
    window = PollWindow(32 * US)
    assert not window.polls and not window.idle(0.0)  # shut at first: sleep at once
    window.work(10 * US)  # came 10 us after: within the max, a window would have caught it
    assert window.window == pytest.approx(POLL_WINDOW_START) and window.grows == 1
    assert window.polls and window.woken == 1 and window.found == 0
    _idle_then_work(window, 1.0, 6 * US)  # just after the 4 us window
    assert window.window == pytest.approx(8 * US) and window.grows == 2


def test_work_within_the_window_is_found_polling_and_keeps_it() -> None:
    window = PollWindow(32 * US)
    window.window = 16 * US
    assert _idle_then_work(window, 0.0, 5 * US)
    assert window.found == 1 and window.woken == 0
    assert window.window == pytest.approx(16 * US) and window.grows == window.shrinks == 0


def test_the_window_never_grows_past_its_max() -> None:
    window = PollWindow(20 * US)
    for i in range(10):
        _idle_then_work(window, float(i), 19.5 * US)
    assert window.window == pytest.approx(20 * US)
    assert window.grows == 4  # opened at 4, then 8, 16 and 20 (the max): there the work is inside


def test_work_far_later_than_the_max_collapses_the_window_and_the_server_sleeps_at_once() -> None:
    window = PollWindow(32 * US)
    window.window = 32 * US
    assert not _idle_then_work(window, 0.0, 300 * US)  # a TCG guest's pace
    assert window.window == 0.0 and window.shrinks == 1 and window.woken == 1
    # Shut: the next idle pass sleeps at once, and later work keeps it shut.
    assert not window.idle(1.0)
    window.work(1.0 + 250 * US)
    assert window.window == 0.0 and window.shrinks == 1 and window.grows == 0


def test_the_budget_ends_a_window_early() -> None:
    budget = PollBudget(0.25, 2 * US, now=0.0)
    window = PollWindow(1.0, budget)
    window.window = 0.5
    assert window.idle(0.0)
    budget.spend(0.0, 3 * US)  # the first pass took more than the burst saved
    assert not window.idle(3 * US)  # well within the window, but no budget left
    assert budget.exhausted == 1
    assert not window.idle(3.5 * US)  # and the period is not polled again once it slept
    window.work(10 * US)
    assert window.woken == 1 and window.found == 0
    assert window.window == 0.5  # the work came within the window: it was not the window's fault


def test_a_pass_limit_within_the_window_counts_as_sleeping() -> None:
    window = PollWindow(32 * US)
    window.window = 32 * US
    assert window.idle(0.0)
    window.stop()
    assert not window.idle(1 * US)
    window.work(2 * US)
    assert window.woken == 1 and window.found == 0


def test_a_polling_server_with_the_default_budget_serves_verified_io_and_reports_its_window(
    tmp_path: Path,
) -> None:
    server = Server(tmp_path, "--namespace", "ram,size=8M", "--poll")

    def job(driver: NvmeDriver) -> None:
        for lba in range(0, 64, 8):
            data = os.urandom(4096)
            driver.write(1, lba, data)
            assert driver.read(1, lba, 8) == data

    stats = server.serve_one_driver(job)
    window = stats["polling"]["window"]
    assert window["max_us"] == 32.0
    assert 0.0 <= window["current_us"] <= 32.0
    # Every idle period the I/O ended was judged: found while polling or after sleeping.
    assert window["found_polling"] + window["woken"] >= 16


def test_a_shut_window_serves_as_the_event_driven_controller(tmp_path: Path) -> None:
    server = Server(tmp_path, "--namespace", "null,size=1G", "--poll", "--poll-max", "0")
    ios = 300
    results: list[JobResult] = []
    stats = server.serve_one_driver(
        lambda driver: results.append(run_job(driver, JobSpec(iodepth=1, number_ios=ios, bs=4096)))
    )
    result = results[0]
    polling = stats["polling"]
    assert polling["idle_seconds"] == 0.0  # never spun
    assert polling["window"]["grows"] == 0 and polling["window"]["found_polling"] == 0
    # Asleep between commands, the controller asks for each doorbell at depth 1 (ADAPTIVE, the
    # event-driven default, now and then offers a larger batch the host cannot fill).
    assert result.sq_doorbells >= 0.9 * ios
    # Each doorbell re-armed only its own SQ (event driven), not every shadow SQ (a rearm).
    assert stats["controller"]["rearms_won"] + stats["controller"]["rearms_lost"] <= ios + 20


def test_a_whole_cpu_polls_without_a_window(tmp_path: Path) -> None:
    server = Server(tmp_path, "--namespace", "ram,size=8M", "--poll", "--poll-budget", "1")
    try:
        stats = server.stop_for_statistics()
    finally:
        server.kill()
    assert stats["polling"]["window"] is None
