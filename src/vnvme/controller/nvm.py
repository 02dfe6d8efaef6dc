"""NVM command set (NVMe 1.3 §6): Read, Write, Flush, Write Zeroes, Dataset Management, Compare."""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from vnvme.controller.dataptr import BIT_BUCKET
from vnvme.controller.errors import CommandFailed
from vnvme.controller.namespace import Namespace
from vnvme.controller.transfer import (
    CDW10,
    CDW11,
    CDW12,
    FLAGS,
    NSID,
    PRP1,
    data_segments,
    read_from_host,
)
from vnvme.memory import GuestMemoryError
from vnvme.spec.commands import DSM_RANGE, FLAGS_PSDT, NSID_BROADCAST, DsmFields, NvmOpcode
from vnvme.spec.log_pages import CommandEffects
from vnvme.spec.status import DNR, Status

if TYPE_CHECKING:
    from vnvme.controller.context import IoContext
    from vnvme.controller.queues import SubmissionQueue

Result = tuple[int, int] | None
Handler = Callable[["IoContext", "SubmissionQueue", tuple[int, ...]], Result]

_FUA: Final = 1 << 30
_DEAC: Final = 1 << 25
_SUCCESS: Final = (0, 0)
_PSDT_MASK: Final = FLAGS_PSDT.mask


def _namespace(ctrl: IoContext, nsid: int) -> Namespace:
    ns = ctrl.namespaces.get(nsid)
    if ns is None:
        raise CommandFailed(Status.INVALID_NAMESPACE | DNR, f"NSID {nsid} is not active")
    return ns


def _range(ctrl: IoContext, fields: tuple[int, ...], *, data: bool) -> tuple[Namespace, int, int]:
    """Namespace, byte offset and byte length of a Read / Write / Compare / Write Zeroes."""
    ns = ctrl.namespaces.get(fields[NSID])
    if ns is None:  # _namespace, inlined: once per I/O
        raise CommandFailed(Status.INVALID_NAMESPACE | DNR, f"NSID {fields[NSID]} is not active")
    slba = fields[CDW10] | (fields[CDW11] << 32)
    nlb = (fields[CDW12] & 0xFFFF) + 1
    if slba + nlb > ns.nlba:
        raise CommandFailed(Status.LBA_OUT_OF_RANGE | DNR, f"LBA {slba:#x}+{nlb} beyond {ns.nlba:#x}")
    length = nlb << ns.lba_shift
    if data and length > ctrl.max_transfer:
        raise CommandFailed(Status.INVALID_FIELD | DNR, f"{length} bytes exceeds MDTS")
    return ns, slba << ns.lba_shift, length


def _check_writable(ns: Namespace) -> None:
    # NVMe 1.4 §8.20: commands that would modify a write protected namespace fail; reads,
    # Flush and DSM without Deallocate still work. DNR: the protection lasts as long as the
    # backing file is served read-only.
    if ns.write_protected:
        raise CommandFailed(Status.NAMESPACE_WRITE_PROTECTED | DNR, f"NSID {ns.nsid} is write protected")


def _media_error(ctrl: IoContext, exc: OSError, *, write: bool) -> CommandFailed:
    if exc.errno == errno.ENOSPC:  # a full backing store: no data integrity error
        return CommandFailed(Status.CAPACITY_EXCEEDED | DNR, f"backend: {exc}")
    ctrl.count_media_error()
    status = Status.WRITE_FAULT if write else Status.UNRECOVERED_READ_ERROR
    return CommandFailed(status, f"backend: {exc}")


def read(ctrl: IoContext, sq: SubmissionQueue, fields: tuple[int, ...]) -> Result:
    ns, offset, length = _range(ctrl, fields, data=True)
    memory = ctrl.memory
    backend = ns.backend
    prp1 = fields[PRP1]
    page_size = ctrl.page_size
    if not fields[FLAGS] & _PSDT_MASK and not prp1 & 0x3 and length <= page_size - (prp1 & (page_size - 1)):
        # The common case: PRP1 alone holds the data, in one mapped local region (else the
        # general path below, which finds the same status for anything less simple).
        try:
            dest = memory.view(prp1, length, write=True)
        except GuestMemoryError:
            pass
        else:
            try:
                backend.read_into(offset, dest)
            except OSError as exc:
                raise _media_error(ctrl, exc, write=False) from None
            finally:
                dest.release()  # as below: never leave guest memory exported
            smart = ctrl.smart
            smart.host_read_commands += 1
            smart.data_read_bytes += length
            return _SUCCESS
    segments = data_segments(ctrl, fields, length, to_host=True, sgl_allowed=True)
    try:
        for addr, seg_len in segments:
            if addr != BIT_BUCKET:
                try:
                    dest = memory.view(addr, seg_len, write=True)
                except GuestMemoryError:
                    # Spans regions (or is not mapped: then write() raises for the command).
                    buf = bytearray(seg_len)
                    backend.read_into(offset, memoryview(buf))
                    memory.write(addr, buf)
                else:
                    try:
                        backend.read_into(offset, dest)
                    finally:
                        # A traceback (logged for an unexpected backend error) must not keep
                        # guest memory exported: the host could never unmap it again.
                        dest.release()
            offset += seg_len
    except OSError as exc:
        raise _media_error(ctrl, exc, write=False) from None
    smart = ctrl.smart
    smart.host_read_commands += 1
    smart.data_read_bytes += length
    return _SUCCESS


def write(ctrl: IoContext, sq: SubmissionQueue, fields: tuple[int, ...]) -> Result:
    ns, offset, length = _range(ctrl, fields, data=True)
    _check_writable(ns)
    segments = data_segments(ctrl, fields, length, to_host=False, sgl_allowed=True)
    sync = bool(fields[CDW12] & _FUA) or not ctrl.features.write_cache_enabled
    memory = ctrl.memory
    try:
        if len(segments) == 1:
            addr, seg_len = segments[0]
            try:
                src = memory.view(addr, seg_len)
            except GuestMemoryError:
                src = memoryview(read_from_host(memory, segments, length))
            try:
                ns.backend.write(offset, src, sync=sync)
            finally:
                src.release()  # as in read(): never leave guest memory exported
        else:
            # Gather first: a data transfer error must not leave a partial write behind.
            ns.backend.write(offset, memoryview(read_from_host(memory, segments, length)), sync=sync)
    except OSError as exc:
        raise _media_error(ctrl, exc, write=True) from None
    smart = ctrl.smart
    smart.host_write_commands += 1
    smart.data_written_bytes += length
    return _SUCCESS


def flush_each(ctrl: IoContext, part: Callable[[Namespace], object]) -> None:
    """Flush with NSID FFFFFFFFh (§6.8) is a part per namespace: ``part`` runs for every one,
    in NSID order, even after one fails; the first failure is the command's, raised naming its
    namespace (the Error Information entry's NSID is the namespace in error, §5.14.1.1)."""
    first: CommandFailed | None = None
    for nsid in sorted(ctrl.namespaces):
        try:
            part(ctrl.namespaces[nsid])
        except CommandFailed as failure:
            if failure.nsid is None:
                failure.nsid = nsid
            first = first or failure
    if first is not None:
        raise first


def _flush_namespace(ctrl: IoContext, ns: Namespace) -> None:
    try:
        ns.backend.flush()
    except OSError as exc:
        raise _media_error(ctrl, exc, write=True) from None


def flush(ctrl: IoContext, sq: SubmissionQueue, fields: tuple[int, ...]) -> Result:
    nsid = fields[NSID]
    if ctrl.tracing:
        ctrl.trace("pci_nvme_flush", fields[2], nsid)
    if nsid == NSID_BROADCAST:
        flush_each(ctrl, lambda ns: _flush_namespace(ctrl, ns))
    else:
        _flush_namespace(ctrl, _namespace(ctrl, nsid))
    return _SUCCESS


def write_zeroes(ctrl: IoContext, sq: SubmissionQueue, fields: tuple[int, ...]) -> Result:
    # Write Zeroes moves no data, so MDTS does not limit it.
    ns, offset, length = _range(ctrl, fields, data=False)
    _check_writable(ns)
    cdw12 = fields[CDW12]
    sync = bool(cdw12 & _FUA) or not ctrl.features.write_cache_enabled
    try:
        if cdw12 & _DEAC:
            ns.backend.deallocate(offset, length)
            if sync:
                # FUA (or no write cache): the zeroes a deallocated range reads back (DLFEAT
                # 001b) must be on non-volatile media at completion, as for a plain write.
                ns.backend.flush()
        else:
            ns.backend.write_zeroes(offset, length, sync=sync)
    except OSError as exc:
        raise _media_error(ctrl, exc, write=True) from None
    return _SUCCESS


def dataset_management(ctrl: IoContext, sq: SubmissionQueue, fields: tuple[int, ...]) -> Result:
    ns = _namespace(ctrl, fields[NSID])
    nr = DsmFields.NR.get(fields[CDW10]) + 1
    attributes = fields[CDW11]
    if ctrl.tracing:
        ctrl.trace("pci_nvme_dsm", fields[2], fields[NSID], nr, attributes)
    if not DsmFields.AD.get(attributes):
        return _SUCCESS  # integral read / write hints only
    _check_writable(ns)
    length = nr * DSM_RANGE.size
    segments = data_segments(ctrl, fields, length, to_host=False, sgl_allowed=True)
    raw = read_from_host(ctrl.memory, segments, length)
    ranges = [DSM_RANGE.unpack_from(raw, i * DSM_RANGE.size) for i in range(nr)]
    for _context, nlb, slba in ranges:
        if slba + nlb > ns.nlba:
            raise CommandFailed(Status.LBA_OUT_OF_RANGE | DNR, f"DSM range {slba:#x}+{nlb}")
    try:
        for _context, nlb, slba in ranges:
            if nlb:
                ns.backend.deallocate(slba << ns.lba_shift, nlb << ns.lba_shift)
        if not ctrl.features.write_cache_enabled:
            ns.backend.flush()  # no write cache: the deallocation is durable at completion
    except OSError as exc:
        raise _media_error(ctrl, exc, write=True) from None
    return _SUCCESS


def compare(ctrl: IoContext, sq: SubmissionQueue, fields: tuple[int, ...]) -> Result:
    ns, offset, length = _range(ctrl, fields, data=True)
    segments = data_segments(ctrl, fields, length, to_host=False, sgl_allowed=True)
    host_data = read_from_host(ctrl.memory, segments, length)
    stored = bytearray(length)
    try:
        ns.backend.read_into(offset, memoryview(stored))
    except OSError as exc:
        raise _media_error(ctrl, exc, write=False) from None
    # SMART counts a Compare as a read (NVMe 1.4 Figure 194).
    smart = ctrl.smart
    smart.host_read_commands += 1
    smart.data_read_bytes += length
    if stored != host_data:
        raise CommandFailed(Status.COMPARE_FAILURE, "compare mismatch")
    return _SUCCESS


IO_HANDLERS: Final[dict[int, Handler]] = {
    NvmOpcode.FLUSH: flush,
    NvmOpcode.WRITE: write,
    NvmOpcode.READ: read,
    NvmOpcode.COMPARE: compare,
    NvmOpcode.WRITE_ZEROES: write_zeroes,
    NvmOpcode.DATASET_MANAGEMENT: dataset_management,
}

# Commands Supported and Effects, I/O command set part (generated into log page 05h).
IO_EFFECTS: Final[dict[int, CommandEffects]] = {
    NvmOpcode.FLUSH: CommandEffects.CSUPP,
    NvmOpcode.WRITE: CommandEffects.CSUPP | CommandEffects.LBCC,
    NvmOpcode.READ: CommandEffects.CSUPP,
    NvmOpcode.COMPARE: CommandEffects.CSUPP,
    NvmOpcode.WRITE_ZEROES: CommandEffects.CSUPP | CommandEffects.LBCC,
    NvmOpcode.DATASET_MANAGEMENT: CommandEffects.CSUPP | CommandEffects.LBCC,
}
if set(IO_EFFECTS) != set(IO_HANDLERS):  # pragma: no cover - import-time consistency check
    raise AssertionError("every I/O handler needs a Commands Supported and Effects row")
