"""REGION_WRITE_MULTI: a batch of small (at most 8 byte) region writes in one message."""

from __future__ import annotations

import errno
import os

import pytest

from vfio_user.peer import Peer, fd_count, memfd
from vnvme.spec.registers import Reg
from vnvme.vfio_user import protocol as vu
from vnvme.vfio_user.protocol import Command
from vnvme.vfio_user.server import Region

BAR0 = vu.PciRegion.BAR0
BAR4 = vu.PciRegion.BAR4
CONFIG = vu.PciRegion.CONFIG


def _entry(offset: int, region: int, data: bytes, count: int | None = None) -> bytes:
    return vu.WRITE_MULTI_ENTRY.pack(
        offset, region, len(data) if count is None else count, data.ljust(8, b"\0")
    )


def _multi(*entries: bytes, wr_cnt: int | None = None) -> bytes:
    return vu.WRITE_MULTI_COUNT.pack(len(entries) if wr_cnt is None else wr_cnt) + b"".join(entries)


def test_region_write_multi(ready: Peer) -> None:
    entries = [
        vu.WRITE_MULTI_ENTRY.pack(Reg.INTMS, 0, 4, (3).to_bytes(4, "little") + b"\0" * 4),
        vu.WRITE_MULTI_ENTRY.pack(Reg.INTMC, 0, 4, (1).to_bytes(4, "little") + b"\0" * 4),
    ]
    reply = ready.call(Command.REGION_WRITE_MULTI, vu.WRITE_MULTI_COUNT.pack(2) + b"".join(entries))
    assert vu.WRITE_MULTI_COUNT.unpack(reply.payload) == (2,)
    assert ready.function.controller.intms == 2
    ready.expect_error(Command.REGION_WRITE_MULTI, vu.WRITE_MULTI_COUNT.pack(3) + entries[0], errno.EINVAL)


def test_writes_land_in_order_across_regions(ready: Peer) -> None:
    reply = ready.ok(
        Command.REGION_WRITE_MULTI,
        _multi(
            _entry(Reg.AQA, BAR0, (1).to_bytes(4, "little")),
            _entry(0x04, CONFIG, b"\x06\x00"),  # 2 bytes: only those are written
            _entry(Reg.AQA, BAR0, (2).to_bytes(4, "little")),  # the later one wins
            _entry(16, BAR4, (0xFEE0_0000).to_bytes(8, "little")),
            _entry(Reg.ASQ, BAR0, (0x1_2345_6000).to_bytes(8, "little")),
            _entry(0x3C, CONFIG, b"\x0a"),
        ),
    )
    assert reply.payload == vu.WRITE_MULTI_COUNT.pack(6) and not reply.fds
    ctrl = ready.function.controller
    assert ctrl.aqa == 2 and ctrl.asq == 0x1_2345_6000
    assert ready.read(CONFIG, 0x04, 4) == b"\x06\x00\x10\x00"  # Status untouched by the padding
    assert ready.read_int(CONFIG, 0x3C, 2) == 0x010A
    assert ready.read_int(BAR4, 16, 8) == 0xFEE0_0000


def test_no_writes_at_all(ready: Peer) -> None:
    reply = ready.ok(Command.REGION_WRITE_MULTI, _multi())
    assert reply.payload == vu.WRITE_MULTI_COUNT.pack(0)


def test_an_entry_longer_than_eight_bytes_is_einval_and_nothing_is_written(ready: Peer) -> None:
    ready.expect_error(
        Command.REGION_WRITE_MULTI,
        _multi(_entry(Reg.AQA, BAR0, (7).to_bytes(4, "little")), _entry(0x100, CONFIG, b"\0" * 8, count=9)),
        errno.EINVAL,
    )
    assert ready.function.controller.aqa == 0


@pytest.mark.parametrize(
    "bad",
    [
        _entry(0, 3, b"\0" * 4),  # no such region
        _entry(4094, CONFIG, b"\0" * 4),  # beyond its end
        _entry(0, CONFIG, b"", count=0),  # zero bytes
    ],
    ids=["no-region", "beyond-end", "zero-bytes"],
)
def test_a_bad_entry_anywhere_refuses_the_whole_message(ready: Peer, bad: bytes) -> None:
    first = _entry(Reg.AQA, BAR0, (7).to_bytes(4, "little"))
    ready.expect_error(Command.REGION_WRITE_MULTI, _multi(first, bad), errno.EINVAL)
    assert ready.function.controller.aqa == 0


def test_a_pba_write_is_eperm(ready: Peer) -> None:
    fn = ready.function
    fn._raise(2)
    ready.expect_error(
        Command.REGION_WRITE_MULTI, _multi(_entry(fn.pba_offset, BAR4, b"\0" * 8)), errno.EPERM
    )
    assert ready.read_int(BAR4, fn.pba_offset, 8) == 1 << 2
    # The device refuses that one write when it comes to it: the writes before it took effect.
    ready.expect_error(
        Command.REGION_WRITE_MULTI,
        _multi(_entry(Reg.AQA, BAR0, (7).to_bytes(4, "little")), _entry(fn.pba_offset, BAR4, b"\0" * 4)),
        errno.EPERM,
    )
    assert fn.controller.aqa == 7


def test_a_region_that_cannot_be_written_is_eperm_before_any_write(ready: Peer) -> None:
    fn = ready.function
    fn.regions[CONFIG] = Region(CONFIG, 4096, fn._config_read, None)
    ready.expect_error(
        Command.REGION_WRITE_MULTI,
        _multi(_entry(Reg.AQA, BAR0, (7).to_bytes(4, "little")), _entry(0x04, CONFIG, b"\x06\x00")),
        errno.EPERM,
    )
    assert fn.controller.aqa == 0


def test_a_device_refusing_a_width_is_einval(ready: Peer) -> None:
    ready.expect_error(Command.REGION_WRITE_MULTI, _multi(_entry(2, BAR4, b"\0" * 4)), errno.EINVAL)
    ready.expect_error(Command.REGION_WRITE_MULTI, _multi(_entry(Reg.AQA, BAR0, b"\0" * 3)), errno.EINVAL)


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\x01\0\0\0",  # a short count
        _multi(_entry(Reg.AQA, BAR0, b"\0" * 4), wr_cnt=2),  # fewer entries than counted
        _multi(_entry(Reg.AQA, BAR0, b"\0" * 4), _entry(Reg.AQA, BAR0, b"\0" * 4), wr_cnt=1),  # more
        _multi(_entry(Reg.AQA, BAR0, b"\0" * 4)) + b"\0",  # a stray byte
        _multi(_entry(Reg.AQA, BAR0, b"\0" * 4))[:-1],  # a short entry
        _multi(wr_cnt=1 << 63),
        _multi(_entry(Reg.AQA, BAR0, b"\0" * 4), wr_cnt=(1 << 64) - 1),
    ],
    ids=["empty", "short-count", "fewer", "more", "stray-byte", "short-entry", "huge", "max"],
)
def test_counts_that_disagree_with_the_message(ready: Peer, payload: bytes) -> None:
    ready.expect_error(Command.REGION_WRITE_MULTI, payload, errno.EINVAL)
    assert ready.function.controller.aqa == 0


def test_posted(ready: Peer) -> None:
    entries = _multi(*(_entry(Reg.AQA, BAR0, value.to_bytes(4, "little")) for value in range(1, 201)))
    ready.send(Command.REGION_WRITE_MULTI, entries, flags=vu.FLAG_NO_REPLY)
    ready.send(Command.REGION_WRITE_MULTI, _multi(_entry(0, 3, b"\0")), flags=vu.FLAG_NO_REPLY)  # refused
    ready.assert_silent()
    assert ready.read_int(BAR0, Reg.AQA, 4) == 200
    assert ready.server.errors["REGION_WRITE_MULTI"] == 1


def test_a_descriptor_is_refused_and_closed(ready: Peer) -> None:
    fd = memfd()
    try:
        before = fd_count()
        ready.expect_error(
            Command.REGION_WRITE_MULTI, _multi(_entry(Reg.AQA, BAR0, b"\x01\0\0\0")), errno.EINVAL, [fd]
        )
        assert fd_count() == before and ready.function.controller.aqa == 0
    finally:
        os.close(fd)
