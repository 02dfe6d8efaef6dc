"""Log pages (NVMe 1.3 §5.14.1): Error Information, SMART / Health, Firmware Slot, Commands
Supported and Effects."""

from __future__ import annotations

from enum import IntFlag
from typing import Final

from vnvme.spec.layout import Layout

ERROR_INFORMATION_ENTRY: Final = Layout(
    "ErrorInformationEntry",
    64,
    [
        ("error_count", 0, "Q"),
        ("sqid", 8, "H"),
        ("cid", 10, "H"),
        ("status_field", 12, "H"),  # status << 1 | phase tag, as in the CQE
        ("parameter_error_location", 14, "H"),
        ("lba", 16, "Q"),
        ("nsid", 24, "I"),
        ("vendor_specific", 28, "B"),
        ("trtype", 29, "B"),
        ("command_specific", 32, "Q"),
        ("trtype_specific", 40, "H"),
    ],
)

SMART_HEALTH: Final = Layout(
    "SmartHealthInformation",
    512,
    [
        ("critical_warning", 0, "B"),
        ("composite_temperature", 1, "H"),  # Kelvin
        ("available_spare", 3, "B"),
        ("available_spare_threshold", 4, "B"),
        ("percentage_used", 5, "B"),
        ("data_units_read", 32, "u128"),  # thousands of 512-byte units, rounded up
        ("data_units_written", 48, "u128"),
        ("host_read_commands", 64, "u128"),
        ("host_write_commands", 80, "u128"),
        ("controller_busy_time", 96, "u128"),
        ("power_cycles", 112, "u128"),
        ("power_on_hours", 128, "u128"),
        ("unsafe_shutdowns", 144, "u128"),
        ("media_errors", 160, "u128"),
        ("error_log_entries", 176, "u128"),
        ("warning_temperature_time", 192, "I"),
        ("critical_temperature_time", 196, "I"),
    ],
)


class CriticalWarning(IntFlag):
    SPARE_BELOW_THRESHOLD = 1 << 0
    TEMPERATURE = 1 << 1
    RELIABILITY_DEGRADED = 1 << 2
    READ_ONLY = 1 << 3
    VOLATILE_BACKUP_FAILED = 1 << 4


FIRMWARE_SLOT: Final = Layout(
    "FirmwareSlotInformation",
    512,
    [("afi", 0, "B")] + [(f"frs{slot}", 8 * slot, "8s") for slot in range(1, 8)],
)

COMMANDS_SUPPORTED_AND_EFFECTS_SIZE: Final = 4096
# ACS0..ACS255 (admin) at bytes 0..1023, IOCS0..IOCS255 at 1024..2047, one u32 per opcode.
ADMIN_EFFECTS_OFFSET: Final = 0
IO_EFFECTS_OFFSET: Final = 1024


class CommandEffects(IntFlag):
    """Commands Supported and Effects data structure bits (Figure 103)."""

    CSUPP = 1 << 0  # Command Supported
    LBCC = 1 << 1  # Logical Block Content Change
    NCC = 1 << 2  # Namespace Capability Change
    NIC = 1 << 3  # Namespace Inventory Change
    CCC = 1 << 4  # Controller Capability Change
    CSE_SINGLE_NAMESPACE = 1 << 16  # Command Submission and Execution, bits 18:16
    CSE_ANY_NAMESPACE = 2 << 16


#: vnvme's own log page (§5.14.1: identifiers C0h-FFh are vendor specific): the controller's
#: doorbell and shadow doorbell counters, so that a guest (``nvme get-log -i 0xc0``) can read
#: exactly what its I/O cost in trapped doorbells, without tracing.
VNVME_COUNTERS_LID: Final = 0xC0
#: Room for this many host-check rule counters, at this offset of the C0h page.
VNVME_HOST_RULE_COUNTS_OFFSET: Final = 192
VNVME_HOST_RULE_SLOTS: Final = 16
VNVME_COUNTERS: Final = Layout(
    "VnvmeCounters",
    512,
    [
        ("signature", 0, "8s"),  # b"vnvmectr"
        ("doorbell_sq_admin", 8, "Q"),
        ("doorbell_sq_io", 16, "Q"),
        ("doorbell_cq_admin", 24, "Q"),
        ("doorbell_cq_io", 32, "Q"),
        ("shadow_reads", 40, "Q"),
        ("eventidx_writes", 48, "Q"),
        ("dbbuf_configs", 56, "Q"),
        ("completions_posted", 64, "Q"),
        ("interrupts_raised", 72, "Q"),
        ("enables", 80, "Q"),  # CC.EN 0 -> 1 transitions
        ("rearms_won", 88, "Q"),
        ("rearms_lost", 96, "Q"),
        ("shadow_catchups", 104, "Q"),
        ("invalid_doorbell_writes", 112, "Q"),
        ("mapped_doorbell_updates", 120, "Q"),
        ("internal_errors", 128, "Q"),
        ("io_commands", 136, "Q"),  # I/O commands fetched, every opcode
        ("predictions_met", 144, "Q"),  # SQ EventIdx predictions the host met (rang)
        ("predictions_missed", 152, "Q"),  # ... missed (the controller looked after a deadline)
        ("batch_offers", 160, "Q"),  # larger batches offered (policy ADAPTIVE)
        ("queue_rows", 168, "H"),  # rows filled in the per-queue table below
        # Host-protocol checker (vnvme serve --check-host; all zero when it is off).
        ("host_check_enabled", 170, "B"),
        ("host_check_errors", 176, "Q"),
        ("host_check_warnings", 184, "Q"),
        # One u32 per rule (modulo 2^32), in the order of vnvme.controller.hostcheck.RULES.
        ("host_rule_counts", VNVME_HOST_RULE_COUNTS_OFFSET, f"{4 * VNVME_HOST_RULE_SLOTS}s"),
    ],
)
#: The C0h page's per-queue table: one row per I/O SQ (lowest SQIDs first), counters modulo 2^32.
VNVME_QUEUE_ROWS_OFFSET: Final = 256
VNVME_QUEUE_ROW: Final = Layout(
    "VnvmeQueueRow",
    32,
    [
        ("sqid", 0, "H"),
        ("cq_vector", 2, "H"),
        ("sq_doorbells", 4, "I"),  # trapped SQ tail doorbell writes
        ("commands", 8, "I"),  # commands fetched
        ("predictions_met", 12, "I"),
        ("predictions_missed", 16, "I"),
        ("batch_offers", 20, "I"),
        ("interrupts", 24, "I"),  # raised on its CQ's vector
    ],
)
VNVME_QUEUE_ROWS: Final = (VNVME_COUNTERS.size - VNVME_QUEUE_ROWS_OFFSET) // VNVME_QUEUE_ROW.size
VNVME_COUNTERS_SIGNATURE: Final = b"vnvmectr"
