"""The NVMe specification, declared once: registers, queue entries, opcodes, status codes, data
structures and the shadow doorbell arithmetic. Imported by both the controller and the driver."""

from vnvme.spec import commands, dbbuf, features, identify, layout, log_pages, registers, status

__all__ = ["commands", "dbbuf", "features", "identify", "layout", "log_pages", "registers", "status"]
