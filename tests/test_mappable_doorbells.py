"""Mappable doorbells: the device polls a doorbell page the host stores into."""

from __future__ import annotations

import pytest

from host import make_rig
from vnvme.controller.namespace import Namespace, RamBackend
from vnvme.effects import Effect
from vnvme.function import NvmeFunction
from vnvme.spec import registers as regs
from vnvme.spec.commands import NvmOpcode


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

    def check_shadow_tails(self) -> bool:
        return False


@pytest.mark.pure_python  # a stub in place of the compiled NvmeFunction's typed controller
def test_the_same_value_stored_again_a_lap_later_is_not_lost() -> None:
    function = NvmeFunction([Namespace(1, RamBackend(1 << 20), 512)], mappable_doorbells=True)
    real = function.controller
    stub = StubController()
    try:
        function.controller = stub  # type: ignore[assignment]
        function._scan_doorbells()  # first look after enable: the page is cleared
        sq1 = 2  # dword index of SQ 1's tail doorbell (DSTRD 0)
        function._db_page.words[sq1] = 5
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


def test_a_ring_identical_to_a_stale_page_value_is_not_lost() -> None:
    """Found by `vnvme bench --variants mappable --cpu split` (a hang about one run in two at
    depth 8): the page still held 25 from a lap ago, the scan looked at (25, held 24) while the
    controller was idle at 24 and found nothing new; the host then placed one command, crossed
    EventIdx 24 and rang with 25 -- the very value the page held. Nothing changed in the page;
    the shadow slot the host wrote first did, and the scan looks there too."""
    rig = make_rig(namespaces=[Namespace(1, RamBackend(1 << 20), 512)], trace=())
    try:
        driver, ctrl = rig.driver, rig.controller
        qp = driver.queue(1)
        for lba in range(3):
            driver.write(1, lba, bytes([lba + 1]) * 512)  # the host keeps its shadow slot
        sq = ctrl.sqs[1]
        assert sq is not None and sq.doorbell.slot_kept and sq.head == qp.sq_tail
        cid = qp.submit(driver.io_sqe(qp, NvmOpcode.FLUSH, 1))
        assert qp.shadow is not None
        qp.shadow.store(qp.sq_slot, qp.sq_tail)  # the shadow store; the ring itself is "lost"
        qp.last_sq_tail = qp.sq_tail
        rig.transport._handle(ctrl.process())
        assert sq.head != qp.sq_tail  # nothing rang: an event-driven pass does not look
        assert ctrl.check_shadow_tails()
        rig.transport._handle(ctrl.process())
        assert sq.head == qp.sq_tail
        assert driver._wait_cid(qp, cid).status == 0
        assert not ctrl.check_shadow_tails()  # consumed: nothing to mark
    finally:
        rig.close()
