"""Get Features and Set Features (NVMe 1.3 §5.9, §5.21): which features exist, what each
takes and reports. A new feature is a row of ``_FEATURE_CAPABILITIES`` and a setter in
``_FEATURE_SETTERS`` (and its value in ``_feature_value``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from vnvme.controller.admin_state import FeatureState
from vnvme.controller.errors import refused
from vnvme.controller.queues import SubmissionQueue
from vnvme.controller.transfer import CDW10, CDW11, CID, NSID
from vnvme.spec import features as feat
from vnvme.spec.commands import NSID_BROADCAST, FeatureFields, FeatureId, FeatureSelect
from vnvme.spec.log_pages import CriticalWarning
from vnvme.spec.status import Status

if TYPE_CHECKING:
    from vnvme.controller.context import AdminContext

Result = tuple[int, int] | None


_CHANGEABLE: Final = int(feat.FeatureCapabilities.CHANGEABLE)
_FEATURE_CAPABILITIES: Final[dict[int, int]] = {
    FeatureId.ARBITRATION: _CHANGEABLE,
    FeatureId.POWER_MANAGEMENT: _CHANGEABLE,
    FeatureId.TEMPERATURE_THRESHOLD: _CHANGEABLE,
    FeatureId.ERROR_RECOVERY: _CHANGEABLE | int(feat.FeatureCapabilities.NAMESPACE_SPECIFIC),
    FeatureId.VOLATILE_WRITE_CACHE: _CHANGEABLE,
    FeatureId.NUMBER_OF_QUEUES: _CHANGEABLE,
    FeatureId.INTERRUPT_COALESCING: _CHANGEABLE,
    FeatureId.INTERRUPT_VECTOR_CONFIGURATION: _CHANGEABLE,
    FeatureId.WRITE_ATOMICITY_NORMAL: _CHANGEABLE,  # mandatory (NVMe 1.4 §5.21.1.10)
    FeatureId.ASYNC_EVENT_CONFIGURATION: _CHANGEABLE,
}


def _temperature_selector(cdw11: int) -> int:
    """0 = over threshold, 1 = under threshold, for the composite temperature only."""
    tmpsel = feat.TemperatureThreshold.TMPSEL.get(cdw11)
    thsel = feat.TemperatureThreshold.THSEL.get(cdw11)
    if tmpsel not in (0, 0xF) or thsel > 1:
        raise refused(Status.INVALID_FIELD, f"TMPSEL {tmpsel} THSEL {thsel}")
    return thsel


def _check_vector(ctrl: AdminContext, cdw11: int) -> int:
    vector = feat.InterruptVectorConfiguration.IV.get(cdw11)
    if vector >= ctrl.config.interrupt_vectors:
        raise refused(Status.INVALID_FIELD, f"interrupt vector {vector}")
    return vector


def _feature_value(ctrl: AdminContext, fid: int, cdw11: int, *, default: bool) -> int:
    state = ctrl.features
    if default:
        fresh = FeatureState(ctrl)
        state = fresh
    if fid == FeatureId.ARBITRATION:
        return state.arbitration
    if fid == FeatureId.POWER_MANAGEMENT:
        return state.power_management
    if fid == FeatureId.TEMPERATURE_THRESHOLD:
        over = _temperature_selector(cdw11) == 0
        return state.over_temperature if over else state.under_temperature
    if fid == FeatureId.ERROR_RECOVERY:
        return state.error_recovery
    if fid == FeatureId.VOLATILE_WRITE_CACHE:
        return state.volatile_write_cache
    if fid == FeatureId.NUMBER_OF_QUEUES:
        return (state.ncqa << 16) | state.nsqa
    if fid == FeatureId.INTERRUPT_COALESCING:
        return state.interrupt_coalescing
    if fid == FeatureId.INTERRUPT_VECTOR_CONFIGURATION:
        vector = _check_vector(ctrl, cdw11)
        return vector | (int(vector in state.vector_coalescing_disabled) << 16)
    if fid == FeatureId.WRITE_ATOMICITY_NORMAL:
        return state.write_atomicity
    if fid == FeatureId.ASYNC_EVENT_CONFIGURATION:
        return state.async_event_configuration
    raise refused(Status.INVALID_FIELD, f"feature {fid:#x} not supported")


def get_features(ctrl: AdminContext, sq: SubmissionQueue, f: tuple[int, ...]) -> Result:
    cdw10, cdw11 = f[CDW10], f[CDW11]
    fid = FeatureFields.FID.get(cdw10)
    sel = FeatureFields.SEL.get(cdw10)
    if ctrl.tracing:
        ctrl.trace("pci_nvme_getfeat", f[CID], f[NSID], fid, sel, cdw11)
    if fid not in _FEATURE_CAPABILITIES:
        raise refused(Status.INVALID_FIELD, f"feature {fid:#x} not supported")
    if sel == FeatureSelect.SUPPORTED_CAPABILITIES:
        return 0, _FEATURE_CAPABILITIES[fid]
    if sel > FeatureSelect.SUPPORTED_CAPABILITIES:
        raise refused(Status.INVALID_FIELD, f"SEL {sel}")
    # Nothing is saveable, so the saved value is the default (§5.11, Select field).
    default = sel in (FeatureSelect.DEFAULT, FeatureSelect.SAVED)
    return 0, _feature_value(ctrl, fid, cdw11, default=default)


def set_features(ctrl: AdminContext, sq: SubmissionQueue, f: tuple[int, ...]) -> Result:
    cdw10, cdw11 = f[CDW10], f[CDW11]
    fid = FeatureFields.FID.get(cdw10)
    save = FeatureFields.SV.get(cdw10)
    state = ctrl.features
    if ctrl.tracing:
        ctrl.trace("pci_nvme_setfeat", f[CID], f[NSID], fid, save, cdw11)
    if fid not in _FEATURE_CAPABILITIES:
        raise refused(Status.INVALID_FIELD, f"feature {fid:#x} not supported")
    if save:
        raise refused(Status.FEATURE_NOT_SAVEABLE, f"feature {fid:#x} cannot be saved")
    namespace_specific = _FEATURE_CAPABILITIES[fid] & feat.FeatureCapabilities.NAMESPACE_SPECIFIC
    if not namespace_specific and f[NSID] not in (0, NSID_BROADCAST):
        # NVMe 1.4 §5.21: a controller-wide feature addressed to one namespace.
        raise refused(Status.FEATURE_NOT_NAMESPACE_SPECIFIC, f"feature {fid:#x} for NSID {f[NSID]:#x}")
    return 0, _FEATURE_SETTERS[fid](ctrl, state, cdw11)


# One setter per settable feature: it takes CDW11 (or fails the command) and returns CQE dword 0.
_Setter = Callable[["AdminContext", FeatureState, int], int]


def _set_arbitration(ctrl: AdminContext, state: FeatureState, cdw11: int) -> int:
    state.arbitration = cdw11
    return 0


def _set_power_management(ctrl: AdminContext, state: FeatureState, cdw11: int) -> int:
    if feat.PowerManagement.PS.get(cdw11) > 0:  # NPSS = 0: only power state 0
        raise refused(Status.INVALID_FIELD, "power state beyond NPSS")
    state.power_management = cdw11 & 0xFF
    return 0


def _set_temperature_threshold(ctrl: AdminContext, state: FeatureState, cdw11: int) -> int:
    threshold = feat.TemperatureThreshold.TMPTH.get(cdw11)
    if _temperature_selector(cdw11) == 0:
        state.over_temperature = threshold
    else:
        state.under_temperature = threshold
    ctrl.report_critical_warnings(CriticalWarning.TEMPERATURE)
    return 0


def _set_error_recovery(ctrl: AdminContext, state: FeatureState, cdw11: int) -> int:
    if feat.ErrorRecovery.DULBE.get(cdw11):
        raise refused(Status.INVALID_FIELD, "DULBE not supported (NSFEAT bit 2 is 0)")
    state.error_recovery = cdw11 & 0xFFFF
    return 0


def _set_volatile_write_cache(ctrl: AdminContext, state: FeatureState, cdw11: int) -> int:
    if not ctrl.has_volatile_cache:
        # Identify VWC = 0: there is no cache to switch (§5.21.1.6).
        raise refused(Status.INVALID_FIELD, "no volatile write cache present")
    if state.write_cache_enabled and not cdw11 & 1:
        # Turning the cache off makes what it held durable first.
        for ns in ctrl.namespaces.values():
            ns.backend.flush()
    state.volatile_write_cache = cdw11 & 1
    return 0


def _set_number_of_queues(ctrl: AdminContext, state: FeatureState, cdw11: int) -> int:
    nsq = feat.NumberOfQueues.NSQ.get(cdw11)
    ncq = feat.NumberOfQueues.NCQ.get(cdw11)
    if nsq == 0xFFFF or ncq == 0xFFFF:
        raise refused(Status.INVALID_FIELD, "65536 queues requested")
    if any(q is not None for q in ctrl.sqs[1:]) or any(q is not None for q in ctrl.cqs[1:]):
        raise refused(Status.COMMAND_SEQUENCE_ERROR, "Number of Queues after I/O queue creation")
    # NVMe 1.4 §5.21.1.7: "the value allocated shall not change between resets": a repeated
    # request reports the allocation made by the first one.
    if not state.queues_set:
        limit = ctrl.config.max_io_queues - 1
        state.nsqa, state.ncqa = min(nsq, limit), min(ncq, limit)
        state.queues_set = True
    return (state.ncqa << 16) | state.nsqa


def _set_interrupt_coalescing(ctrl: AdminContext, state: FeatureState, cdw11: int) -> int:
    state.interrupt_coalescing = cdw11 & 0xFFFF
    return 0


def _set_vector_configuration(ctrl: AdminContext, state: FeatureState, cdw11: int) -> int:
    vector = _check_vector(ctrl, cdw11)
    if feat.InterruptVectorConfiguration.CD.get(cdw11):
        state.vector_coalescing_disabled.add(vector)
    else:
        state.vector_coalescing_disabled.discard(vector)
    return 0


def _set_write_atomicity(ctrl: AdminContext, state: FeatureState, cdw11: int) -> int:
    state.write_atomicity = feat.WriteAtomicityNormal.DN.get(cdw11)
    return 0


def _set_async_event_configuration(ctrl: AdminContext, state: FeatureState, cdw11: int) -> int:
    state.async_event_configuration = cdw11 & 0x3FF
    ctrl.report_critical_warnings(0xFF)  # a warning that holds when its event is enabled
    return 0


_FEATURE_SETTERS: Final[dict[int, _Setter]] = {
    FeatureId.ARBITRATION: _set_arbitration,
    FeatureId.POWER_MANAGEMENT: _set_power_management,
    FeatureId.TEMPERATURE_THRESHOLD: _set_temperature_threshold,
    FeatureId.ERROR_RECOVERY: _set_error_recovery,
    FeatureId.VOLATILE_WRITE_CACHE: _set_volatile_write_cache,
    FeatureId.NUMBER_OF_QUEUES: _set_number_of_queues,
    FeatureId.INTERRUPT_COALESCING: _set_interrupt_coalescing,
    FeatureId.INTERRUPT_VECTOR_CONFIGURATION: _set_vector_configuration,
    FeatureId.WRITE_ATOMICITY_NORMAL: _set_write_atomicity,
    FeatureId.ASYNC_EVENT_CONFIGURATION: _set_async_event_configuration,
}
