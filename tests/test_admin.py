"""Admin command set through the host driver, and raw admin commands where the driver would not
send the bad input: Identify, queue creation / deletion, features, log pages, Asynchronous Event
Request, Abort and invalid opcodes. Every failure is checked to the exact status (SCT, SC, DNR).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest

from host import Rig, make_rig
from vnvme.controller.config import ControllerConfig
from vnvme.controller.namespace import Namespace, NullBackend
from vnvme.driver.transport import PAGE_SIZE
from vnvme.spec.commands import (
    NSID_BROADCAST,
    AdminOpcode,
    AsyncEventSmartInfo,
    AsyncEventType,
    Cns,
    Cqe,
    FeatureId,
    FeatureSelect,
    LogPageId,
    NvmOpcode,
    Sqe,
    async_event_dw0,
)
from vnvme.spec.features import (
    DEFAULT_OVER_TEMPERATURE_THRESHOLD,
    DEFAULT_UNDER_TEMPERATURE_THRESHOLD,
    FeatureCapabilities,
)
from vnvme.spec.identify import (
    IDENTIFY_CONTROLLER,
    IDENTIFY_NAMESPACE,
    IDENTIFY_SIZE,
    Lpa,
    NamespaceIdType,
    Oacs,
    unpack_namespace_id_descriptors,
)
from vnvme.spec.layout import ascii_field
from vnvme.spec.log_pages import (
    ADMIN_EFFECTS_OFFSET,
    COMMANDS_SUPPORTED_AND_EFFECTS_SIZE,
    ERROR_INFORMATION_ENTRY,
    FIRMWARE_SLOT,
    IO_EFFECTS_OFFSET,
    SMART_HEALTH,
    VNVME_COUNTERS,
    VNVME_COUNTERS_LID,
    VNVME_COUNTERS_SIGNATURE,
    CommandEffects,
    CriticalWarning,
)
from vnvme.spec.registers import CAP, CC, Reg, compose
from vnvme.spec.status import DNR, Status

_UNMAPPED = 0x10_0000_0000
_SENTINEL = 0xA5


# Section: helpers


def _admin(rig: Rig, opcode: int, **fields: int) -> Cqe:
    return rig.driver.admin_command(opcode, check=False, **fields)


def _admin_read(rig: Rig, opcode: int, length: int = IDENTIFY_SIZE, **fields: int) -> tuple[Cqe, bytes]:
    """A raw admin command that returns data; the buffer is pre-filled with a sentinel so a
    failed command can be seen to have transferred nothing."""
    if length > 2 * PAGE_SIZE:
        raise ValueError("PRP1 + PRP2 cover two pages at most")
    buf = rig.host_memory.alloc(length)
    try:
        buf.view[:] = bytes([_SENTINEL]) * length
        prp2 = buf.addr + PAGE_SIZE if length > PAGE_SIZE else 0
        cqe = rig.driver.admin_command(opcode, prp1=buf.addr, prp2=prp2, check=False, **fields)
        return cqe, bytes(buf.view)
    finally:
        rig.host_memory.free(buf)


def _identify(rig: Rig, cns: int, nsid: int = 0) -> tuple[int, bytes]:
    cqe, data = _admin_read(rig, AdminOpcode.IDENTIFY, nsid=nsid, cdw10=cns)
    return cqe.status, data


def _nsid_list(data: bytes) -> list[int]:
    ids = struct.unpack(f"<{IDENTIFY_SIZE // 4}I", data)
    count = ids.index(0) if 0 in ids else len(ids)
    assert not any(ids[count:]), "the list is zero terminated and zero filled"
    return list(ids[:count])


def _get_feature(
    rig: Rig, fid: int, *, sel: int = FeatureSelect.CURRENT, cdw11: int = 0, nsid: int = 0
) -> Cqe:
    return _admin(rig, AdminOpcode.GET_FEATURES, nsid=nsid, cdw10=fid | (sel << 8), cdw11=cdw11)


def _set_feature(rig: Rig, fid: int, cdw11: int, *, save: bool = False, nsid: int = 0) -> Cqe:
    return _admin(rig, AdminOpcode.SET_FEATURES, nsid=nsid, cdw10=fid | (int(save) << 31), cdw11=cdw11)


def _log_page(
    rig: Rig,
    lid: int,
    length: int,
    *,
    offset: int = 0,
    nsid: int = 0,
    rae: bool = False,
    numd: int | None = None,
) -> tuple[Cqe, bytes]:
    """Get Log Page for ``length`` bytes, or with an explicit zero-based ``numd`` in dwords."""
    numd = length // 4 - 1 if numd is None else numd
    return _admin_read(
        rig,
        AdminOpcode.GET_LOG_PAGE,
        length,
        nsid=nsid,
        cdw10=lid | (int(rae) << 15) | ((numd & 0xFFFF) << 16),
        cdw11=numd >> 16,
        cdw12=offset & 0xFFFFFFFF,
        cdw13=offset >> 32,
    )


def _smart(rig: Rig) -> dict[str, int]:
    return SMART_HEALTH.unpack(rig.driver.get_log_page(LogPageId.SMART_HEALTH, SMART_HEALTH.size))


def _create_cq(
    rig: Rig,
    qid: int,
    entries: int,
    *,
    vector: int = 0,
    ien: bool = True,
    pc: bool = True,
    prp1: int | None = None,
) -> int:
    if prp1 is None:
        prp1 = rig.host_memory.alloc(entries * 16).addr
    cdw11 = int(pc) | (int(ien) << 1) | (vector << 16)
    cdw10 = (((entries - 1) & 0xFFFF) << 16) | qid
    return _admin(rig, AdminOpcode.CREATE_IO_CQ, prp1=prp1, cdw10=cdw10, cdw11=cdw11).status


def _create_sq(
    rig: Rig, qid: int, entries: int, cqid: int, *, pc: bool = True, prp1: int | None = None
) -> int:
    if prp1 is None:
        prp1 = rig.host_memory.alloc(entries * 64).addr
    cdw10 = (((entries - 1) & 0xFFFF) << 16) | qid
    return _admin(rig, AdminOpcode.CREATE_IO_SQ, prp1=prp1, cdw10=cdw10, cdw11=(cqid << 16) | int(pc)).status


def _delete_sq(rig: Rig, qid: int) -> int:
    return _admin(rig, AdminOpcode.DELETE_IO_SQ, cdw10=qid).status


def _delete_cq(rig: Rig, qid: int) -> int:
    return _admin(rig, AdminOpcode.DELETE_IO_CQ, cdw10=qid).status


def _submit_aer(rig: Rig) -> int:
    """An Asynchronous Event Request the driver does not track: its CQE lands in admin.results."""
    admin = rig.driver.admin
    assert admin is not None
    cid = admin.submit(Sqe(AdminOpcode.ASYNC_EVENT_REQUEST, 0, 0, 0, 0, 0, 0, 0, 0))
    admin.ring_sq()
    return cid


def _null_namespaces(*nsids: int, lba: int = 512) -> list[Namespace]:
    return [Namespace(nsid, NullBackend(1 << 20), lba) for nsid in nsids]


@pytest.fixture
def two_pair_rig() -> Iterator[Rig]:
    """Two I/O queue pairs granted by Number of Queues; pair 2 deleted again, so qid 2 is free
    and qid 3 is beyond what was granted."""
    r = make_rig(io_queues=2, io_queue_depth=64)
    try:
        r.driver.delete_io_queue_pair(r.driver.queue(2))
        yield r
    finally:
        r.close()


# Section: Identify


def test_identify_controller_matches_the_configuration() -> None:
    config = ControllerConfig(
        pci_vendor_id=0x1B36,
        pci_subsystem_vendor_id=0x1AF4,
        serial="SN-0042",
        model="vnvme admin test model",
        firmware="9.8.7",
        mdts=5,
        async_event_limit=8,
        error_log_entries=16,
    )
    r = make_rig(namespaces=_null_namespaces(1, 3), config=config)
    try:
        status, data = _identify(r, Cns.CONTROLLER)
        assert status == Status.SUCCESS
        ident = IDENTIFY_CONTROLLER.unpack(data)
        assert ident["vid"] == 0x1B36 and ident["ssvid"] == 0x1AF4
        assert ident["sn"] == ascii_field("SN-0042", 20)
        assert ident["mn"] == ascii_field("vnvme admin test model", 40)
        assert ident["fr"] == ascii_field("9.8.7", 8)
        assert ident["mdts"] == 5
        assert ident["cntlid"] == 0
        assert ident["ver"] == r.controller.mmio_read(Reg.VS, 4) == 0x00010300
        assert ident["aerl"] == 7  # zero-based
        assert ident["elpe"] == 15  # zero-based
        assert ident["nn"] == 3  # the largest NSID, inactive NSID 2 included
        assert ident["sqes"] == 0x66 and ident["cqes"] == 0x44  # required = maximum = 64 / 16 bytes
        assert ident["oacs"] == Oacs.DOORBELL_BUFFER_CONFIG
        assert ident["lpa"] == Lpa.COMMANDS_EFFECTS
        assert ident["frmw"] == 0x03  # one slot, slot 1 read-only
        assert ident["vwc"] == 0  # null namespaces: nothing is cached
        assert ident["wctemp"] == DEFAULT_OVER_TEMPERATURE_THRESHOLD
        assert ident["npss"] == 0
        assert ident["subnqn"].rstrip(b"\0") == b"nqn.2026-11.io.vnvme:SN-0042"
        # The driver read the same structure at probe.
        assert r.driver.controller_info == ident
    finally:
        r.close()


def test_identify_controller_without_doorbell_buffer_config() -> None:
    r = make_rig(config=ControllerConfig(shadow_doorbells=False, sgls=False))
    try:
        ident = r.driver.identify_controller()
        assert ident["oacs"] == 0
        assert ident["sgls"] == 0
    finally:
        r.close()


def test_identify_namespace_fields(rig: Rig) -> None:
    for nsid, lba_size, size in ((1, 512, 16 << 20), (2, 4096, 1 << 30)):
        status, data = _identify(rig, Cns.NAMESPACE, nsid)
        assert status == Status.SUCCESS
        ns = IDENTIFY_NAMESPACE.unpack(data)
        nlba = size // lba_size
        assert ns["nsze"] == ns["ncap"] == ns["nuse"] == nlba
        assert ns["nlbaf"] == 0  # one LBA format
        assert ns["flbas"] == 0  # format 0 in use, no metadata
        assert ns["lbaf0_lbads"] == lba_size.bit_length() - 1
        assert ns["lbaf0_ms"] == 0
        assert ns["nvmcap"] == size
        assert ns["eui64"] == rig.controller.namespaces[nsid].eui64
        assert ns["nguid"] == rig.controller.namespaces[nsid].nguid
        assert rig.driver.namespaces[nsid].nlba == nlba
        assert rig.driver.namespaces[nsid].lba_size == lba_size


def test_identify_namespace_of_an_inactive_nsid_is_zeroes() -> None:
    r = make_rig(namespaces=_null_namespaces(1, 3))
    try:
        status, data = _identify(r, Cns.NAMESPACE, 2)
        assert status == Status.SUCCESS
        assert data == bytes(IDENTIFY_SIZE)
    finally:
        r.close()


@pytest.mark.parametrize("nsid", [0, 3, 0xFFFFFFFE, NSID_BROADCAST])
def test_identify_namespace_of_an_invalid_nsid(rig: Rig, nsid: int) -> None:
    """NN = 2: NSID 0, NSIDs above NN and the broadcast NSID (no Namespace Management)."""
    status, data = _identify(rig, Cns.NAMESPACE, nsid)
    assert status == Status.INVALID_NAMESPACE | DNR
    assert data == bytes([_SENTINEL]) * IDENTIFY_SIZE


def test_active_namespace_list_is_ascending_and_starts_after_the_cursor() -> None:
    r = make_rig(namespaces=_null_namespaces(7, 2, 5), trace=())
    try:
        assert r.controller.nn == 7
        expected = {0: [2, 5, 7], 1: [2, 5, 7], 2: [5, 7], 3: [5, 7], 5: [7], 7: [], 0xFFFFFFFD: []}
        for cursor, ids in expected.items():
            status, data = _identify(r, Cns.ACTIVE_NAMESPACE_LIST, cursor)
            assert status == Status.SUCCESS
            assert _nsid_list(data) == ids, cursor
        for cursor in (0xFFFFFFFE, NSID_BROADCAST):
            status, _ = _identify(r, Cns.ACTIVE_NAMESPACE_LIST, cursor)
            assert status == Status.INVALID_NAMESPACE | DNR
    finally:
        r.close()


def test_active_namespace_list_holds_at_most_1024_ids() -> None:
    r = make_rig(namespaces=_null_namespaces(*range(1, 1031)), trace=())
    try:
        status, data = _identify(r, Cns.ACTIVE_NAMESPACE_LIST, 0)
        assert status == Status.SUCCESS
        assert _nsid_list(data) == list(range(1, 1025))
        status, data = _identify(r, Cns.ACTIVE_NAMESPACE_LIST, 1024)
        assert _nsid_list(data) == list(range(1025, 1031))
    finally:
        r.close()


def test_namespace_id_descriptors() -> None:
    r = make_rig(namespaces=_null_namespaces(1, 3))
    try:
        seen: set[bytes] = set()
        for nsid in (1, 3):
            status, data = _identify(r, Cns.NAMESPACE_ID_DESCRIPTORS, nsid)
            assert status == Status.SUCCESS
            ns = r.controller.namespaces[nsid]
            descriptors = unpack_namespace_id_descriptors(data)
            assert descriptors == [
                (NamespaceIdType.EUI64, ns.eui64),
                (NamespaceIdType.NGUID, ns.nguid),
                (NamespaceIdType.UUID, ns.uuid),
            ]
            # Header: NIDT, NIDL, two reserved zero bytes; after the last one, zeroes.
            assert data[:4] == bytes([NamespaceIdType.EUI64, 8, 0, 0])
            end = (4 + 8) + (4 + 16) + (4 + 16)
            assert data[end:] == bytes(IDENTIFY_SIZE - end)
            seen.update(nid for _, nid in descriptors)
        assert len(seen) == 6  # unique across namespaces
        for nsid in (0, 2, 4, NSID_BROADCAST):
            status, _ = _identify(r, Cns.NAMESPACE_ID_DESCRIPTORS, nsid)
            assert status == Status.INVALID_NAMESPACE | DNR, nsid
    finally:
        r.close()


@pytest.mark.parametrize("cns", [0x04, 0x10, 0x11, 0x12, 0x13, 0x15, 0xFF])
def test_identify_of_an_unsupported_cns_is_invalid_field(rig: Rig, cns: int) -> None:
    status, data = _identify(rig, cns, 1)
    assert status == Status.INVALID_FIELD | DNR
    assert data == bytes([_SENTINEL]) * IDENTIFY_SIZE


def test_identify_into_unmapped_memory_is_a_data_transfer_error(rig: Rig) -> None:
    cqe = _admin(rig, AdminOpcode.IDENTIFY, prp1=_UNMAPPED, cdw10=Cns.CONTROLLER)
    assert cqe.status == Status.DATA_TRANSFER_ERROR | DNR


# Section: I/O queue creation and deletion


def test_create_cq_with_an_invalid_qid(two_pair_rig: Rig) -> None:
    r = two_pair_rig
    # 0 is the admin CQ; 1 exists; 3 and up were not granted by Number of Queues (2 pairs).
    for qid in (0, 1, 3, 64, 0xFFFF):
        assert _create_cq(r, qid, 16) == Status.INVALID_QUEUE_IDENTIFIER | DNR, qid
    assert r.controller.cqs[2] is None
    assert _create_cq(r, 2, 16) == Status.SUCCESS


def test_create_sq_with_an_invalid_qid(two_pair_rig: Rig) -> None:
    r = two_pair_rig
    for qid in (0, 1, 3, 64, 0xFFFF):
        assert _create_sq(r, qid, 16, cqid=1) == Status.INVALID_QUEUE_IDENTIFIER | DNR, qid
    assert r.controller.sqs[2] is None
    assert _create_sq(r, 2, 16, cqid=1) == Status.SUCCESS


@pytest.mark.parametrize("kind", ["cq", "sq"])
def test_queue_size_limits(kind: str) -> None:
    """QSIZE is zero-based: 1 entry (QSIZE 0) and anything above CAP.MQES + 1 are Invalid Queue
    Size; 2 entries and exactly MQES + 1 entries are fine."""
    r = make_rig(config=ControllerConfig(max_queue_entries=64), io_queues=2, io_queue_depth=16)
    try:
        assert CAP.MQES.get(r.driver.read_reg(Reg.CAP)) == 63
        r.driver.delete_io_queue_pair(r.driver.queue(2))

        def create(entries: int) -> int:
            return _create_cq(r, 2, entries) if kind == "cq" else _create_sq(r, 2, entries, cqid=1)

        def delete() -> int:
            return _delete_cq(r, 2) if kind == "cq" else _delete_sq(r, 2)

        for entries in (1, 65, 0x10000):  # QSIZE 0, MQES + 1, FFFFh
            assert create(entries) == Status.INVALID_QUEUE_SIZE | DNR, entries
        for entries in (2, 64):
            assert create(entries) == Status.SUCCESS
            queue = r.controller.cqs[2] if kind == "cq" else r.controller.sqs[2]
            assert queue is not None and queue.size == entries
            assert delete() == Status.SUCCESS
    finally:
        r.close()


def test_smallest_queue_pair_carries_io(two_pair_rig: Rig) -> None:
    r = two_pair_rig
    r.driver.create_io_queue_pair(2, 2)  # one usable slot, the queue wraps on every command
    for lba in range(5):
        r.driver.write(1, lba, bytes([lba + 1]) * 512, qid=2)
    assert r.driver.read(1, 3, 1, qid=2) == b"\x04" * 512


def test_sq_on_a_missing_cq_is_completion_queue_invalid(two_pair_rig: Rig) -> None:
    r = two_pair_rig
    # CQID 0 is the admin CQ, which an I/O SQ may not use; CQ 2 and 9 do not exist.
    for cqid in (0, 2, 9, 0xFFFF):
        assert _create_sq(r, 2, 16, cqid=cqid) == Status.COMPLETION_QUEUE_INVALID | DNR, cqid
    assert r.controller.sqs[2] is None
    assert _create_cq(r, 2, 16, vector=2) == Status.SUCCESS
    assert _create_sq(r, 2, 16, cqid=2) == Status.SUCCESS


def test_cq_in_use_cannot_be_deleted(two_pair_rig: Rig) -> None:
    r = two_pair_rig
    assert _delete_cq(r, 1) == Status.INVALID_QUEUE_DELETION | DNR
    assert r.controller.cqs[1] is not None
    r.driver.write(1, 0, b"\x01" * 512)  # the pair still works
    # A second SQ on CQ 1: deleting SQ 1 is not enough.
    assert _create_sq(r, 2, 16, cqid=1) == Status.SUCCESS
    assert _delete_sq(r, 1) == Status.SUCCESS
    assert _delete_cq(r, 1) == Status.INVALID_QUEUE_DELETION | DNR
    assert _delete_sq(r, 2) == Status.SUCCESS
    assert _delete_cq(r, 1) == Status.SUCCESS
    assert r.controller.cqs[1] is None and r.controller.sqs[1] is None


def test_delete_of_a_missing_or_admin_queue_is_invalid_qid(two_pair_rig: Rig) -> None:
    r = two_pair_rig
    for qid in (0, 2, 3, 65, 0xFFFF):
        assert _delete_sq(r, qid) == Status.INVALID_QUEUE_IDENTIFIER | DNR, qid
        assert _delete_cq(r, qid) == Status.INVALID_QUEUE_IDENTIFIER | DNR, qid
    assert r.controller.sqs[0] is not None and r.controller.cqs[0] is not None
    r.driver.identify_controller()  # the admin queue is untouched


def test_invalid_interrupt_vector() -> None:
    r = make_rig(config=ControllerConfig(interrupt_vectors=8), io_queues=2, io_queue_depth=16)
    try:
        r.driver.delete_io_queue_pair(r.driver.queue(2))
        for vector in (8, 9, 0xFFFF):
            assert _create_cq(r, 2, 16, vector=vector) == Status.INVALID_INTERRUPT_VECTOR | DNR
        assert r.controller.cqs[2] is None
        assert _create_cq(r, 2, 16, vector=7) == Status.SUCCESS
        cq = r.controller.cqs[2]
        assert cq is not None and cq.ien and cq.vector == 7
    finally:
        r.close()


def test_non_contiguous_queues_are_refused_because_cap_cqr_is_set(two_pair_rig: Rig) -> None:
    r = two_pair_rig
    assert CAP.CQR.get(r.driver.read_reg(Reg.CAP)) == 1
    assert _create_cq(r, 2, 16, pc=False) == Status.INVALID_FIELD | DNR
    assert r.controller.cqs[2] is None
    assert _create_sq(r, 2, 16, cqid=1, pc=False) == Status.INVALID_FIELD | DNR
    assert r.controller.sqs[2] is None


def test_queue_base_must_be_page_aligned_and_mapped(two_pair_rig: Rig) -> None:
    r = two_pair_rig
    base = r.host_memory.alloc(2 * PAGE_SIZE).addr
    assert _create_cq(r, 2, 16, prp1=base + 0x200) == Status.PRP_OFFSET_INVALID | DNR
    assert _create_sq(r, 2, 16, cqid=1, prp1=base + 0x40) == Status.PRP_OFFSET_INVALID | DNR
    assert _create_cq(r, 2, 16, prp1=_UNMAPPED) == Status.DATA_TRANSFER_ERROR | DNR
    assert _create_sq(r, 2, 16, cqid=1, prp1=_UNMAPPED) == Status.DATA_TRANSFER_ERROR | DNR
    assert r.controller.cqs[2] is None and r.controller.sqs[2] is None


def test_failed_queue_commands_are_traced(two_pair_rig: Rig) -> None:
    r = two_pair_rig
    before = len(r.trace.named("pci_nvme_err_cmd"))
    cqe = _admin(r, AdminOpcode.DELETE_IO_CQ, cdw10=1)
    errors = r.trace.named("pci_nvme_err_cmd")[before:]
    assert [e.args[:4] for e in errors] == [
        (cqe.cid, 0, AdminOpcode.DELETE_IO_CQ, Status.INVALID_QUEUE_DELETION | DNR)
    ]


# Section: features


def test_number_of_queues_reports_the_allocation() -> None:
    """The host asks for more pairs than the controller has: it gets what there is."""
    r = make_rig(config=ControllerConfig(max_io_queues=4), io_queues=8, io_queue_depth=16)
    try:
        assert [qp.qid for qp in r.driver.io] == [1, 2, 3, 4]
        assert _get_feature(r, FeatureId.NUMBER_OF_QUEUES).dw0 == (3 << 16) | 3
        assert _get_feature(r, FeatureId.NUMBER_OF_QUEUES, sel=FeatureSelect.DEFAULT).dw0 == (3 << 16) | 3
    finally:
        r.close()


def test_number_of_queues_after_queue_creation_is_a_sequence_error(rig: Rig) -> None:
    assert _get_feature(rig, FeatureId.NUMBER_OF_QUEUES).dw0 == 0  # one pair, zero-based
    cqe = _set_feature(rig, FeatureId.NUMBER_OF_QUEUES, (3 << 16) | 3)
    assert cqe.status == Status.COMMAND_SEQUENCE_ERROR | DNR
    assert _get_feature(rig, FeatureId.NUMBER_OF_QUEUES).dw0 == 0
    # Qid 2 was not granted.
    assert _create_cq(rig, 2, 16) == Status.INVALID_QUEUE_IDENTIFIER | DNR


def test_number_of_queues_allocation_does_not_change_until_reset(rig: Rig) -> None:
    """§5.21.1.7: the value allocated shall not change between resets. Even with every I/O
    queue deleted again, a new request reports the first allocation."""
    rig.driver.delete_io_queue_pair(rig.driver.queue(1))
    cqe = _set_feature(rig, FeatureId.NUMBER_OF_QUEUES, (7 << 16) | 7)
    assert cqe.status == Status.SUCCESS and cqe.dw0 == 0
    assert _create_cq(rig, 2, 16) == Status.INVALID_QUEUE_IDENTIFIER | DNR
    # After a controller reset the next host asks again and gets what it asks for.
    rig.driver.io_queue_count = 3
    rig.driver.reset_controller()
    assert [qp.qid for qp in rig.driver.io] == [1, 2, 3]
    assert _get_feature(rig, FeatureId.NUMBER_OF_QUEUES).dw0 == (2 << 16) | 2


def test_number_of_queues_counts_sqs_and_cqs_separately(monkeypatch: pytest.MonkeyPatch) -> None:
    """A host that asks for 6 SQs and 2 CQs at bring-up, after two invalid requests (65536 queues,
    Invalid Field) that must not count as the allocation."""
    r = make_rig(probe=False, io_queue_depth=16)
    answers: list[int] = []

    def ask(count: int) -> int:
        for cdw11 in (0xFFFF, 0xFFFF << 16):
            cqe = _set_feature(r, FeatureId.NUMBER_OF_QUEUES, cdw11)
            answers.append(cqe.status)
        answers.append(r.driver.set_features(FeatureId.NUMBER_OF_QUEUES, (1 << 16) | 5))
        return 1

    try:
        monkeypatch.setattr(r.driver, "set_number_of_queues", ask)
        r.driver.probe()
        assert answers == [Status.INVALID_FIELD | DNR, Status.INVALID_FIELD | DNR, (1 << 16) | 5]
        assert _get_feature(r, FeatureId.NUMBER_OF_QUEUES).dw0 == (1 << 16) | 5
        assert _create_cq(r, 3, 16) == Status.INVALID_QUEUE_IDENTIFIER | DNR  # CQs 1-2
        assert _create_cq(r, 2, 16) == Status.SUCCESS
        assert _create_sq(r, 7, 16, cqid=2) == Status.INVALID_QUEUE_IDENTIFIER | DNR  # SQs 1-6
        for sqid in range(2, 7):
            assert _create_sq(r, sqid, 16, cqid=2) == Status.SUCCESS
    finally:
        r.close()


# (FID, a non-default value, its default) for the simple read-back features.
_SIMPLE_FEATURES = [
    (FeatureId.ARBITRATION, 0x0403_0201, 6),  # AB 6: the configured burst of 64
    (FeatureId.POWER_MANAGEMENT, 2 << 5, 0),  # PS 0, workload hint 2
    (FeatureId.ERROR_RECOVERY, 100, 0),  # TLER 10 s
    (FeatureId.INTERRUPT_COALESCING, (2 << 8) | 3, 0),
    (FeatureId.WRITE_ATOMICITY_NORMAL, 1, 0),
    (FeatureId.ASYNC_EVENT_CONFIGURATION, 0x300, 0),
]


@pytest.mark.parametrize(("fid", "value", "default"), _SIMPLE_FEATURES)
def test_set_then_get_with_each_select(rig: Rig, fid: int, value: int, default: int) -> None:
    assert _get_feature(rig, fid).dw0 == default
    assert _set_feature(rig, fid, value).status == Status.SUCCESS
    assert _get_feature(rig, fid, sel=FeatureSelect.CURRENT).dw0 == value
    # Nothing is saveable, so "saved" reads the default (Get Features, Select field).
    assert _get_feature(rig, fid, sel=FeatureSelect.DEFAULT).dw0 == default
    assert _get_feature(rig, fid, sel=FeatureSelect.SAVED).dw0 == default
    # A controller reset brings the default back.
    rig.driver.reset_controller()
    assert _get_feature(rig, fid).dw0 == default


@pytest.mark.parametrize(
    "fid",
    [
        FeatureId.ARBITRATION,
        FeatureId.POWER_MANAGEMENT,
        FeatureId.TEMPERATURE_THRESHOLD,
        FeatureId.ERROR_RECOVERY,
        FeatureId.NUMBER_OF_QUEUES,
        FeatureId.INTERRUPT_COALESCING,
        FeatureId.INTERRUPT_VECTOR_CONFIGURATION,
        FeatureId.WRITE_ATOMICITY_NORMAL,
        FeatureId.ASYNC_EVENT_CONFIGURATION,
    ],
)
def test_supported_capabilities(rig: Rig, fid: int) -> None:
    cqe = _get_feature(rig, fid, sel=FeatureSelect.SUPPORTED_CAPABILITIES)
    assert cqe.status == Status.SUCCESS
    expected = FeatureCapabilities.CHANGEABLE
    if fid == FeatureId.ERROR_RECOVERY:
        expected |= FeatureCapabilities.NAMESPACE_SPECIFIC
    assert cqe.dw0 == expected  # never saveable


@pytest.mark.parametrize("sel", [4, 5, 6, 7])
def test_reserved_select_is_invalid_field(rig: Rig, sel: int) -> None:
    assert _get_feature(rig, FeatureId.ARBITRATION, sel=sel).status == Status.INVALID_FIELD | DNR


@pytest.mark.parametrize("fid", [0x00, 0x03, 0x0C, 0x0D, 0x0E, 0x0F, 0x10, 0x7F, 0x80, 0xC0, 0xFF])
def test_unsupported_feature_is_invalid_field(rig: Rig, fid: int) -> None:
    assert _get_feature(rig, fid).status == Status.INVALID_FIELD | DNR
    assert (
        _get_feature(rig, fid, sel=FeatureSelect.SUPPORTED_CAPABILITIES).status == Status.INVALID_FIELD | DNR
    )
    assert _set_feature(rig, fid, 1).status == Status.INVALID_FIELD | DNR


def test_save_is_feature_not_saveable(rig: Rig) -> None:
    cqe = _set_feature(rig, FeatureId.ARBITRATION, 3, save=True)
    assert cqe.status == Status.FEATURE_NOT_SAVEABLE | DNR
    assert _get_feature(rig, FeatureId.ARBITRATION).dw0 == 6


def test_controller_feature_addressed_to_a_namespace(rig: Rig) -> None:
    cqe = _set_feature(rig, FeatureId.ARBITRATION, 3, nsid=1)
    assert cqe.status == Status.FEATURE_NOT_NAMESPACE_SPECIFIC | DNR
    assert _get_feature(rig, FeatureId.ARBITRATION).dw0 == 6
    assert _set_feature(rig, FeatureId.ARBITRATION, 3, nsid=NSID_BROADCAST).status == Status.SUCCESS
    # Error Recovery is namespace specific: an NSID is fine there.
    assert _set_feature(rig, FeatureId.ERROR_RECOVERY, 5, nsid=1).status == Status.SUCCESS


def test_power_state_beyond_npss(rig: Rig) -> None:
    assert rig.driver.controller_info["npss"] == 0
    for ps in (1, 31):
        assert _set_feature(rig, FeatureId.POWER_MANAGEMENT, ps).status == Status.INVALID_FIELD | DNR
    assert _get_feature(rig, FeatureId.POWER_MANAGEMENT).dw0 == 0


def test_dulbe_is_refused(rig: Rig) -> None:
    assert _set_feature(rig, FeatureId.ERROR_RECOVERY, (1 << 16) | 7).status == Status.INVALID_FIELD | DNR
    assert _get_feature(rig, FeatureId.ERROR_RECOVERY).dw0 == 0


def test_temperature_thresholds() -> None:
    r = make_rig(config=ControllerConfig(temperature_kelvin=313))
    try:
        over, under = 0, 1 << 20  # THSEL
        assert (
            _get_feature(r, FeatureId.TEMPERATURE_THRESHOLD, cdw11=over).dw0
            == DEFAULT_OVER_TEMPERATURE_THRESHOLD
        )
        assert (
            _get_feature(r, FeatureId.TEMPERATURE_THRESHOLD, cdw11=under).dw0
            == DEFAULT_UNDER_TEMPERATURE_THRESHOLD
        )
        assert _set_feature(r, FeatureId.TEMPERATURE_THRESHOLD, over | 350).status == Status.SUCCESS
        assert _set_feature(r, FeatureId.TEMPERATURE_THRESHOLD, under | 250).status == Status.SUCCESS
        assert _get_feature(r, FeatureId.TEMPERATURE_THRESHOLD, cdw11=over).dw0 == 350
        assert _get_feature(r, FeatureId.TEMPERATURE_THRESHOLD, cdw11=under).dw0 == 250
        default = FeatureSelect.DEFAULT
        assert (
            _get_feature(r, FeatureId.TEMPERATURE_THRESHOLD, sel=default, cdw11=over).dw0
            == DEFAULT_OVER_TEMPERATURE_THRESHOLD
        )
        # TMPSEL 1-8 name sensors this controller does not have; THSEL 2-3 are reserved.
        for cdw11 in (1 << 16, 8 << 16, 2 << 20, 3 << 20):
            assert (
                _set_feature(r, FeatureId.TEMPERATURE_THRESHOLD, cdw11 | 300).status
                == Status.INVALID_FIELD | DNR
            )
            assert (
                _get_feature(r, FeatureId.TEMPERATURE_THRESHOLD, cdw11=cdw11).status
                == Status.INVALID_FIELD | DNR
            )
        # TMPSEL Fh: all sensors, i.e. the composite one here.
        assert _set_feature(r, FeatureId.TEMPERATURE_THRESHOLD, (0xF << 16) | 360).status == Status.SUCCESS
        assert _get_feature(r, FeatureId.TEMPERATURE_THRESHOLD, cdw11=over).dw0 == 360
        assert _smart(r)["critical_warning"] == 0
    finally:
        r.close()


def test_crossing_the_over_temperature_threshold_raises_a_smart_event() -> None:
    r = make_rig(config=ControllerConfig(temperature_kelvin=313))
    try:
        # Not enabled in Asynchronous Event Configuration: a warning, but no event.
        assert _set_feature(r, FeatureId.TEMPERATURE_THRESHOLD, 300).status == Status.SUCCESS
        assert _smart(r)["critical_warning"] == CriticalWarning.TEMPERATURE
        r.driver.identify_controller()
        assert r.driver.async_event_log == []
        # Enabling the event reports the condition that holds now.
        assert _set_feature(r, FeatureId.ASYNC_EVENT_CONFIGURATION, CriticalWarning.TEMPERATURE).status == 0
        r.driver.identify_controller()
        assert r.driver.async_event_log == [
            async_event_dw0(
                AsyncEventType.SMART_HEALTH_STATUS,
                AsyncEventSmartInfo.TEMPERATURE_THRESHOLD,
                LogPageId.SMART_HEALTH,
            )
        ]
        # Back under the threshold: the warning clears.
        assert _set_feature(r, FeatureId.TEMPERATURE_THRESHOLD, 320).status == Status.SUCCESS
        assert _smart(r)["critical_warning"] == 0
    finally:
        r.close()


def test_interrupt_vector_configuration(rig: Rig) -> None:
    vectors = rig.controller.config.interrupt_vectors
    assert _get_feature(rig, FeatureId.INTERRUPT_VECTOR_CONFIGURATION, cdw11=1).dw0 == 1
    assert _set_feature(rig, FeatureId.INTERRUPT_VECTOR_CONFIGURATION, (1 << 16) | 1).status == 0
    assert _get_feature(rig, FeatureId.INTERRUPT_VECTOR_CONFIGURATION, cdw11=1).dw0 == (1 << 16) | 1
    assert _get_feature(rig, FeatureId.INTERRUPT_VECTOR_CONFIGURATION, cdw11=2).dw0 == 2  # per vector
    sel = FeatureSelect.DEFAULT
    assert _get_feature(rig, FeatureId.INTERRUPT_VECTOR_CONFIGURATION, sel=sel, cdw11=1).dw0 == 1
    assert rig.controller.features.coalescing_disabled(1)
    assert _set_feature(rig, FeatureId.INTERRUPT_VECTOR_CONFIGURATION, 1).status == 0
    assert not rig.controller.features.coalescing_disabled(1)
    for vector in (vectors, 0xFFFF):
        assert _get_feature(rig, FeatureId.INTERRUPT_VECTOR_CONFIGURATION, cdw11=vector).status == (
            Status.INVALID_FIELD | DNR
        )
        assert _set_feature(rig, FeatureId.INTERRUPT_VECTOR_CONFIGURATION, (1 << 16) | vector).status == (
            Status.INVALID_FIELD | DNR
        )


def test_async_event_configuration_keeps_only_defined_bits(rig: Rig) -> None:
    assert _set_feature(rig, FeatureId.ASYNC_EVENT_CONFIGURATION, 0xFFFF_FC00).status == Status.SUCCESS
    assert _get_feature(rig, FeatureId.ASYNC_EVENT_CONFIGURATION).dw0 == 0


def test_no_write_cache_without_a_caching_backend(rig: Rig) -> None:
    # ram and null namespaces: a completed write is as durable as it gets; Identify VWC = 0.
    assert not rig.driver.controller_info["vwc"] & 1
    assert _get_feature(rig, FeatureId.VOLATILE_WRITE_CACHE).dw0 == 0
    assert _set_feature(rig, FeatureId.VOLATILE_WRITE_CACHE, 1).status == Status.INVALID_FIELD | DNR
    assert not rig.controller.features.write_cache_enabled


# Section: log pages


def test_error_information_log_records_failed_commands() -> None:
    r = make_rig(config=ControllerConfig(error_log_entries=4))
    try:
        assert r.driver.controller_info["elpe"] == 3
        size = 4 * ERROR_INFORMATION_ENTRY.size
        cqe, page = _log_page(r, LogPageId.ERROR_INFORMATION, size)
        assert cqe.status == Status.SUCCESS and page == bytes(size)  # nothing failed during probe
        bad = _admin(r, 0xC1, nsid=5)
        assert bad.status == Status.INVALID_OPCODE | DNR
        cqe, page = _log_page(r, LogPageId.ERROR_INFORMATION, size)
        entry = ERROR_INFORMATION_ENTRY.unpack(page)
        assert entry["error_count"] == 1
        assert entry["sqid"] == 0 and entry["cid"] == bad.cid
        assert entry["status_field"] == (Status.INVALID_OPCODE | DNR) << 1  # phase tag bit clear
        assert entry["nsid"] == 5
        assert entry["parameter_error_location"] == 0xFFFF
        assert page[ERROR_INFORMATION_ENTRY.size :] == bytes(size - ERROR_INFORMATION_ENTRY.size)
        # An I/O command failure: newest first.
        qp = r.driver.queue(1)
        io = r.driver.io_command(qp, r.driver.io_sqe(qp, NvmOpcode.READ, 1, 1 << 40, 1), check=False)
        assert io.status == Status.LBA_OUT_OF_RANGE | DNR
        _, page = _log_page(r, LogPageId.ERROR_INFORMATION, size)
        newest, older = ERROR_INFORMATION_ENTRY.unpack(page), ERROR_INFORMATION_ENTRY.unpack(page[64:])
        assert (newest["error_count"], newest["sqid"], newest["cid"], newest["nsid"]) == (2, 1, io.cid, 1)
        assert newest["status_field"] == (Status.LBA_OUT_OF_RANGE | DNR) << 1
        assert older["error_count"] == 1
        # More failures than entries: the oldest fall off, the counter keeps going.
        for _ in range(4):
            _admin(r, 0xC1)
        _, page = _log_page(r, LogPageId.ERROR_INFORMATION, size)
        counts = [ERROR_INFORMATION_ENTRY.unpack(page[i * 64 :])["error_count"] for i in range(4)]
        assert counts == [6, 5, 4, 3]
        assert _smart(r)["error_log_entries"] == 6
    finally:
        r.close()


def test_smart_counters_follow_io(rig: Rig) -> None:
    before = _smart(rig)
    assert before["data_units_read"] == before["data_units_written"] == 0
    assert before["host_read_commands"] == before["host_write_commands"] == 0
    assert before["composite_temperature"] == rig.controller.config.temperature_kelvin
    assert before["critical_warning"] == 0
    assert before["available_spare"] == 100 and before["power_cycles"] == 1
    # 1000 blocks of 512 bytes is exactly one data unit; one more block starts the next one.
    rig.driver.write(1, 0, b"\x01" * 512_000)
    smart = _smart(rig)
    assert (smart["data_units_written"], smart["host_write_commands"]) == (1, 1)
    rig.driver.write(1, 1000, b"\x02" * 512)
    smart = _smart(rig)
    assert (smart["data_units_written"], smart["host_write_commands"]) == (2, 2)
    for lba in range(3):
        rig.driver.read(1, lba, 1)
    rig.driver.read(2, 0, 1)  # 4 KiB on the second namespace
    smart = _smart(rig)
    assert (smart["data_units_read"], smart["host_read_commands"]) == (1, 4)
    # Commands that fail, and commands that move no data, count nothing.
    qp = rig.driver.queue(1)
    rig.driver.io_command(qp, rig.driver.io_sqe(qp, NvmOpcode.READ, 1, 1 << 40, 1), check=False)
    rig.driver.flush(1)
    rig.driver.write_zeroes(1, 0, 8)
    after = _smart(rig)
    counters = ("data_units_read", "data_units_written", "host_read_commands", "host_write_commands")
    assert [after[name] for name in counters] == [smart[name] for name in counters]
    assert after["error_log_entries"] == smart["error_log_entries"] + 1


def test_smart_counts_compare_as_a_read(rig: Rig) -> None:
    rig.driver.write(1, 0, b"\x03" * 512)
    before = _smart(rig)
    assert rig.driver.compare(1, 0, b"\x03" * 512)
    after = _smart(rig)
    assert after["host_read_commands"] == before["host_read_commands"] + 1
    assert after["data_units_read"] == before["data_units_read"] + 1


@pytest.mark.parametrize("nsid", [1, 2, 3])
def test_smart_is_not_reported_per_namespace(rig: Rig, nsid: int) -> None:
    assert not rig.driver.controller_info["lpa"] & Lpa.SMART_PER_NAMESPACE
    cqe, _ = _log_page(rig, LogPageId.SMART_HEALTH, 512, nsid=nsid)
    assert cqe.status == Status.INVALID_FIELD | DNR
    cqe, _ = _log_page(rig, LogPageId.SMART_HEALTH, 512, nsid=NSID_BROADCAST)
    assert cqe.status == Status.SUCCESS


def test_firmware_slot_log(rig: Rig) -> None:
    cqe, page = _log_page(rig, LogPageId.FIRMWARE_SLOT, FIRMWARE_SLOT.size)
    assert cqe.status == Status.SUCCESS
    slots = FIRMWARE_SLOT.unpack(page)
    assert slots["afi"] == 1  # running from slot 1
    assert slots["frs1"] == ascii_field(rig.controller.config.firmware, 8) == rig.driver.controller_info["fr"]
    assert all(slots[f"frs{slot}"] == bytes(8) for slot in range(2, 8))


@pytest.mark.parametrize("shadow_doorbells", [True, False])
def test_commands_supported_and_effects(shadow_doorbells: bool) -> None:
    r = make_rig(config=ControllerConfig(shadow_doorbells=shadow_doorbells))
    try:
        assert r.driver.controller_info["lpa"] & Lpa.COMMANDS_EFFECTS
        cqe, page = _log_page(
            r, LogPageId.COMMANDS_SUPPORTED_AND_EFFECTS, COMMANDS_SUPPORTED_AND_EFFECTS_SIZE
        )
        assert cqe.status == Status.SUCCESS
        admin = struct.unpack_from("<256I", page, ADMIN_EFFECTS_OFFSET)
        io = struct.unpack_from("<256I", page, IO_EFFECTS_OFFSET)
        supported_admin = {op for op in range(256) if admin[op] & CommandEffects.CSUPP}
        supported_io = {op for op in range(256) if io[op] & CommandEffects.CSUPP}
        assert supported_admin == set(r.controller.admin_handlers)
        assert supported_io == set(r.controller.io_handlers)
        assert (AdminOpcode.DOORBELL_BUFFER_CONFIG in supported_admin) == shadow_doorbells
        # Every unsupported opcode reads as zero; writes change logical block content.
        assert all(admin[op] == 0 for op in range(256) if op not in supported_admin)
        changes_data = {op for op in range(256) if io[op] & CommandEffects.LBCC}
        assert changes_data == {NvmOpcode.WRITE, NvmOpcode.WRITE_ZEROES, NvmOpcode.DATASET_MANAGEMENT}
        assert page[2048:] == bytes(2048)  # reserved
        # Every opcode the page does not list is Invalid Opcode, admin and I/O alike.
        for opcode in set(range(256)) - supported_admin:
            assert _admin(r, opcode).status == Status.INVALID_OPCODE | DNR, opcode
        qp = r.driver.queue(1)
        for opcode in set(range(256)) - supported_io:
            sqe = Sqe(opcode, 0, 0, 1, 0, 0, 0, 0, 0)
            assert r.driver.io_command(qp, sqe, check=False).status == Status.INVALID_OPCODE | DNR, opcode
    finally:
        r.close()


@pytest.mark.parametrize("lid", [0x00, 0x04, 0x06, 0x07, 0x0D, 0x70, 0x80, 0x81, 0xC1, 0xFF])
def test_unsupported_log_page(rig: Rig, lid: int) -> None:
    cqe, data = _log_page(rig, lid, 512)
    assert cqe.status == Status.INVALID_LOG_PAGE | DNR
    assert data == bytes([_SENTINEL]) * 512


def test_vnvme_counters_log_page(rig: Rig) -> None:
    """The vendor-specific page C0h carries the controller's doorbell counters, live."""
    rig.driver.write(1, 0, b"\x05" * 4096)
    cqe, data = _log_page(rig, VNVME_COUNTERS_LID, 512)
    assert cqe.status == Status.SUCCESS
    page = VNVME_COUNTERS.unpack(data)
    stats = rig.controller.statistics()
    assert page["signature"] == VNVME_COUNTERS_SIGNATURE
    assert page["enables"] == rig.controller.enable_count == 1
    # The snapshot is taken after the SQ doorbell of the Get Log Page itself, before its CQ doorbell.
    assert page["doorbell_sq_admin"] == stats.doorbell_sq_admin > 0
    assert page["doorbell_cq_admin"] <= stats.doorbell_cq_admin
    assert page["doorbell_sq_io"] == stats.doorbell_sq_io > 0
    assert page["completions_posted"] >= 2
    assert page["internal_errors"] == 0
    assert page["io_commands"] == 1  # the write


def test_log_page_offset_and_length(rig: Rig) -> None:
    rig.driver.write(1, 0, b"\x09" * 4096)
    _, full = _log_page(rig, LogPageId.SMART_HEALTH, 512)
    # A dword-aligned window anywhere in the page: exactly NUMD + 1 dwords move.
    cqe, part = _log_page(rig, LogPageId.SMART_HEALTH, 64, numd=3, offset=48)
    assert cqe.status == Status.SUCCESS
    assert part[:16] == full[48:64]
    assert part[16:] == bytes([_SENTINEL]) * 48
    # One dword (NUMD 0) at the very end.
    cqe, last = _log_page(rig, LogPageId.SMART_HEALTH, 4, offset=508)
    assert cqe.status == Status.SUCCESS and last[:4] == full[508:]
    # More than the page: the rest reads as zeroes.
    cqe, longer = _log_page(rig, LogPageId.SMART_HEALTH, 1024)
    assert cqe.status == Status.SUCCESS
    assert longer[:512] == full and longer[512:] == bytes(512)
    # Past the end (LPOL or LPOU), or not dword aligned: Invalid Field.
    for offset in (512, 4096, 1 << 32, 2, 49):
        cqe, data = _log_page(rig, LogPageId.SMART_HEALTH, 16, offset=offset)
        assert cqe.status == Status.INVALID_FIELD | DNR, offset
        assert data == bytes([_SENTINEL]) * len(data)


def test_log_page_numdu_counts_and_mdts_limits(rig: Rig) -> None:
    """NUMD = NUMDU:NUMDL, zero-based dwords; beyond MDTS (2^7 4 KiB pages) is Invalid Field."""
    max_transfer = (1 << rig.driver.controller_info["mdts"]) * PAGE_SIZE
    numd = max_transfer // 4  # one dword more than MDTS allows
    assert numd >> 16 == 2  # NUMDU is in use
    cqe, _ = _log_page(rig, LogPageId.ERROR_INFORMATION, 64, numd=numd)
    assert cqe.status == Status.INVALID_FIELD | DNR
    trace = rig.trace.named("pci_nvme_get_log")[-1]
    assert trace.args[4] == max_transfer + 4  # len


# Section: Asynchronous Event Request, Abort, opcodes


def test_async_event_request_limit(rig: Rig) -> None:
    limit = rig.driver.controller_info["aerl"] + 1
    assert limit == rig.controller.config.async_event_limit == 4
    assert len(rig.controller.async_events.outstanding) == 1  # the driver's own
    for _ in range(limit - 1):
        _submit_aer(rig)
    assert len(rig.controller.async_events.outstanding) == limit
    cqe = _admin(rig, AdminOpcode.ASYNC_EVENT_REQUEST)
    assert cqe.status == Status.ASYNC_EVENT_REQUEST_LIMIT_EXCEEDED | DNR
    assert len(rig.controller.async_events.outstanding) == limit
    # A controller reset drops them; the new driver session posts its one request.
    rig.driver.reset_controller()
    assert len(rig.controller.async_events.outstanding) == 1


def test_abort_of_an_outstanding_aer(rig: Rig) -> None:
    admin = rig.driver.admin
    assert admin is not None
    target = _submit_aer(rig)
    cqe = _admin(rig, AdminOpcode.ABORT, cdw10=target << 16)  # SQID 0
    assert cqe.status == Status.SUCCESS
    assert cqe.dw0 & 1 == 0  # aborted
    aborted = admin.results.pop(target)
    assert aborted.status == Status.ABORT_REQUESTED and aborted.sqid == 0
    # Gone now: a second Abort finds nothing.
    cqe = _admin(rig, AdminOpcode.ABORT, cdw10=target << 16)
    assert cqe.status == Status.SUCCESS and cqe.dw0 & 1 == 1


def test_abort_of_a_command_that_already_completed(rig: Rig) -> None:
    rig.driver.write(1, 0, b"\x05" * 512)
    for sqid, cid in ((1, 0), (0, 0x1234), (7, 3)):
        cqe = _admin(rig, AdminOpcode.ABORT, cdw10=sqid | (cid << 16))
        assert cqe.status == Status.SUCCESS and cqe.dw0 & 1 == 1, (sqid, cid)


@pytest.mark.parametrize(
    "opcode",
    [
        0x03,
        0x07,
        0x0B,
        AdminOpcode.NAMESPACE_MANAGEMENT,
        AdminOpcode.FIRMWARE_COMMIT,
        AdminOpcode.KEEP_ALIVE,
        AdminOpcode.FORMAT_NVM,
        AdminOpcode.SANITIZE,
        0xC0,
        0xFF,
    ],
)
def test_unknown_admin_opcode(rig: Rig, opcode: int) -> None:
    before = rig.controller.statistics().error_completions
    cqe = _admin(rig, opcode, nsid=1)
    assert cqe.status == Status.INVALID_OPCODE | DNR
    assert rig.controller.statistics().error_completions == before + 1
    event = rig.trace.named("pci_nvme_err_cmd")[-1]
    assert event.args[:4] == (cqe.cid, 0, opcode, Status.INVALID_OPCODE | DNR)
    rig.driver.identify_controller()  # the queue carries on


def test_fused_admin_command_is_invalid_field(rig: Rig) -> None:
    cqe = _admin(rig, AdminOpcode.IDENTIFY, flags=0b01, cdw10=Cns.CONTROLLER)
    assert cqe.status == Status.INVALID_FIELD | DNR


def test_cc_iosqes_and_iocqes_are_checked_at_queue_creation(two_pair_rig: Rig) -> None:
    """CC.IOSQES / IOCQES are only needed for I/O queues (§7.6.1); with values other than the
    Identify SQES / CQES sizes, queue creation fails and nothing is created."""
    r = two_pair_rig
    cc = r.controller.mmio_read(Reg.CC, 4)
    r.controller.mmio_write(Reg.CC, 4, CC.IOCQES.put(cc, 5))
    assert _create_cq(r, 2, 16) == Status.INVALID_FIELD | DNR
    r.controller.mmio_write(Reg.CC, 4, CC.IOSQES.put(cc, 7))
    assert _create_sq(r, 2, 16, cqid=1) == Status.INVALID_FIELD | DNR
    assert r.controller.cqs[2] is None and r.controller.sqs[2] is None
    r.controller.mmio_write(Reg.CC, 4, cc)
    assert compose((CC.IOSQES, 6), (CC.IOCQES, 4)) == cc & (CC.IOSQES.mask | CC.IOCQES.mask)
    assert _create_cq(r, 2, 16) == Status.SUCCESS
    assert _create_sq(r, 2, 16, cqid=2) == Status.SUCCESS
