"""The polling budget: idle polling passes take at most a share of one CPU over time."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from vnvme.vfio_user.server import PollBudget, ServerOptions


def test_the_budget_earns_its_share_of_the_time_and_saves_at_most_a_burst() -> None:
    budget = PollBudget(0.25, 0.004, now=0.0)
    assert budget.allows(0.0)  # starts with a full burst saved
    budget.spend(0.0, 0.008)  # one long pass: 8 ms spent, 4 ms saved, 2 ms earned meanwhile
    assert not budget.allows(0.008) and budget.exhausted == 1
    assert not budget.allows(0.016)  # 2 ms more earned: back at zero, not above it
    assert budget.allows(0.0201)
    budget.spend(0.0201, 0.0202)
    assert budget.allows(10.0) and budget.saved == pytest.approx(0.004)  # never more than a burst
    assert budget.spent == pytest.approx(0.0081)


def test_a_whole_cpu_is_no_limit() -> None:
    budget = PollBudget(1.0, 0.001, now=0.0)
    budget.spend(0.0, 5.0)
    assert budget.allows(5.0) and budget.exhausted == 0


@pytest.mark.parametrize("share", [-0.1, 1.5])
def test_a_budget_outside_one_cpu_is_refused(share: float) -> None:
    with pytest.raises(ValueError, match="share of one CPU"):
        ServerOptions(poll_budget=share)


def test_a_polling_server_idles_within_its_budget(tmp_path: Path) -> None:
    from test_serve import Server

    # A doorbell page polls up to --poll-passes within the budget (--poll below a whole CPU
    # polls only for its adaptive window: the budget bounds that too, tests/test_poll_window.py).
    server = Server(tmp_path, "--mappable-doorbells", "--poll-budget", "0.1", "--poll-passes", "1000000")
    try:
        transport = server.transport()
        from vnvme.driver import NvmeDriver

        driver = NvmeDriver(transport, io_queue_depth=16)
        driver.probe()
        started = time.monotonic()
        time.sleep(1.0)  # an idle host: the server polls only while its budget lasts
        driver.read(1, 0, 1)
        elapsed = time.monotonic() - started
        driver.close()
        transport.close()
        stats = server.stop_for_statistics()
    finally:
        server.kill()
    polling = stats["polling"]
    assert polling["cut_short"] > 0
    # Its share of the connection's time, plus the burst saved at the start, plus the probe's.
    assert polling["idle_seconds"] <= 0.1 * (elapsed + 1.0) + 0.005 + 0.05
