"""Trace events: a declared table (QEMU hw/nvme/trace-events style) and sinks.

Event names follow QEMU's so that traces of vnvme and of QEMU's own NVMe device line up. Tracing
is off by default; when off an emitting site costs one attribute test. Events travel out of the
controller core as :class:`~vnvme.effects.TraceEvent` effects; sinks live at the edge.
"""

from __future__ import annotations

import fnmatch
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, Protocol, TextIO

from vnvme.controller.hostcheck import RULES as HOST_RULES
from vnvme.effects import TraceEvent


@dataclass(frozen=True, slots=True)
class TraceEventSpec:
    name: str
    args: tuple[str, ...]
    fmt: str  # str.format template over the argument names


def _table(*rows: tuple[str, str, str]) -> dict[str, TraceEventSpec]:
    out: dict[str, TraceEventSpec] = {}
    for name, args, fmt in rows:
        out[name] = TraceEventSpec(name, tuple(args.split()) if args else (), fmt)
    return out


TRACE_EVENTS: Final[dict[str, TraceEventSpec]] = _table(
    # successful events
    ("pci_nvme_mmio_read", "offset size value", "offset {offset:#x} size {size} value {value:#x}"),
    ("pci_nvme_mmio_write", "offset size value", "offset {offset:#x} size {size} value {value:#x}"),
    ("pci_nvme_mmio_doorbell_sq", "sqid new_tail", "sqid {sqid} new_tail {new_tail}"),
    ("pci_nvme_mmio_doorbell_cq", "cqid new_head", "cqid {cqid} new_head {new_head}"),
    ("pci_nvme_mmio_start_success", "", "controller enabled"),
    ("pci_nvme_mmio_stopped", "", "controller reset (CC.EN 1 -> 0)"),
    ("pci_nvme_mmio_shutdown_set", "shn", "shutdown notification {shn}: shutdown complete"),
    ("pci_nvme_mmio_shutdown_cleared", "", "shutdown notification cleared"),
    ("pci_nvme_nssr", "", "NVM subsystem reset"),
    (
        "pci_nvme_memory_missing",
        "reason",
        "queue or doorbell page memory not mapped ({reason}): fatal if used before it is back",
    ),
    ("pci_nvme_dbbuf_config", "dbs_addr eis_addr", "dbs_addr {dbs_addr:#x} eis_addr {eis_addr:#x}"),
    (
        "pci_nvme_dbbuf_shadow_catchup",
        "qid is_cq shadow value",
        "qid {qid} is_cq {is_cq}: MMIO value {value} ahead of shadow slot {shadow}; slot brought up",
    ),
    ("pci_nvme_update_sq_tail", "sqid tail", "sqid {sqid} shadow tail {tail}"),
    ("pci_nvme_update_sq_eventidx", "sqid eventidx", "sqid {sqid} eventidx {eventidx}"),
    ("pci_nvme_update_cq_head", "cqid head", "cqid {cqid} shadow head {head}"),
    ("pci_nvme_update_cq_eventidx", "cqid eventidx", "cqid {cqid} eventidx {eventidx}"),
    ("pci_nvme_rearm", "sqid won attempts", "sqid {sqid} won {won} attempts {attempts}"),
    ("pci_nvme_admin_cmd", "cid sqid opcode opname", "cid {cid} sqid {sqid} opc {opcode:#x} {opname}"),
    (
        "pci_nvme_io_cmd",
        "cid nsid sqid opcode opname",
        "cid {cid} nsid {nsid} sqid {sqid} opc {opcode:#x} {opname}",
    ),
    (
        "pci_nvme_create_sq",
        "sqid cqid qsize qflags",
        "sqid {sqid} cqid {cqid} qsize {qsize} qflags {qflags:#x}",
    ),
    (
        "pci_nvme_create_cq",
        "cqid vector qsize qflags ien",
        "cqid {cqid} vector {vector} qsize {qsize} qflags {qflags:#x} ien {ien}",
    ),
    ("pci_nvme_del_sq", "qid", "deleting sqid {qid}"),
    ("pci_nvme_del_cq", "qid", "deleting cqid {qid}"),
    (
        "pci_nvme_enqueue_req_completion",
        "cid cqid dw0 status",
        "cid {cid} cqid {cqid} dw0 {dw0:#x} status {status:#x}",
    ),
    ("pci_nvme_irq_msix", "vector", "raising MSI-X vector {vector}"),
    ("pci_nvme_irq_masked", "vector", "vector {vector} masked (INTMS)"),
    ("pci_nvme_aer", "cid", "cid {cid}"),
    ("pci_nvme_enqueue_event", "type info log_page", "type {type:#x} info {info:#x} lid {log_page:#x}"),
    ("pci_nvme_aer_post_cqe", "type info log_page", "type {type:#x} info {info:#x} lid {log_page:#x}"),
    ("pci_nvme_identify", "cid cns nsid", "cid {cid} cns {cns:#x} nsid {nsid}"),
    (
        "pci_nvme_getfeat",
        "cid nsid fid sel cdw11",
        "cid {cid} nsid {nsid} fid {fid:#x} sel {sel} cdw11 {cdw11:#x}",
    ),
    (
        "pci_nvme_setfeat",
        "cid nsid fid save cdw11",
        "cid {cid} nsid {nsid} fid {fid:#x} save {save} cdw11 {cdw11:#x}",
    ),
    (
        "pci_nvme_get_log",
        "cid lid lsp rae len off",
        "cid {cid} lid {lid:#x} lsp {lsp} rae {rae} len {len} off {off}",
    ),
    ("pci_nvme_abort", "cid sqid target_cid", "cid {cid} sqid {sqid} target cid {target_cid}"),
    (
        "pci_nvme_rw",
        "cid opname nsid nlb len lba",
        "cid {cid} {opname} nsid {nsid} nlb {nlb} len {len} lba {lba:#x}",
    ),
    ("pci_nvme_flush", "cid nsid", "cid {cid} nsid {nsid}"),
    (
        "pci_nvme_fault_injected",
        "cid sqid nsid fault",
        "cid {cid} sqid {sqid} nsid {nsid}: fault hook gave {fault}",
    ),
    ("pci_nvme_dsm", "cid nsid nr attr", "cid {cid} nsid {nsid} nr {nr} attr {attr:#x}"),
    # error conditions
    (
        "pci_nvme_err_cmd",
        "cid sqid opcode status reason",
        "cid {cid} sqid {sqid} opc {opcode:#x} status {status:#x}: {reason}",
    ),
    (
        "pci_nvme_err_mmio",
        "offset size value reason",
        "offset {offset:#x} size {size} value {value:#x}: {reason}",
    ),
    ("pci_nvme_err_startfail", "reason", "enable failed: {reason}"),
    (
        "pci_nvme_err_db_invalid_queue",
        "qid is_cq value",
        "doorbell of missing queue {qid} (cq {is_cq}) value {value}",
    ),
    (
        "pci_nvme_err_db_invalid_value",
        "qid is_cq value",
        "queue {qid} (cq {is_cq}) invalid doorbell value {value}",
    ),
    (
        "pci_nvme_err_shadow_invalid_value",
        "qid is_cq value",
        "queue {qid} (cq {is_cq}) invalid shadow doorbell value {value}",
    ),
    ("pci_nvme_err_rearm_exhausted", "sqid attempts", "sqid {sqid} lost {attempts} rearm races in a row"),
    ("pci_nvme_err_cq_full", "cqid", "cqid {cqid} full: waiting for the host to consume"),
    ("pci_nvme_err_fatal", "reason", "controller fatal status: {reason}"),
    # host-protocol violations (check_host): one event per rule of vnvme.controller.hostcheck
    *(
        (rule.event, " ".join(rule.args), f"{rule.severity}: " + " ".join(f"{a} {{{a}}}" for a in rule.args))
        for rule in HOST_RULES
    ),
    # vfio-user server (the transport: no NVMe in these)
    ("vfio_user_connect", "clients", "client connected ({clients} so far)"),
    ("vfio_user_disconnect", "reason", "client gone: {reason}"),
    (
        "vfio_user_version",
        "major minor max_fds max_xfer",
        "version {major}.{minor} max_msg_fds {max_fds} max_data_xfer_size {max_xfer}",
    ),
    (
        "vfio_user_dma_map",
        "address size flags fd",
        "dma map [{address:#x}, +{size:#x}) flags {flags:#x} fd {fd}",
    ),
    ("vfio_user_dma_unmap", "address size", "dma unmap [{address:#x}, +{size:#x})"),
    (
        "vfio_user_set_irqs",
        "index flags start count",
        "set irqs index {index} flags {flags:#x} start {start} count {count}",
    ),
    ("vfio_user_reset", "", "device reset"),
    ("vfio_user_dma_request", "command address count", "{command} [{address:#x}, +{count:#x}) to the client"),
    (
        "vfio_user_err_message",
        "command msg_id errno reason",
        "{command} id {msg_id} refused, errno {errno}: {reason}",
    ),
    (
        "vfio_user_err_message_too_large",
        "command msg_id size limit",
        "{command} id {msg_id} declares {size} bytes, more than {limit}: E2BIG, connection closed",
    ),
    (
        "vfio_user_err_message_timeout",
        "direction done expected seconds",
        "{direction} a message stalled at {done} of {expected} bytes for {seconds} s: connection closed",
    ),
    ("vfio_user_err_handshake_timeout", "seconds", "no VERSION within {seconds} s: connection closed"),
)


def matching_events(patterns: Iterable[str]) -> frozenset[str]:
    """Event names matching any glob pattern (``pci_nvme_*dbbuf*``, ``pci_nvme_err_*``)."""
    selected: set[str] = set()
    for pattern in patterns:
        hits = fnmatch.filter(TRACE_EVENTS, pattern)
        if not hits:
            raise ValueError(f"no trace event matches {pattern!r}")
        selected.update(hits)
    return frozenset(selected)


def format_event(event: TraceEvent) -> str:
    spec = TRACE_EVENTS[event.name]
    return f"{event.name} " + spec.fmt.format(**dict(zip(spec.args, event.args, strict=True)))


class TraceSink(Protocol):
    def __call__(self, event: TraceEvent) -> None: ...


class ListSink:
    """Keeps events in a list (tests)."""

    def __init__(self) -> None:
        self.events: list[TraceEvent] = []

    def __call__(self, event: TraceEvent) -> None:
        self.events.append(event)

    def named(self, name: str) -> list[TraceEvent]:
        return [event for event in self.events if event.name == name]


class LogSink:
    """Formats events as text lines into a logger."""

    def __init__(self, logger: logging.Logger | None = None, level: int = logging.INFO) -> None:
        self.logger = logger or logging.getLogger("vnvme.trace")
        self.level = level

    def __call__(self, event: TraceEvent) -> None:
        if self.logger.isEnabledFor(self.level):
            self.logger.log(self.level, "%s", format_event(event))


class JsonLinesSink:
    """One JSON object per line: {"event": name, <arg>: value, ...}."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def __call__(self, event: TraceEvent) -> None:
        spec = TRACE_EVENTS[event.name]
        record: dict[str, int | str] = {"event": event.name}
        record.update(zip(spec.args, event.args, strict=True))
        self.stream.write(json.dumps(record) + "\n")
