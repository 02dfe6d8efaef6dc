"""DEVICE_SET_IRQS: eventfds for MSI-X vectors and the INTx line; trigger, mask and unmask."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator

import pytest

from vfio_user.peer import Peer, eventfd, fd_count, signalled
from vnvme.vfio_user import protocol as vu
from vnvme.vfio_user.protocol import Command

MSIX = vu.PciIrq.MSIX
INTX = vu.PciIrq.INTX
BAR4 = vu.PciRegion.BAR4
CONFIG = vu.PciRegion.CONFIG
F = vu.IrqSetFlags
EVENTFD_TRIGGER = F.DATA_EVENTFD | F.ACTION_TRIGGER
NONE_TRIGGER = F.DATA_NONE | F.ACTION_TRIGGER
BOOL_TRIGGER = F.DATA_BOOL | F.ACTION_TRIGGER


def _set(
    flags: int, index: int, start: int, count: int, data: bytes = b"", argsz: int | None = None
) -> bytes:
    size = vu.IRQ_SET.size + len(data) if argsz is None else argsz
    return vu.IRQ_SET.pack(size, flags, index, start, count) + data


@pytest.fixture
def efds() -> Iterator[list[int]]:
    """Four non-blocking eventfds, closed after the test."""
    fds = [eventfd() for _ in range(4)]
    try:
        yield fds
    finally:
        for fd in fds:
            os.close(fd)


def test_set_irqs_eventfds_mask_unmask_and_trigger(ready: Peer) -> None:
    msix = vu.PciIrq.MSIX
    eventfd_trigger = vu.IrqSetFlags.DATA_EVENTFD | vu.IrqSetFlags.ACTION_TRIGGER
    efds = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(2)]
    try:
        ready.expect_error(
            Command.DEVICE_SET_IRQS, vu.IRQ_SET.pack(20, eventfd_trigger, msix, 0, 3), errno.EINVAL, efds
        )
        ready.expect_error(
            Command.DEVICE_SET_IRQS, vu.IRQ_SET.pack(20, eventfd_trigger, msix, 1000, 2), errno.EINVAL, efds
        )
        ready.expect_error(
            Command.DEVICE_SET_IRQS,
            vu.IRQ_SET.pack(20, vu.IrqSetFlags.DATA_NONE | vu.IrqSetFlags.DATA_BOOL | 32, msix, 0, 1),
            errno.EINVAL,
        )
        ready.call(Command.DEVICE_SET_IRQS, vu.IRQ_SET.pack(20, eventfd_trigger, msix, 0, 2), efds)
        trigger = vu.IrqSetFlags.DATA_NONE | vu.IrqSetFlags.ACTION_TRIGGER
        ready.call(Command.DEVICE_SET_IRQS, vu.IRQ_SET.pack(20, trigger, msix, 1, 1))
        assert os.eventfd_read(efds[1]) == 1
        with pytest.raises(BlockingIOError):
            os.eventfd_read(efds[0])
        mask = vu.IrqSetFlags.DATA_NONE | vu.IrqSetFlags.ACTION_MASK
        unmask = vu.IrqSetFlags.DATA_BOOL | vu.IrqSetFlags.ACTION_UNMASK
        ready.call(Command.DEVICE_SET_IRQS, vu.IRQ_SET.pack(20, mask, msix, 0, 1))
        ready.call(Command.DEVICE_SET_IRQS, vu.IRQ_SET.pack(20, trigger, msix, 0, 1))
        with pytest.raises(BlockingIOError):
            os.eventfd_read(efds[0])  # masked: held pending
        ready.call(Command.DEVICE_SET_IRQS, vu.IRQ_SET.pack(21, unmask, msix, 0, 1) + b"\x01")
        assert os.eventfd_read(efds[0]) == 1  # delivered on unmask
        # De-assign (no fds): the vector is dead, the server closed its copies.
        before = fd_count()
        ready.call(Command.DEVICE_SET_IRQS, vu.IRQ_SET.pack(20, eventfd_trigger, msix, 0, 2))
        assert fd_count() == before - 2
        assert ready.function.eventfds[msix][:2] == [-1, -1]
    finally:
        for fd in efds:
            os.close(fd)


def test_assigning_eventfds_hands_the_server_its_own_copies(ready: Peer, efds: list[int]) -> None:
    before = fd_count()
    ready.set_irqs(EVENTFD_TRIGGER, MSIX, 2, 3, fds=efds[:3])
    assert fd_count() == before + 3
    live = ready.function.eventfds[MSIX]
    assert live[:2] == [-1, -1] and all(fd >= 0 for fd in live[2:5]) and live[5] == -1
    assert not set(live[2:5]) & set(efds)  # copies, not our numbers
    ready.function._raise(3)
    assert [signalled(fd) for fd in efds] == [0, 1, 0, 0]


def test_replacing_an_eventfd_closes_the_old_copy(ready: Peer, efds: list[int]) -> None:
    ready.set_irqs(EVENTFD_TRIGGER, MSIX, 0, 1, fds=[efds[0]])
    before = fd_count()
    ready.set_irqs(EVENTFD_TRIGGER, MSIX, 0, 1, fds=[efds[1]])
    assert fd_count() == before
    ready.function._raise(0)
    assert (signalled(efds[0]), signalled(efds[1])) == (0, 1)


def test_a_controller_interrupt_reaches_the_eventfd(ready: Peer, efds: list[int]) -> None:
    ready.set_irqs(EVENTFD_TRIGGER, MSIX, 0, 4, fds=efds)
    fn = ready.function
    fn._raise(0)
    fn._raise(2)
    fn._raise(2)
    assert [signalled(fd) for fd in efds] == [1, 0, 2, 0]
    assert fn.stats.interrupts_signalled == 3


def test_an_interrupt_raised_before_any_eventfd_is_pending_until_one_comes(
    ready: Peer, efds: list[int]
) -> None:
    fn = ready.function
    fn._raise(1)
    pba = fn.pba_offset
    assert ready.read_int(vu.PciRegion.BAR4, pba, 8) == 1 << 1  # its PBA bit
    ready.set_irqs(EVENTFD_TRIGGER, MSIX, 0, 2, fds=efds[:2])
    assert [signalled(fd) for fd in efds[:2]] == [0, 1]  # delivered on assignment
    assert ready.read_int(vu.PciRegion.BAR4, pba, 8) == 0


def test_bus_master_disable_holds_interrupts_in_the_pba(ready: Peer, efds: list[int]) -> None:
    fn = ready.function
    pba = fn.pba_offset
    ready.set_irqs(EVENTFD_TRIGGER, MSIX, 0, 2, fds=efds[:2])
    ready.write_int(CONFIG, 0x04, 2, 0x0002)  # Memory Space Enable only: the PBA stays readable
    fn._raise(0)
    fn._raise(1)
    fn._raise(1)
    assert [signalled(fd) for fd in efds[:2]] == [0, 0]  # an MSI-X message is a memory write
    assert (fn.stats.interrupts_signalled, fn.stats.interrupts_deferred) == (0, 3)
    assert ready.read_int(BAR4, pba, 8) == 0b11
    # Setting Bus Master Enable delivers what was held, once per vector (a PBA bit, not a count).
    ready.write_int(CONFIG, 0x04, 2, 0x0006)
    assert [signalled(fd) for fd in efds[:2]] == [1, 1]
    assert ready.read_int(BAR4, pba, 8) == 0
    assert fn.stats.interrupts_signalled == 2
    # Nothing stale is left to fire again on a re-assign or an UNMASK.
    ready.set_irqs(EVENTFD_TRIGGER, MSIX, 0, 1, fds=[efds[0]])
    ready.set_irqs(F.DATA_NONE | F.ACTION_UNMASK, MSIX, 1, 1)
    assert [signalled(fd) for fd in efds[:2]] == [0, 0]
    # With mastering on, an interrupt goes straight out again.
    fn._raise(1)
    assert [signalled(fd) for fd in efds[:2]] == [0, 1]


def test_assigning_an_eventfd_with_bus_mastering_off_keeps_it_held(ready: Peer, efds: list[int]) -> None:
    fn = ready.function
    ready.write_int(CONFIG, 0x04, 2, 0x0002)
    fn._raise(0)  # no eventfd and no bus mastering: pending
    ready.set_irqs(EVENTFD_TRIGGER, MSIX, 0, 1, fds=[efds[0]])
    assert signalled(efds[0]) == 0
    assert ready.read_int(BAR4, fn.pba_offset, 8) == 1


def test_unmask_with_bus_mastering_off_keeps_it_held(ready: Peer, efds: list[int]) -> None:
    fn = ready.function
    ready.set_irqs(EVENTFD_TRIGGER, MSIX, 0, 1, fds=[efds[0]])
    ready.write_int(CONFIG, 0x04, 2, 0x0002)
    fn._raise(0)
    ready.set_irqs(F.DATA_NONE | F.ACTION_UNMASK, MSIX, 0, 1)
    assert signalled(efds[0]) == 0
    assert ready.read_int(BAR4, fn.pba_offset, 8) == 1


def test_trigger_with_data_bool_signals_the_vectors_set_to_one(ready: Peer, efds: list[int]) -> None:
    ready.set_irqs(EVENTFD_TRIGGER, MSIX, 0, 4, fds=efds)
    ready.set_irqs(BOOL_TRIGGER, MSIX, 0, 4, data=b"\x01\x00\x07\x00")
    assert [signalled(fd) for fd in efds] == [1, 0, 1, 0]
    ready.set_irqs(NONE_TRIGGER, MSIX, 1, 3)
    assert [signalled(fd) for fd in efds] == [0, 1, 1, 1]


def test_mask_and_unmask_with_bools_and_none(ready: Peer, efds: list[int]) -> None:
    ready.set_irqs(EVENTFD_TRIGGER, MSIX, 0, 4, fds=efds)
    ready.set_irqs(F.DATA_BOOL | F.ACTION_MASK, MSIX, 0, 4, data=b"\x00\x01\x01\x00")
    assert ready.function.masked[MSIX][:4] == [False, True, True, False]
    ready.set_irqs(NONE_TRIGGER, MSIX, 0, 4)
    assert [signalled(fd) for fd in efds] == [1, 0, 0, 1]
    assert ready.read_int(vu.PciRegion.BAR4, ready.function.pba_offset, 8) == 0b0110
    ready.set_irqs(F.DATA_NONE | F.ACTION_UNMASK, MSIX, 2, 1)
    assert [signalled(fd) for fd in efds] == [0, 0, 1, 0]
    # Unmasking a vector with nothing pending signals nothing.
    ready.set_irqs(F.DATA_NONE | F.ACTION_UNMASK, MSIX, 0, 1)
    assert signalled(efds[0]) == 0
    assert ready.function.masked[MSIX][:4] == [False, True, False, False]


def test_count_zero_with_data_none_disables_every_vector(ready: Peer, efds: list[int]) -> None:
    ready.set_irqs(EVENTFD_TRIGGER, MSIX, 0, 3, fds=efds[:3])
    ready.set_irqs(EVENTFD_TRIGGER, INTX, 0, 1, fds=[efds[3]])
    before = fd_count()
    ready.set_irqs(NONE_TRIGGER, MSIX, 0, 0)
    assert fd_count() == before - 3
    assert set(ready.function.eventfds[MSIX]) == {-1}
    assert ready.function.eventfds[INTX][0] >= 0  # another index: untouched
    ready.function._raise(0)  # no MSI-X vector left: the line
    assert [signalled(fd) for fd in efds] == [0, 0, 0, 1]


def test_intx(ready: Peer, efds: list[int]) -> None:
    fn = ready.function
    ready.set_irqs(EVENTFD_TRIGGER, INTX, 0, 1, fds=[efds[0]])
    fn._raise(0)
    fn._raise(5)  # with no MSI-X vector live, every interrupt is the one line
    assert signalled(efds[0]) == 2
    ready.set_irqs(NONE_TRIGGER, INTX, 0, 1)
    assert signalled(efds[0]) == 1
    # Interrupt Disable in the config space Command register silences the line (Memory Space
    # and Bus Master Enable stay set).
    ready.write_int(vu.PciRegion.CONFIG, 0x04, 2, 1 << 10 | 0x0006)
    fn._raise(0)
    assert signalled(efds[0]) == 0
    assert fn.pending[MSIX][0]  # held as a pending MSI-X vector rather than lost
    ready.write_int(vu.PciRegion.CONFIG, 0x04, 2, 0x0006)
    # Once an MSI-X vector is live, interrupts go there instead (the held one first).
    ready.set_irqs(EVENTFD_TRIGGER, MSIX, 0, 1, fds=[efds[1]])
    assert (signalled(efds[0]), signalled(efds[1])) == (0, 1)
    fn._raise(0)
    assert (signalled(efds[0]), signalled(efds[1])) == (0, 1)
    ready.expect_error(Command.DEVICE_SET_IRQS, _set(EVENTFD_TRIGGER, INTX, 0, 2), errno.EINVAL, efds[:2])
    ready.expect_error(Command.DEVICE_SET_IRQS, _set(NONE_TRIGGER, INTX, 1, 1), errno.EINVAL)


def test_data_bool_shorter_than_count(ready: Peer) -> None:
    ready.expect_error(Command.DEVICE_SET_IRQS, _set(BOOL_TRIGGER, MSIX, 0, 3, b"\x01\x01"), errno.EINVAL)
    ready.expect_error(Command.DEVICE_SET_IRQS, _set(BOOL_TRIGGER, MSIX, 0, 1), errno.EINVAL)
    # The bytes are there but argsz does not cover them.
    ready.expect_error(
        Command.DEVICE_SET_IRQS, _set(BOOL_TRIGGER, MSIX, 0, 2, b"\x01\x01", argsz=21), errno.EINVAL
    )


@pytest.mark.parametrize("action", [F.ACTION_MASK, F.ACTION_UNMASK])
def test_mask_or_unmask_with_eventfds_is_not_supported(ready: Peer, efds: list[int], action: int) -> None:
    before = fd_count()
    ready.expect_error(
        Command.DEVICE_SET_IRQS, _set(F.DATA_EVENTFD | action, MSIX, 0, 2), errno.ENOTSUP, efds[:2]
    )
    assert fd_count() == before  # both closed
    assert set(ready.function.eventfds[MSIX]) == {-1}


@pytest.mark.parametrize(
    ("flags", "index", "start", "count"),
    [
        (NONE_TRIGGER, vu.PciIrq.MSI, 0, 1),  # no MSI
        (NONE_TRIGGER, vu.PciIrq.ERR, 0, 1),
        (NONE_TRIGGER, vu.PciIrq.REQ, 0, 1),
        (NONE_TRIGGER, 5, 0, 1),
        (NONE_TRIGGER, MSIX, 66, 0),  # start beyond the vectors
        (NONE_TRIGGER, MSIX, 64, 2),  # runs past the last
        (NONE_TRIGGER, MSIX, 1, 0xFFFFFFFF),
        (F.DATA_NONE, MSIX, 0, 1),  # no action
        (F.ACTION_TRIGGER, MSIX, 0, 1),  # no data kind
        (F.DATA_NONE | F.ACTION_MASK | F.ACTION_TRIGGER, MSIX, 0, 1),
        (NONE_TRIGGER | 1 << 6, MSIX, 0, 1),  # an undefined flag
        (NONE_TRIGGER | 1 << 31, MSIX, 0, 1),
    ],
)
def test_bad_requests(ready: Peer, flags: int, index: int, start: int, count: int) -> None:
    ready.expect_error(Command.DEVICE_SET_IRQS, _set(flags, index, start, count), errno.EINVAL)


@pytest.mark.parametrize("flags", [NONE_TRIGGER, BOOL_TRIGGER, F.DATA_NONE | F.ACTION_MASK])
def test_descriptors_without_data_eventfd_are_refused_and_closed(
    ready: Peer, efds: list[int], flags: int
) -> None:
    before = fd_count()
    ready.expect_error(Command.DEVICE_SET_IRQS, _set(flags, MSIX, 0, 1, b"\x01"), errno.EINVAL, efds[:1])
    assert fd_count() == before
    assert set(ready.function.eventfds[MSIX]) == {-1}


def test_refused_eventfds_are_closed(ready: Peer, efds: list[int]) -> None:
    before = fd_count()
    ready.expect_error(Command.DEVICE_SET_IRQS, _set(EVENTFD_TRIGGER, MSIX, 0, 3), errno.EINVAL, efds[:2])
    ready.expect_error(Command.DEVICE_SET_IRQS, _set(EVENTFD_TRIGGER, MSIX, 64, 2), errno.EINVAL, efds[:2])
    ready.expect_error(
        Command.DEVICE_SET_IRQS, _set(EVENTFD_TRIGGER, vu.PciIrq.MSI, 0, 1), errno.EINVAL, efds[:1]
    )
    ready.expect_error(Command.DEVICE_SET_IRQS, b"\0" * 12, errno.EINVAL, efds[:1])
    assert fd_count() == before


def test_too_short(ready: Peer) -> None:
    ready.expect_error(Command.DEVICE_SET_IRQS, _set(NONE_TRIGGER, MSIX, 0, 1)[:19], errno.EINVAL)


def test_de_assigning_part_of_the_vectors(ready: Peer, efds: list[int]) -> None:
    ready.set_irqs(EVENTFD_TRIGGER, MSIX, 0, 4, fds=efds)
    before = fd_count()
    ready.set_irqs(EVENTFD_TRIGGER, MSIX, 1, 2)
    assert fd_count() == before - 2
    live = ready.function.eventfds[MSIX]
    assert live[0] >= 0 and live[1:3] == [-1, -1] and live[3] >= 0
    ready.set_irqs(NONE_TRIGGER, MSIX, 0, 4)
    assert [signalled(fd) for fd in efds] == [1, 0, 0, 1]


def test_disconnect_closes_every_eventfd(ready: Peer, efds: list[int]) -> None:
    ready.set_irqs(EVENTFD_TRIGGER, MSIX, 0, 3, fds=efds[:3])
    ready.set_irqs(EVENTFD_TRIGGER, INTX, 0, 1, fds=[efds[3]])
    before = fd_count()
    ready.disconnect()
    assert fd_count() == before - 5  # four copies and our end of the socket
    assert set(ready.function.eventfds[MSIX]) == {-1} and ready.function.eventfds[INTX] == [-1]
