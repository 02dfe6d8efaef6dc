"""``vnvme vm soak``'s CI default (about a minute and a half under TCG): two boots of a 2-vCPU
guest with verified I/O, controller resets, media errors turned on and off while serving, and a
SIGKILL and restart of ``vnvme serve`` between the boots. The long form is in RELIABILITY.md."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from vnvme.vm.provision import Provisioner
from vnvme.vm.soak import SoakOptions, SoakReport, format_report, run_soak

pytestmark = [pytest.mark.vm, pytest.mark.timeout(1200)]


@pytest.fixture(scope="module")
def report(vm_say: Callable[[str], None]) -> SoakReport:
    image = Provisioner(say=vm_say).image()
    result = run_soak(image, SoakOptions(minutes=1, say=vm_say))  # the seed is printed
    vm_say(format_report(result))
    return result


def test_the_soak_passes(report: SoakReport) -> None:
    assert report.passed, "\n".join(report.problems)


def test_no_mismatch_no_hang_and_errors_only_where_the_faults_were(report: SoakReport) -> None:
    s = report.summary()
    assert s["ios"] > 10_000
    assert s["verify_mismatches"] == 0
    assert s["hangs"] == 0
    assert s["errors_outside_fault_ranges"] == 0
    assert s["errors_inside_fault_ranges"] > 0
    assert s["fault_windows"] >= 2 and s["fault_windows_without_errors"] == 0


def test_resets_and_restarts_were_survived(report: SoakReport) -> None:
    s = report.summary()
    assert s["resets_planned"] >= 2 and s["resets_survived"] == s["resets_planned"]
    assert s["restarts"] == len(report.boots) - 1 >= 1
    assert s["restarts_verified"] == s["restarts"]
