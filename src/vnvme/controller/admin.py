"""Admin command set (NVMe 1.3 §5): queues, Identify, features, log pages, asynchronous events,
Abort and Doorbell Buffer Config."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from vnvme.controller.admin_features import get_features, set_features
from vnvme.controller.context import io_queue
from vnvme.controller.errors import refused
from vnvme.controller.nvm import IO_EFFECTS
from vnvme.controller.queues import CompletionQueue, SubmissionQueue
from vnvme.controller.transfer import CDW10, CDW11, CDW12, CDW13, CID, NSID, PRP1, PRP2, send_to_host
from vnvme.memory import GuestMemoryError
from vnvme.spec import features as feat
from vnvme.spec.commands import (
    CQE_SIZE,
    CQE_SIZE_LOG2,
    NSID_BROADCAST,
    SQE_SIZE,
    SQE_SIZE_LOG2,
    AbortFields,
    AdminOpcode,
    AsyncEventType,
    Cns,
    CreateQueue,
    DeleteQueue,
    GetLogPage,
    LogPageId,
)
from vnvme.spec.dbbuf import cq_slot, sq_slot
from vnvme.spec.identify import (
    ACTIVE_NAMESPACE_LIST_ENTRIES,
    DLFEAT_READ_ZEROES,
    DLFEAT_WRITE_ZEROES_DEALLOCATE,
    IDENTIFY_CONTROLLER,
    IDENTIFY_NAMESPACE,
    IDENTIFY_SIZE,
    NSATTR_WRITE_PROTECTED,
    Lpa,
    NamespaceIdType,
    Oacs,
    Oncs,
    pack_namespace_id_descriptors,
)
from vnvme.spec.layout import ascii_field
from vnvme.spec.log_pages import (
    ADMIN_EFFECTS_OFFSET,
    COMMANDS_SUPPORTED_AND_EFFECTS_SIZE,
    FIRMWARE_SLOT,
    IO_EFFECTS_OFFSET,
    SMART_HEALTH,
    VNVME_COUNTERS,
    VNVME_COUNTERS_LID,
    VNVME_COUNTERS_SIGNATURE,
    VNVME_QUEUE_ROW,
    VNVME_QUEUE_ROWS,
    VNVME_QUEUE_ROWS_OFFSET,
    CommandEffects,
)
from vnvme.spec.registers import CC
from vnvme.spec.status import Status

if TYPE_CHECKING:
    from vnvme.controller.context import AdminContext

Result = tuple[int, int] | None
Handler = Callable[["AdminContext", SubmissionQueue, tuple[int, ...]], Result]

_SUCCESS: Final = (0, 0)


# Section: queue management


def create_io_cq(ctrl: AdminContext, sq: SubmissionQueue, f: tuple[int, ...]) -> Result:
    cdw10, cdw11, prp1 = f[CDW10], f[CDW11], f[PRP1]
    qid = CreateQueue.QID.get(cdw10)
    size = CreateQueue.QSIZE.get(cdw10) + 1
    ien = bool(CreateQueue.IEN.get(cdw11))
    vector = CreateQueue.IV.get(cdw11)
    if ctrl.tracing:
        ctrl.trace("pci_nvme_create_cq", qid, vector, size, cdw11 & 0xFFFF, int(ien))
    if qid == 0 or qid > ctrl.features.ncqa + 1 or ctrl.cqs[qid] is not None:
        raise refused(Status.INVALID_QUEUE_IDENTIFIER, f"invalid cqid {qid}")
    if size < 2 or size > ctrl.config.max_queue_entries:
        raise refused(Status.INVALID_QUEUE_SIZE, f"CQ size {size}")
    if not CreateQueue.PC.get(cdw11):
        # CAP.CQR = 1: physically contiguous queues required.
        raise refused(Status.INVALID_FIELD, "PC = 0 but CAP.CQR is set")
    if ien and vector >= ctrl.config.interrupt_vectors:
        raise refused(Status.INVALID_INTERRUPT_VECTOR, f"vector {vector}")
    if CC.IOCQES.get(ctrl.cc) != CQE_SIZE_LOG2:
        raise refused(Status.INVALID_FIELD, f"CC.IOCQES is {CC.IOCQES.get(ctrl.cc)}, not 4")
    if prp1 & (ctrl.page_size - 1):
        raise refused(Status.PRP_OFFSET_INVALID, f"CQ base {prp1:#x} not page aligned")
    try:
        view, remote = ctrl.memory.window(prp1, size * CQE_SIZE, write=True)
    except GuestMemoryError as exc:
        raise refused(Status.DATA_TRANSFER_ERROR, str(exc)) from None
    cq = CompletionQueue(qid, size, prp1, view, cq_slot(qid, ctrl.dstrd), ien=ien, vector=vector)
    cq.remote = remote
    ctrl.add_cq(cq)
    return _SUCCESS


def create_io_sq(ctrl: AdminContext, sq: SubmissionQueue, f: tuple[int, ...]) -> Result:
    cdw10, cdw11, prp1 = f[CDW10], f[CDW11], f[PRP1]
    qid = CreateQueue.QID.get(cdw10)
    size = CreateQueue.QSIZE.get(cdw10) + 1
    cqid = CreateQueue.CQID.get(cdw11)
    if ctrl.tracing:
        ctrl.trace("pci_nvme_create_sq", qid, cqid, size, cdw11 & 0xFFFF)
    if qid == 0 or qid > ctrl.features.nsqa + 1 or ctrl.sqs[qid] is not None:
        raise refused(Status.INVALID_QUEUE_IDENTIFIER, f"invalid sqid {qid}")
    cq = io_queue(ctrl.cqs, cqid)
    if cq is None:
        raise refused(Status.COMPLETION_QUEUE_INVALID, f"cqid {cqid} does not exist")
    if size < 2 or size > ctrl.config.max_queue_entries:
        raise refused(Status.INVALID_QUEUE_SIZE, f"SQ size {size}")
    if not CreateQueue.PC.get(cdw11):
        raise refused(Status.INVALID_FIELD, "PC = 0 but CAP.CQR is set")
    if CC.IOSQES.get(ctrl.cc) != SQE_SIZE_LOG2:
        raise refused(Status.INVALID_FIELD, f"CC.IOSQES is {CC.IOSQES.get(ctrl.cc)}, not 6")
    if prp1 & (ctrl.page_size - 1):
        raise refused(Status.PRP_OFFSET_INVALID, f"SQ base {prp1:#x} not page aligned")
    try:
        view, remote = ctrl.memory.window(prp1, size * SQE_SIZE)
    except GuestMemoryError as exc:
        raise refused(Status.DATA_TRANSFER_ERROR, str(exc)) from None
    new_sq = SubmissionQueue(qid, cq, size, prp1, view, sq_slot(qid, ctrl.dstrd))
    new_sq.remote = remote
    new_sq.priority = CreateQueue.QPRIO.get(cdw11)
    ctrl.add_sq(new_sq)
    return _SUCCESS


def delete_io_sq(ctrl: AdminContext, sq: SubmissionQueue, f: tuple[int, ...]) -> Result:
    qid = DeleteQueue.QID.get(f[CDW10])
    if ctrl.tracing:
        ctrl.trace("pci_nvme_del_sq", qid)
    target = io_queue(ctrl.sqs, qid)
    if target is None:
        raise refused(Status.INVALID_QUEUE_IDENTIFIER, f"sqid {qid} does not exist")
    # §5.6: the queue's commands not yet completed are aborted, and their completions posted
    # to its CQ before this command's. Commands run as they are fetched; only those whose
    # completion a Delay fault holds are left (faults.py).
    ctrl.delayed.abort(ctrl, target, None, Status.SQ_DELETION)
    ctrl.remove_sq(target)
    return _SUCCESS


def delete_io_cq(ctrl: AdminContext, sq: SubmissionQueue, f: tuple[int, ...]) -> Result:
    qid = DeleteQueue.QID.get(f[CDW10])
    if ctrl.tracing:
        ctrl.trace("pci_nvme_del_cq", qid)
    target = io_queue(ctrl.cqs, qid)
    if target is None:
        raise refused(Status.INVALID_QUEUE_IDENTIFIER, f"cqid {qid} does not exist")
    if target.sqs:
        raise refused(Status.INVALID_QUEUE_DELETION, f"cqid {qid} still has submission queues")
    ctrl.remove_cq(target)
    return _SUCCESS


# Section: Identify


def identify_controller_data(ctrl: AdminContext) -> bytes:
    cfg = ctrl.config
    oacs = Oacs.DOORBELL_BUFFER_CONFIG if cfg.shadow_doorbells else Oacs(0)
    oncs = Oncs.COMPARE | Oncs.DATASET_MANAGEMENT | Oncs.WRITE_ZEROES | Oncs.SAVE_SELECT
    data = IDENTIFY_CONTROLLER.pack(
        {
            "vid": cfg.pci_vendor_id,
            "ssvid": cfg.pci_subsystem_vendor_id,
            "sn": ascii_field(cfg.serial, 20),
            "mn": ascii_field(cfg.model, 40),
            "fr": ascii_field(cfg.firmware, 8),
            "rab": cfg.arbitration_burst.bit_length() - 1,  # 2^RAB, the default AB
            "mdts": cfg.mdts,
            "cntlid": 0,
            "ver": 0x00010300,
            "oacs": int(oacs),
            "acl": 3,
            "aerl": cfg.async_event_limit - 1,
            "frmw": 0x03,  # one firmware slot, slot 1 read-only
            "lpa": int(Lpa.COMMANDS_EFFECTS),
            "elpe": cfg.error_log_entries - 1,
            "npss": 0,
            "wctemp": feat.DEFAULT_OVER_TEMPERATURE_THRESHOLD,
            "cctemp": 373,
            "sqes": (SQE_SIZE_LOG2 << 4) | SQE_SIZE_LOG2,
            "cqes": (CQE_SIZE_LOG2 << 4) | CQE_SIZE_LOG2,
            "nn": ctrl.nn,
            "oncs": int(oncs),
            "vwc": int(ctrl.has_volatile_cache),
            # Bit 0: SGLs supported (no alignment requirement); bit 16: Bit Bucket descriptors.
            "sgls": 0x00010001 if cfg.sgls else 0,
            "subnqn": f"nqn.2026-11.io.vnvme:{cfg.serial}".encode(),
            "psd0_mp": 2500,  # 25 W, in centiwatts
        }
    )
    return bytes(data)


def _identify_namespace_data(ctrl: AdminContext, nsid: int) -> bytes:
    ns = ctrl.namespaces.get(nsid)
    if ns is None:
        return bytes(IDENTIFY_SIZE)  # an inactive NSID reads as zeroes
    return bytes(
        IDENTIFY_NAMESPACE.pack(
            {
                "nsze": ns.nlba,
                "ncap": ns.nlba,
                "nuse": ns.nlba,
                "nlbaf": 0,
                "flbas": 0,
                "dlfeat": DLFEAT_READ_ZEROES | DLFEAT_WRITE_ZEROES_DEALLOCATE,
                "nvmcap": ns.size_bytes,
                "nsattr": NSATTR_WRITE_PROTECTED if ns.write_protected else 0,
                "nguid": ns.nguid,
                "eui64": ns.eui64,
                "lbaf0_lbads": ns.lba_shift,
            }
        )
    )


def identify(ctrl: AdminContext, sq: SubmissionQueue, f: tuple[int, ...]) -> Result:
    cns = f[CDW10] & 0xFF
    nsid = f[NSID]
    if ctrl.tracing:
        ctrl.trace("pci_nvme_identify", f[CID], cns, nsid)
    if cns == Cns.CONTROLLER:
        data = ctrl.identify_controller
    elif cns == Cns.NAMESPACE:
        if nsid == 0 or nsid > ctrl.nn:
            raise refused(Status.INVALID_NAMESPACE, f"NSID {nsid:#x}")
        data = _identify_namespace_data(ctrl, nsid)
    elif cns == Cns.ACTIVE_NAMESPACE_LIST:
        if nsid >= 0xFFFFFFFE:
            raise refused(Status.INVALID_NAMESPACE, f"NSID {nsid:#x}")
        active = sorted(n for n in ctrl.namespaces if n > nsid)[:ACTIVE_NAMESPACE_LIST_ENTRIES]
        data = b"".join(n.to_bytes(4, "little") for n in active)
    elif cns == Cns.NAMESPACE_ID_DESCRIPTORS:
        ns = ctrl.namespaces.get(nsid)
        if ns is None:
            raise refused(Status.INVALID_NAMESPACE, f"NSID {nsid:#x} is not active")
        data = bytes(
            pack_namespace_id_descriptors(
                [
                    (NamespaceIdType.EUI64, ns.eui64),
                    (NamespaceIdType.NGUID, ns.nguid),
                    (NamespaceIdType.UUID, ns.uuid),
                ]
            )
        )
    else:
        raise refused(Status.INVALID_FIELD, f"CNS {cns:#x} not supported")
    send_to_host(ctrl, f, data, IDENTIFY_SIZE)
    return _SUCCESS


# Section: log pages


def _smart_page(ctrl: AdminContext) -> bytes:
    smart = ctrl.smart
    return bytes(
        SMART_HEALTH.pack(
            {
                "critical_warning": ctrl.critical_warning(),
                "composite_temperature": ctrl.config.temperature_kelvin,
                "available_spare": 100,
                "available_spare_threshold": 10,
                "percentage_used": 0,
                # Data units are thousands of 512-byte units, rounded up.
                "data_units_read": -(-smart.data_read_bytes // 512_000),
                "data_units_written": -(-smart.data_written_bytes // 512_000),
                "host_read_commands": smart.host_read_commands,
                "host_write_commands": smart.host_write_commands,
                "power_cycles": smart.power_cycles,
                "media_errors": smart.media_errors,
                "error_log_entries": ctrl.error_log.error_count,
            }
        )
    )


def _firmware_slot_page(ctrl: AdminContext) -> bytes:
    return bytes(FIRMWARE_SLOT.pack({"afi": 1, "frs1": ascii_field(ctrl.config.firmware, 8)}))


def _effects_page(ctrl: AdminContext) -> bytes:
    page = bytearray(COMMANDS_SUPPORTED_AND_EFFECTS_SIZE)
    for opcode, effects in admin_effects(ctrl).items():
        page[ADMIN_EFFECTS_OFFSET + 4 * opcode : ADMIN_EFFECTS_OFFSET + 4 * opcode + 4] = int(
            effects
        ).to_bytes(4, "little")
    for opcode, effects in IO_EFFECTS.items():
        page[IO_EFFECTS_OFFSET + 4 * opcode : IO_EFFECTS_OFFSET + 4 * opcode + 4] = int(effects).to_bytes(
            4, "little"
        )
    return bytes(page)


def _counters_page(ctrl: AdminContext) -> bytes:
    stats = ctrl.statistics()
    values: dict[str, int | bytes] = {
        name: getattr(stats, name) for name in VNVME_COUNTERS.fields if hasattr(stats, name)
    }
    values["signature"] = VNVME_COUNTERS_SIGNATURE
    values["enables"] = ctrl.enable_count
    values["io_commands"] = sum(stats.io_commands.values())
    queues = ctrl.queue_statistics()
    cqs = {q.qid: q for q in queues if q.is_cq}
    rows = [q for q in queues if not q.is_cq and q.qid][:VNVME_QUEUE_ROWS]
    values["queue_rows"] = len(rows)
    checker = ctrl.host_check
    if checker is not None:
        values["host_check_enabled"] = 1
        values["host_rule_counts"] = b"".join(
            (record.count & 0xFFFFFFFF).to_bytes(4, "little") for record in checker.records
        )
    page = VNVME_COUNTERS.pack(values)
    for i, sq in enumerate(rows):
        cq = ctrl.sqs[sq.qid].cq  # type: ignore[union-attr]  # rows are of live SQs
        row = {
            "sqid": sq.qid,
            "cq_vector": cq.vector,
            "sq_doorbells": sq.mmio_doorbell_writes,
            "commands": sq.entries,
            "predictions_met": sq.predictions_met,
            "predictions_missed": sq.predictions_missed,
            "batch_offers": sq.batch_offers,
            "interrupts": cqs[cq.cqid].interrupts,
        }
        offset = VNVME_QUEUE_ROWS_OFFSET + i * VNVME_QUEUE_ROW.size
        # Counters modulo 2^32 (the row's fields are u32; SQID and vector fit in theirs).
        page[offset : offset + VNVME_QUEUE_ROW.size] = VNVME_QUEUE_ROW.pack(
            {k: v & 0xFFFFFFFF for k, v in row.items()}
        )
    return bytes(page)


def get_log_page(ctrl: AdminContext, sq: SubmissionQueue, f: tuple[int, ...]) -> Result:
    cdw10, cdw11 = f[CDW10], f[CDW11]
    lid = GetLogPage.LID.get(cdw10)
    rae = GetLogPage.RAE.get(cdw10)
    numd = (GetLogPage.NUMDU.get(cdw11) << 16 | GetLogPage.NUMDL.get(cdw10)) + 1
    length = numd * 4
    offset = f[CDW12] | (f[CDW13] << 32)
    if ctrl.tracing:
        ctrl.trace("pci_nvme_get_log", f[CID], lid, GetLogPage.LSP.get(cdw10), rae, length, offset)
    event_type: int | None = None
    if lid == LogPageId.ERROR_INFORMATION:
        data = ctrl.error_log.page()
        event_type = AsyncEventType.ERROR_STATUS
    elif lid == LogPageId.SMART_HEALTH:
        if f[NSID] not in (0, NSID_BROADCAST):
            # LPA bit 0 is clear: SMART is only reported for the whole controller.
            raise refused(Status.INVALID_FIELD, "per-namespace SMART not supported")
        data = _smart_page(ctrl)
        event_type = AsyncEventType.SMART_HEALTH_STATUS
    elif lid == LogPageId.FIRMWARE_SLOT:
        data = _firmware_slot_page(ctrl)
    elif lid == LogPageId.COMMANDS_SUPPORTED_AND_EFFECTS:
        data = _effects_page(ctrl)
    elif lid == VNVME_COUNTERS_LID:
        data = _counters_page(ctrl)
    else:
        raise refused(Status.INVALID_LOG_PAGE, f"log page {lid:#x}")
    if offset & 3 or offset >= len(data):
        raise refused(Status.INVALID_FIELD, f"log page offset {offset}")
    if length > ctrl.max_transfer:
        raise refused(Status.INVALID_FIELD, f"log page transfer of {length} bytes exceeds MDTS")
    send_to_host(ctrl, f, data[offset : offset + length], length)
    if event_type is not None and not rae:
        ctrl.async_events.log_page_read(event_type)
    return _SUCCESS


# Section: the rest


def async_event_request(ctrl: AdminContext, sq: SubmissionQueue, f: tuple[int, ...]) -> Result:
    if ctrl.tracing:
        ctrl.trace("pci_nvme_aer", f[CID])
    ctrl.async_events.request(sq, f[CID])
    return None


def abort(ctrl: AdminContext, sq: SubmissionQueue, f: tuple[int, ...]) -> Result:
    """§5.1: the command named by SQID / CID completes with Command Abort Requested, if it is
    still waiting: an AER (admin queue), or an I/O command whose completion a Delay fault holds;
    every other command completes as it is fetched. Abort itself completes at once, so no more
    than one is ever outstanding and the Abort Command Limit (Identify ACL) is never reached."""
    target_sqid = AbortFields.SQID.get(f[CDW10])
    target_cid = AbortFields.CID.get(f[CDW10])
    if ctrl.tracing:
        ctrl.trace("pci_nvme_abort", f[CID], target_sqid, target_cid)
    if target_sqid == 0:
        aborted = ctrl.async_events.abort(target_cid)
    else:
        target = io_queue(ctrl.sqs, target_sqid)
        aborted = (
            target is not None and ctrl.delayed.abort(ctrl, target, target_cid, Status.ABORT_REQUESTED) > 0
        )
    return 0, 0 if aborted else 1  # DW0 bit 0: 1 = command not aborted


def doorbell_buffer_config(ctrl: AdminContext, sq: SubmissionQueue, f: tuple[int, ...]) -> Result:
    shadow_addr, eventidx_addr = f[PRP1], f[PRP2]
    mask = ctrl.page_size - 1
    # NVMe 1.3 Doorbell Buffer Config: both buffers are one memory page, page aligned.
    if shadow_addr & mask or eventidx_addr & mask:
        raise refused(Status.INVALID_FIELD, f"buffers {shadow_addr:#x} / {eventidx_addr:#x} not page aligned")
    if shadow_addr == eventidx_addr:
        raise refused(Status.INVALID_FIELD, "shadow doorbell and EventIdx buffers are the same page")
    try:
        ctrl.configure_dbbuf(shadow_addr, eventidx_addr)
    except GuestMemoryError as exc:
        raise refused(Status.DATA_TRANSFER_ERROR, str(exc)) from None
    return _SUCCESS


_ADMIN_TABLE: Final[dict[int, tuple[Handler, CommandEffects]]] = {
    AdminOpcode.DELETE_IO_SQ: (delete_io_sq, CommandEffects.CSUPP),
    AdminOpcode.CREATE_IO_SQ: (create_io_sq, CommandEffects.CSUPP),
    AdminOpcode.GET_LOG_PAGE: (get_log_page, CommandEffects.CSUPP),
    AdminOpcode.DELETE_IO_CQ: (delete_io_cq, CommandEffects.CSUPP),
    AdminOpcode.CREATE_IO_CQ: (create_io_cq, CommandEffects.CSUPP),
    AdminOpcode.IDENTIFY: (identify, CommandEffects.CSUPP),
    AdminOpcode.ABORT: (abort, CommandEffects.CSUPP),
    AdminOpcode.SET_FEATURES: (set_features, CommandEffects.CSUPP),
    AdminOpcode.GET_FEATURES: (get_features, CommandEffects.CSUPP),
    AdminOpcode.ASYNC_EVENT_REQUEST: (async_event_request, CommandEffects.CSUPP),
    AdminOpcode.DOORBELL_BUFFER_CONFIG: (doorbell_buffer_config, CommandEffects.CSUPP),
}


def admin_handlers(ctrl: AdminContext) -> dict[int, Handler]:
    """The admin opcode table of a controller (Doorbell Buffer Config only if advertised)."""
    table = {opcode: handler for opcode, (handler, _effects) in _ADMIN_TABLE.items()}
    if not ctrl.config.shadow_doorbells:
        del table[AdminOpcode.DOORBELL_BUFFER_CONFIG]
    return table


def admin_effects(ctrl: AdminContext) -> dict[int, CommandEffects]:
    return {opcode: _ADMIN_TABLE[opcode][1] for opcode in ctrl.admin_handlers}
