"""A real Linux guest against ``vnvme serve`` (issue 5): QEMU's vfio-user-pci client, the Linux
nvme driver, nvme-cli and fio, under TCG.

Provisioning (a cached trixie root, a Debian kernel, an initramfs) is part of the run: on a
fresh machine it downloads from Debian's archive, and if it cannot, these tests fail with the
reason; they are never skipped. ``pytest -m "not vm"`` leaves them out on purpose.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from vnvme.vm.provision import Provisioner
from vnvme.vm.scenarios import ScenarioReport, VmOptions, run_scenarios

pytestmark = [pytest.mark.vm, pytest.mark.timeout(2400)]

SCENARIOS = [
    "guest boots and powers off",
    "the Linux nvme driver probes vnvme",
    "Doorbell Buffer Config arrives from Linux",
    "nvme-cli id-ctrl / id-ns / smart-log / error-log / get-feature",
    "fio randread 4k at each depth",
    "reset_controller while idle",
    "reset_controller under I/O",
    "fio randwrite verify=crc32c, read back after a guest reboot",
    "a second boot without restarting the server",
    "the server stays healthy",
    "the Linux host breaks no protocol rule (vnvme serve --check-host)",
]


@pytest.fixture(scope="module", params=["6.1", "6.12"])
def report(request: pytest.FixtureRequest, vm_say: Callable[[str], None]) -> ScenarioReport:
    """Debian 12's kernel and Debian 13's: they name and probe namespaces differently. Progress
    (provisioning steps, guest boots) goes to the terminal as it happens (``vm_say``)."""
    image = Provisioner(say=vm_say).image(request.param)
    return run_scenarios(image, VmOptions(runtime=2, ramp=1, boot_timeout=900, say=vm_say))


def test_every_scenario_was_judged(report: ScenarioReport) -> None:
    assert [s.name for s in report.scenarios] == SCENARIOS


@pytest.mark.parametrize("name", SCENARIOS)
def test_scenario(report: ScenarioReport, name: str) -> None:
    (scenario,) = [s for s in report.scenarios if s.name == name]
    print(scenario.evidence)
    assert scenario.passed, scenario.evidence


def test_shadow_doorbells_save_doorbells_in_the_guest(report: ScenarioReport) -> None:
    """With shadow doorbells Linux rings at most once per I/O, and less once I/Os overlap."""
    by_depth = {r.depth: r for r in report.reads}
    assert set(by_depth) == {1, 2, 4, 8}
    for r in report.reads:
        assert r.doorbells is not None and r.doorbells <= 1.0 + 1e-9, r
    deep = by_depth[8].doorbells
    assert deep is not None and deep < 1.0, by_depth[8]
