"""Completion status (NVMe 1.3 §4.6.1): Status Code Type, Status Code, More, DNR.

A status is carried as the 15-bit Status Field without the phase tag: SC in bits 7:0, SCT in
bits 10:8, CRD 12:11, More bit 13, DNR bit 14. In the CQE's dword 3 it sits above the phase bit:
``status_field = (status << 1) | phase``.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Final

DNR: Final = 1 << 14  # Do Not Retry
MORE: Final = 1 << 13  # More information in the Error Information log page


class StatusCodeType(IntEnum):
    GENERIC = 0
    COMMAND_SPECIFIC = 1
    MEDIA_ERROR = 2
    PATH_RELATED = 3
    VENDOR_SPECIFIC = 7


def _s(sct: StatusCodeType, sc: int) -> int:
    return (int(sct) << 8) | sc


class Status(IntEnum):
    """Status codes as ``(SCT << 8) | SC``; OR in :data:`DNR` / :data:`MORE` as needed."""

    # Generic Command Status (§4.6.1.2.1)
    SUCCESS = _s(StatusCodeType.GENERIC, 0x00)
    INVALID_OPCODE = _s(StatusCodeType.GENERIC, 0x01)
    INVALID_FIELD = _s(StatusCodeType.GENERIC, 0x02)
    CID_CONFLICT = _s(StatusCodeType.GENERIC, 0x03)
    DATA_TRANSFER_ERROR = _s(StatusCodeType.GENERIC, 0x04)
    POWER_LOSS_ABORT = _s(StatusCodeType.GENERIC, 0x05)
    INTERNAL_ERROR = _s(StatusCodeType.GENERIC, 0x06)
    ABORT_REQUESTED = _s(StatusCodeType.GENERIC, 0x07)
    SQ_DELETION = _s(StatusCodeType.GENERIC, 0x08)
    FUSED_FAIL = _s(StatusCodeType.GENERIC, 0x09)
    FUSED_MISSING = _s(StatusCodeType.GENERIC, 0x0A)
    INVALID_NAMESPACE = _s(StatusCodeType.GENERIC, 0x0B)
    COMMAND_SEQUENCE_ERROR = _s(StatusCodeType.GENERIC, 0x0C)
    INVALID_SGL_SEGMENT_DESCRIPTOR = _s(StatusCodeType.GENERIC, 0x0D)
    INVALID_SGL_DESCRIPTOR_COUNT = _s(StatusCodeType.GENERIC, 0x0E)
    DATA_SGL_LENGTH_INVALID = _s(StatusCodeType.GENERIC, 0x0F)
    METADATA_SGL_LENGTH_INVALID = _s(StatusCodeType.GENERIC, 0x10)
    SGL_DESCRIPTOR_TYPE_INVALID = _s(StatusCodeType.GENERIC, 0x11)
    INVALID_USE_OF_CMB = _s(StatusCodeType.GENERIC, 0x12)
    PRP_OFFSET_INVALID = _s(StatusCodeType.GENERIC, 0x13)
    SGL_OFFSET_INVALID = _s(StatusCodeType.GENERIC, 0x16)
    # NVMe 1.4 Figure 126: a command that would modify a write protected namespace.
    NAMESPACE_WRITE_PROTECTED = _s(StatusCodeType.GENERIC, 0x20)
    # NVM command set specific generic statuses
    LBA_OUT_OF_RANGE = _s(StatusCodeType.GENERIC, 0x80)
    CAPACITY_EXCEEDED = _s(StatusCodeType.GENERIC, 0x81)
    NAMESPACE_NOT_READY = _s(StatusCodeType.GENERIC, 0x82)

    # Command Specific Status (§4.6.1.2.2)
    COMPLETION_QUEUE_INVALID = _s(StatusCodeType.COMMAND_SPECIFIC, 0x00)
    INVALID_QUEUE_IDENTIFIER = _s(StatusCodeType.COMMAND_SPECIFIC, 0x01)
    INVALID_QUEUE_SIZE = _s(StatusCodeType.COMMAND_SPECIFIC, 0x02)
    ABORT_COMMAND_LIMIT_EXCEEDED = _s(StatusCodeType.COMMAND_SPECIFIC, 0x03)
    ASYNC_EVENT_REQUEST_LIMIT_EXCEEDED = _s(StatusCodeType.COMMAND_SPECIFIC, 0x05)
    INVALID_FIRMWARE_SLOT = _s(StatusCodeType.COMMAND_SPECIFIC, 0x06)
    INVALID_FIRMWARE_IMAGE = _s(StatusCodeType.COMMAND_SPECIFIC, 0x07)
    INVALID_INTERRUPT_VECTOR = _s(StatusCodeType.COMMAND_SPECIFIC, 0x08)
    INVALID_LOG_PAGE = _s(StatusCodeType.COMMAND_SPECIFIC, 0x09)
    INVALID_FORMAT = _s(StatusCodeType.COMMAND_SPECIFIC, 0x0A)
    INVALID_QUEUE_DELETION = _s(StatusCodeType.COMMAND_SPECIFIC, 0x0C)
    FEATURE_NOT_SAVEABLE = _s(StatusCodeType.COMMAND_SPECIFIC, 0x0D)
    FEATURE_NOT_CHANGEABLE = _s(StatusCodeType.COMMAND_SPECIFIC, 0x0E)
    FEATURE_NOT_NAMESPACE_SPECIFIC = _s(StatusCodeType.COMMAND_SPECIFIC, 0x0F)
    # NVM command set specific
    CONFLICTING_ATTRIBUTES = _s(StatusCodeType.COMMAND_SPECIFIC, 0x80)
    INVALID_PROTECTION_INFO = _s(StatusCodeType.COMMAND_SPECIFIC, 0x81)
    WRITE_TO_READ_ONLY_RANGE = _s(StatusCodeType.COMMAND_SPECIFIC, 0x82)

    # Media and Data Integrity Errors (§4.6.1.2.3)
    WRITE_FAULT = _s(StatusCodeType.MEDIA_ERROR, 0x80)
    UNRECOVERED_READ_ERROR = _s(StatusCodeType.MEDIA_ERROR, 0x81)
    END_TO_END_GUARD_CHECK_ERROR = _s(StatusCodeType.MEDIA_ERROR, 0x82)
    END_TO_END_APPLICATION_TAG_CHECK_ERROR = _s(StatusCodeType.MEDIA_ERROR, 0x83)
    END_TO_END_REFERENCE_TAG_CHECK_ERROR = _s(StatusCodeType.MEDIA_ERROR, 0x84)
    COMPARE_FAILURE = _s(StatusCodeType.MEDIA_ERROR, 0x85)
    ACCESS_DENIED = _s(StatusCodeType.MEDIA_ERROR, 0x86)
    DEALLOCATED_OR_UNWRITTEN_BLOCK = _s(StatusCodeType.MEDIA_ERROR, 0x87)


def status_code(status: int) -> int:
    """SC, bits 7:0."""
    return status & 0xFF


def status_code_type(status: int) -> int:
    """SCT, bits 10:8."""
    return (status >> 8) & 0x7


def is_dnr(status: int) -> bool:
    return bool(status & DNR)


def without_flags(status: int) -> int:
    """The ``(SCT << 8) | SC`` part of a status, comparable with :class:`Status`."""
    return status & 0x7FF


def describe(status: int) -> str:
    """Human-readable name of a status value, with its flags."""
    base = without_flags(status)
    try:
        name = Status(base).name
    except ValueError:
        name = f"SCT {status_code_type(status):#x} SC {status_code(status):#04x}"
    if status & DNR:
        name += "|DNR"
    if status & MORE:
        name += "|MORE"
    return name
