"""vnvme: an NVMe controller emulated in Python, with NVMe 1.3 shadow doorbell buffers.

Layers, from the inside out:

- :mod:`vnvme.spec` -- the specification, declared once (registers, queue entries, opcodes,
  statuses, Identify and log page layouts, the EventIdx arithmetic).
- :mod:`vnvme.controller` -- the sans-I/O controller core: register accesses and guest memory
  in, effects (interrupts, trace events, fatal status) out.
- :mod:`vnvme.driver` -- a host driver that behaves like Linux nvme-pci, and its transports.
"""

__version__ = "0.1.0"
