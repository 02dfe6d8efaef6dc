"""Errors raised inside the controller core and caught before they can leave it."""

from __future__ import annotations

from vnvme.spec.status import DNR


class CommandFailed(Exception):
    """A command ends with an NVMe status. ``reason`` goes to the trace, never to the guest.
    ``nsid`` and ``lba``: what its Error Information entry names (None: the command's NSID)."""

    def __init__(self, status: int, reason: str, *, nsid: int | None = None, lba: int = 0) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.nsid = nsid
        self.lba = lba


def refused(status: int, reason: str) -> CommandFailed:
    """A command refused for good: ``status`` with Do Not Retry set."""
    return CommandFailed(status | DNR, reason)
