"""The host side: a Python NVMe driver that behaves like Linux nvme-pci, and its transports."""

from vnvme.driver.driver import NvmeDriver, NvmeError, NvmeTimeout, QueuePair
from vnvme.driver.transport import DmaBuffer, HostMemory, HostTransport, InProcessTransport

__all__ = [
    "DmaBuffer",
    "HostMemory",
    "HostTransport",
    "InProcessTransport",
    "NvmeDriver",
    "NvmeError",
    "NvmeTimeout",
    "QueuePair",
]
