from __future__ import annotations

from host import Rig


def test_probe_enables_shadow_doorbells_and_does_io(rig: Rig) -> None:
    assert rig.driver.dbbuf_enabled
    assert sorted(rig.driver.namespaces) == [1, 2]
    rig.driver.write(1, 5, b"\xa5" * 4096)
    assert rig.driver.read(1, 5, 8) == b"\xa5" * 4096
    assert rig.driver.read(2, 0, 1) == bytes(4096)
    stats = rig.controller.statistics()
    assert stats.dbbuf_configs == 1
    assert stats.io_commands == {"write": 1, "read": 2}
    assert rig.trace.named("pci_nvme_dbbuf_config")
