"""Mappable doorbells: the device polls a doorbell page the host stores into."""

from __future__ import annotations

from vnvme.controller.namespace import Namespace, RamBackend
from vnvme.effects import Effect
from vnvme.function import NvmeFunction
from vnvme.spec import registers as regs


class StubController:
    """Just what the page scan looks at."""

    def __init__(self) -> None:
        self.enabled = True
        self.fatal = False
        self.enable_count = 1
        self.held = 0
        self.rung: list[tuple[int, int]] = []

    def doorbell_values(self) -> list[tuple[int, int]]:
        return [(regs.DOORBELL_BASE + 8, self.held)]  # SQ 1 tail doorbell

    def mapped_doorbell(self, offset: int, value: int) -> list[Effect]:
        self.rung.append((offset, value))
        return []


def test_the_same_value_stored_again_a_lap_later_is_not_lost() -> None:
    function = NvmeFunction([Namespace(1, RamBackend(1 << 20), 512)], mappable_doorbells=True)
    real = function.controller
    stub = StubController()
    try:
        function.controller = stub  # type: ignore[assignment]
        function._scan_doorbells()  # first look after enable: the page is cleared
        sq1 = 2  # dword index of SQ 1's tail doorbell (DSTRD 0)
        function._db_words[sq1] = 5
        function._scan_doorbells()
        assert stub.rung == [(regs.DOORBELL_BASE + 8, 5)]
        stub.held = 5  # the controller caught up
        function._scan_doorbells()
        function._scan_doorbells()
        assert len(stub.rung) == 1  # nothing new
        # The controller moves on by itself (shadow tails) and goes idle at 20; the host, a lap
        # later, stores 5 again: the page did not change, but it disagrees with the controller.
        stub.held = 20
        function._scan_doorbells()
        assert stub.rung[-1] == (regs.DOORBELL_BASE + 8, 5) and len(stub.rung) == 2
        function._scan_doorbells()
        assert len(stub.rung) == 2  # looked at once, not on every pass
    finally:
        function.controller = real
        function.close()
