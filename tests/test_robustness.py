"""Hostile input from the guest: random registers, random commands, failing Doorbell Buffer Config.

Oracle everywhere: no exception leaves the controller, no internal error turns into CFS, every
submitted command completes (or the controller reports CFS for a guest-caused fatal condition),
and afterwards a reset and a fresh probe bring a working controller back. Long campaigns:
``python scripts/fuzz.py`` (see tests/fuzzing.py).
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuzzing import CAMPAIGN, campaign, counted
from host import Rig, make_rig
from vnvme.driver.transport import PAGE_SIZE
from vnvme.memory import GuestMemoryError
from vnvme.spec import registers as regs
from vnvme.spec.commands import AdminOpcode, NvmOpcode, Sqe
from vnvme.spec.registers import CSTS, Reg
from vnvme.spec.status import DNR, Status

_HOST_MEMORY = 4 << 20

if CAMPAIGN:  # long campaigns (scripts/fuzz.py): no whole-test timeout
    pytestmark = pytest.mark.timeout(0)
_UNMAPPED = 0x7_0000_0000


def _small_rig(**options: object) -> Rig:
    return make_rig(host_memory_size=_HOST_MEMORY, io_queue_depth=16, trace=("pci_nvme_err_*",), **options)  # type: ignore[arg-type]


def _no_internal_errors(r: Rig) -> None:
    internal = [reason for reason in r.transport.fatal_reasons if "internal error" in reason]
    assert internal == []
    assert r.controller.statistics().internal_errors == 0


def _recovers(r: Rig) -> None:
    r.driver.reset_controller()
    assert not CSTS.CFS.get(r.driver.read_reg(Reg.CSTS))
    r.driver.write(1, 5, b"\x5a" * 512)
    assert r.driver.read(1, 5, 1) == b"\x5a" * 512


_register_offsets = st.one_of(
    st.sampled_from([int(reg) for reg in Reg]),
    st.integers(0, 0x3F).map(lambda dw: dw * 4),
    st.integers(0, 64).map(lambda db: regs.DOORBELL_BASE + 4 * db),
    st.integers(0, 0x3000),
)
_register_values = st.one_of(
    st.integers(0, 0xFFFF_FFFF),
    st.sampled_from([0, 1, 0x460001, 0x460000, 0x460001 | (1 << 14), 0xFFFF_FFFF, 15, 16, 1023, 1024]),
)
_access = st.tuples(st.booleans(), _register_offsets, st.sampled_from([1, 2, 4, 8]), _register_values)


@campaign()
@given(st.lists(_access, max_size=40))
@counted
def test_random_register_accesses_never_break_the_controller(
    accesses: list[tuple[bool, int, int, int]],
) -> None:
    r = _small_rig()
    try:
        for is_write, offset, size, value in accesses:
            if is_write:
                r.transport.mmio_write(offset, size, value & ((1 << (8 * size)) - 1))
            else:
                value = r.transport.mmio_read(offset, size)
                assert 0 <= value < 1 << (8 * size)
        _no_internal_errors(r)
        _recovers(r)
        _no_internal_errors(r)
    finally:
        r.close()


def _address(r: Rig) -> st.SearchStrategy[int]:
    base = r.host_memory.base
    return st.one_of(
        st.just(0),
        st.integers(base, base + _HOST_MEMORY - 1),  # anywhere in mapped memory, any alignment
        st.integers(0, _HOST_MEMORY // PAGE_SIZE - 1).map(lambda p: base + p * PAGE_SIZE),
        st.integers(_UNMAPPED, _UNMAPPED + (1 << 20)),
        st.just(base + _HOST_MEMORY - 8),  # straddles the end of the mapping
        st.integers(0, (1 << 64) - 1),
    )


@st.composite
def _sqes(draw: st.DrawFn, r: Rig, opcodes: list[int]) -> Sqe:
    address = _address(r)
    dword = st.one_of(st.integers(0, 0xFFFF_FFFF), st.integers(0, 64), st.just(0))
    return Sqe(
        draw(st.one_of(st.sampled_from(opcodes), st.integers(0, 255))),
        draw(st.one_of(st.just(0), st.sampled_from([0x40, 0x80, 0xC0, 0x01, 0x02]), st.integers(0, 255))),
        0,
        draw(st.one_of(st.sampled_from([0, 1, 2, 3, 0xFFFF_FFFF]), st.integers(0, 0xFFFF_FFFF))),
        0,
        0,
        draw(address),
        draw(address),
        draw(address),
        draw(dword),
        draw(dword),
        draw(dword),
        draw(dword),
        draw(dword),
        draw(dword),
    )


def _submit_all(r: Rig, qid: int, sqes: list[Sqe]) -> None:
    qp = r.driver.admin if qid == 0 else r.driver.queue(qid)
    assert qp is not None
    cids = []
    for sqe in sqes:
        cids.append(qp.submit(sqe))
        qp.ring_sq()
        # Every command completes: the driver would time out (NvmeTimeout) otherwise.
        if not CSTS.CFS.get(r.controller.csts):
            cqe = r.driver._wait_cid(qp, cids[-1])
            assert cqe.cid == cids[-1]


_NEVER_COMPLETES = {int(AdminOpcode.ASYNC_EVENT_REQUEST)}


@campaign()
@given(st.data())
@counted
def test_random_admin_commands(data: st.DataObject) -> None:
    r = _small_rig(async_events=False)
    try:
        opcodes = [int(op) for op in AdminOpcode if op not in _NEVER_COMPLETES]
        sqes = data.draw(st.lists(_sqes(r, opcodes), max_size=12))
        sqes = [s for s in sqes if s.opcode not in _NEVER_COMPLETES]
        _submit_all(r, 0, sqes)
        _no_internal_errors(r)
        _recovers(r)
    finally:
        r.close()


@campaign()
@given(st.data())
@counted
def test_random_io_commands(data: st.DataObject) -> None:
    r = _small_rig()
    try:
        sqes = data.draw(st.lists(_sqes(r, [int(op) for op in NvmOpcode]), max_size=12))
        _submit_all(r, 1, sqes)
        _no_internal_errors(r)
        _recovers(r)
    finally:
        r.close()


@campaign()
@given(st.lists(st.tuples(st.integers(0, 1023), st.integers(0, 0xFFFF_FFFF)), max_size=30))
@counted
def test_scribbled_shadow_and_eventidx_pages(scribbles: list[tuple[int, int]]) -> None:
    """The host writes garbage over both pages between I/Os: commands may fail, nothing breaks."""
    r = _small_rig()
    try:
        assert r.driver.dbbuf_pages is not None
        shadow, eventidx = r.driver.dbbuf_pages
        for i, (slot, value) in enumerate(scribbles):
            page = shadow if i % 2 else eventidx
            page.view[slot * 4 : slot * 4 + 4] = value.to_bytes(4, "little")
            qp = r.driver.queue(1)
            if qp.can_submit():
                qp.submit(r.driver.io_sqe(qp, NvmOpcode.FLUSH, 1))
                qp.ring_sq()
            r.transport.device_idle()
            qp.reap()
        _no_internal_errors(r)
        _recovers(r)
    finally:
        r.close()


def test_doorbell_beyond_queue_size_is_an_async_event_not_a_crash() -> None:
    r = _small_rig(shadow_doorbells=False)
    try:
        qp = r.driver.queue(1)
        r.transport.mmio_write(qp.sq_db, 4, qp.depth + 3)
        names = {e.name for e in r.trace.events}
        assert any(n.startswith("pci_nvme_err_") for n in names)
        assert not CSTS.CFS.get(r.controller.csts)
        _recovers(r)
    finally:
        r.close()


@pytest.mark.pure_python
def test_driver_carries_on_when_doorbell_buffer_config_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    r = _small_rig(probe=False)
    try:

        def unmapped(shadow_addr: int, eventidx_addr: int) -> None:
            raise GuestMemoryError(shadow_addr, PAGE_SIZE, "pretend unmapped")

        monkeypatch.setattr(r.controller, "configure_dbbuf", unmapped)
        r.driver.probe()
        assert not r.driver.dbbuf_enabled
        assert r.driver.dbbuf_pages is None  # freed, as Linux does
        assert r.driver.queue(1).shadow is None
        before = r.driver.stats.sq_doorbell_mmio + r.driver.stats.cq_doorbell_mmio
        r.driver.write(1, 0, b"\x33" * 512)
        assert r.driver.read(1, 0, 1) == b"\x33" * 512
        after = r.driver.stats.sq_doorbell_mmio + r.driver.stats.cq_doorbell_mmio
        assert after - before == 4  # plain doorbells: SQ tail + CQ head for each command
        cqe = r.driver.admin_command(
            AdminOpcode.DOORBELL_BUFFER_CONFIG, prp1=_UNMAPPED, prp2=_UNMAPPED + PAGE_SIZE, check=False
        )
        assert cqe.status == Status.DATA_TRANSFER_ERROR | DNR
        _no_internal_errors(r)
    finally:
        r.close()
