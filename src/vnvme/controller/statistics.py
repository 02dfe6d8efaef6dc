"""What the controller counts (:meth:`Controller.statistics`); per queue: :class:`~vnvme.controller.queues.QueueStatistics`."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ControllerStatistics:
    #: Register (non-doorbell) reads and writes through BAR0.
    register_reads: int
    register_writes: int
    #: Trapped doorbell writes through BAR0, by kind.
    doorbell_sq_admin: int
    doorbell_sq_io: int
    doorbell_cq_admin: int
    doorbell_cq_io: int
    invalid_doorbell_writes: int
    #: Shadow doorbell page reads and EventIdx page writes.
    shadow_reads: int
    eventidx_writes: int
    rearms_won: int
    rearms_lost: int
    interrupts_raised: int
    completions_posted: int
    error_completions: int
    dbbuf_configs: int
    #: MMIO doorbell values that were ahead of their shadow slot (a host not keeping the slot).
    shadow_catchups: int
    #: Exceptions caught inside the controller: emulator bugs, zero in a healthy run.
    internal_errors: int
    #: Doorbell values taken from a doorbell page the host writes directly (mappable doorbells).
    mapped_doorbell_updates: int
    #: The SQ EventIdx policy's predictions met / missed and larger batches offered (ADAPTIVE).
    predictions_met: int = 0
    predictions_missed: int = 0
    batch_offers: int = 0
    #: Host-protocol violations seen (``check_host``): errors, warnings, and by rule.
    host_check_errors: int = 0
    host_check_warnings: int = 0
    host_check: dict[str, int] = field(default_factory=dict)
    admin_commands: dict[str, int] = field(default_factory=dict)
    io_commands: dict[str, int] = field(default_factory=dict)

    @property
    def doorbell_writes(self) -> int:
        return self.doorbell_sq_admin + self.doorbell_sq_io + self.doorbell_cq_admin + self.doorbell_cq_io

    @property
    def io_doorbell_writes(self) -> int:
        return self.doorbell_sq_io + self.doorbell_cq_io
