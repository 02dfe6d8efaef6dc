"""The state admin commands keep (NVMe 1.3 §5): feature values, outstanding Asynchronous Event
Requests and the events waiting for one, the Error Information log, SMART counters."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from vnvme.controller.errors import refused
from vnvme.controller.queues import SubmissionQueue
from vnvme.spec import features as feat
from vnvme.spec.commands import async_event_dw0
from vnvme.spec.log_pages import ERROR_INFORMATION_ENTRY
from vnvme.spec.status import Status

if TYPE_CHECKING:
    from vnvme.controller.context import AdminContext

__all__ = ["AsyncEvents", "ErrorLog", "FeatureState", "SmartCounters"]

#: A burst no SQ can exceed: the largest queue (65536 entries) holds 65535 commands.
_NO_LIMIT: Final = 65535


class FeatureState:
    """Current feature values (§5.21.1). Saving is not supported; reset restores defaults."""

    def __init__(self, ctrl: AdminContext) -> None:
        self._ctrl = ctrl
        self.reset()

    def reset(self) -> None:
        max_queues = self._ctrl.config.max_io_queues
        self.nsqa = max_queues - 1  # zero-based, as in the feature value
        self.ncqa = max_queues - 1
        self.queues_set = False
        # AB from the configured burst (a power of two); the priority weights are unused.
        self.arbitration = self._ctrl.config.arbitration_burst.bit_length() - 1
        self.power_management = 0
        self.over_temperature = feat.DEFAULT_OVER_TEMPERATURE_THRESHOLD
        self.under_temperature = feat.DEFAULT_UNDER_TEMPERATURE_THRESHOLD
        self.error_recovery = 0
        # Enabled at reset when present (Identify VWC); absent when no backend caches writes.
        self.volatile_write_cache = int(self._ctrl.has_volatile_cache)
        self.interrupt_coalescing = 0
        self.vector_coalescing_disabled: set[int] = set()
        self.write_atomicity = 0
        self.async_event_configuration = 0

    @property
    def arbitration(self) -> int:
        """The Arbitration feature's value (cdw11 of Set Features)."""
        return self._arbitration

    @arbitration.setter
    def arbitration(self, value: int) -> None:
        self._arbitration = value
        ab = feat.Arbitration.AB.get(value)
        #: Commands the controller takes from one SQ before it moves to the next (§4.11: AB of
        #: the Arbitration feature, 2^AB, 111b no limit: at most an SQ's size minus one). Worked
        #: out here, once per Set Features: every pass reads it.
        self.arbitration_burst = _NO_LIMIT if ab == feat.ARBITRATION_BURST_NO_LIMIT else 1 << ab

    @property
    def write_cache_enabled(self) -> bool:
        return bool(self.volatile_write_cache & 1)

    def coalescing_disabled(self, vector: int) -> bool:
        return vector in self.vector_coalescing_disabled


class AsyncEvents:
    """Outstanding Asynchronous Event Requests and events waiting for one (§5.2)."""

    def __init__(self, ctrl: AdminContext) -> None:
        self._ctrl = ctrl
        self.outstanding: list[tuple[SubmissionQueue, int]] = []
        self.queued: list[tuple[int, int, int]] = []
        # §5.2: once an event type is reported it is masked until the host reads its log page.
        self.masked: set[int] = set()

    def reset(self) -> None:
        self.outstanding.clear()
        self.queued.clear()
        self.masked.clear()

    def request(self, sq: SubmissionQueue, cid: int) -> None:
        if len(self.outstanding) >= self._ctrl.config.async_event_limit:
            raise refused(Status.ASYNC_EVENT_REQUEST_LIMIT_EXCEEDED, "too many AERs outstanding")
        self.outstanding.append((sq, cid))
        self.dispatch()

    def enqueue(self, event_type: int, info: int, log_page: int) -> None:
        if event_type in self.masked or any(e[0] == event_type and e[1] == info for e in self.queued):
            return
        ctrl = self._ctrl
        if ctrl.tracing:
            ctrl.trace("pci_nvme_enqueue_event", event_type, info, log_page)
        self.queued.append((event_type, info, log_page))
        self.dispatch()

    def dispatch(self) -> None:
        ctrl = self._ctrl
        while self.outstanding and self.queued:
            event_type, info, log_page = self.queued[0]
            if event_type in self.masked:
                self.queued.pop(0)
                continue
            sq, cid = self.outstanding.pop(0)
            self.queued.pop(0)
            self.masked.add(event_type)
            if ctrl.tracing:
                ctrl.trace("pci_nvme_aer_post_cqe", event_type, info, log_page)
            ctrl.post_completion(sq, cid, 0, async_event_dw0(event_type, info, log_page))

    def log_page_read(self, event_type: int) -> None:
        self.masked.discard(event_type)
        self.dispatch()

    def abort(self, cid: int) -> bool:
        for index, (sq, outstanding_cid) in enumerate(self.outstanding):
            if outstanding_cid == cid:
                del self.outstanding[index]
                self._ctrl.post_completion(sq, cid, Status.ABORT_REQUESTED, 0)
                return True
        return False


class ErrorLog:
    """Error Information log entries, newest first (§5.14.1.1)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.error_count = 0
        self.entries: list[bytes] = []

    def record(self, sqid: int, cid: int, status: int, nsid: int, *, lba: int = 0) -> None:
        self.error_count += 1
        entry = ERROR_INFORMATION_ENTRY.pack(
            {
                "error_count": self.error_count,
                "sqid": sqid,
                "cid": cid,
                "status_field": (status << 1) & 0xFFFF,
                "parameter_error_location": 0xFFFF,  # not reported
                "lba": lba,  # the first LBA in error, where it applies (media errors)
                "nsid": nsid,
            }
        )
        self.entries.insert(0, bytes(entry))
        del self.entries[self.capacity :]

    def page(self) -> bytes:
        size = self.capacity * ERROR_INFORMATION_ENTRY.size
        data = b"".join(self.entries)
        return data + bytes(size - len(data))


@dataclass
class SmartCounters:
    data_read_bytes: int = 0
    data_written_bytes: int = 0
    host_read_commands: int = 0
    host_write_commands: int = 0
    media_errors: int = 0
    power_cycles: int = 1
