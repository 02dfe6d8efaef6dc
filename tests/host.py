"""Test fixtures: a controller, guest memory and the host driver wired together in-process."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from vnvme.controller.config import ControllerConfig
from vnvme.controller.controller import Controller
from vnvme.controller.eventidx import SqPolicyFactory
from vnvme.controller.namespace import Namespace, NullBackend, RamBackend
from vnvme.driver import HostMemory, InProcessTransport, NvmeDriver
from vnvme.memory import GuestMemory
from vnvme.trace import ListSink


@dataclass
class Rig:
    """Everything a test needs: the controller, its memory, the host driver and a trace sink."""

    controller: Controller
    memory: GuestMemory
    host_memory: HostMemory
    transport: InProcessTransport
    driver: NvmeDriver
    trace: ListSink = field(default_factory=ListSink)

    def close(self) -> None:
        self.driver.close()
        self.transport.close()
        self.host_memory.close()
        self.controller.close()


def default_namespaces() -> list[Namespace]:
    return [Namespace(1, RamBackend(16 << 20), 512), Namespace(2, NullBackend(1 << 30), 4096)]


def make_rig(
    *,
    namespaces: Sequence[Namespace] | None = None,
    config: ControllerConfig | None = None,
    probe: bool = True,
    controller_polls: bool = False,
    trace: Sequence[str] = ("pci_nvme_*",),
    host_memory_size: int = 32 << 20,
    sq_policy: SqPolicyFactory | None = None,
    clock: Callable[[], float] = time.monotonic,
    **driver_options: object,
) -> Rig:
    memory = GuestMemory()
    controller = Controller(
        memory, default_namespaces() if namespaces is None else namespaces, config, sq_policy=sq_policy
    )
    sink = ListSink()
    if trace:
        controller.enable_trace(trace)
    host_memory = HostMemory(host_memory_size)
    transport = InProcessTransport.attach(
        controller, host_memory, controller_polls=controller_polls, trace_sink=sink, clock=clock
    )
    driver = NvmeDriver(transport, **driver_options)  # type: ignore[arg-type]
    if probe:
        driver.probe()
    return Rig(controller, memory, host_memory, transport, driver, sink)


@contextmanager
def rig(**options: object) -> Iterator[Rig]:
    r = make_rig(**options)  # type: ignore[arg-type]
    try:
        yield r
    finally:
        r.close()
