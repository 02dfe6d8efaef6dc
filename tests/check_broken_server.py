"""``vnvme serve`` with one deliberate bug, for tests/test_check.py (``vnvme check`` must catch it).

python tests/check_broken_server.py BUG [vnvme serve arguments...]
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

from vnvme import cli
from vnvme.controller.controller import Controller
from vnvme.controller.doorbells import Doorbells, QueueDoorbell
from vnvme.controller.namespace import RamBackend
from vnvme.function import NvmeFunction
from vnvme.vfio_user.server import VfioUserServer


def device_reset_ignored() -> None:
    """VFIO_USER_DEVICE_RESET answered, nothing reset (the NVMe controller stays enabled)."""
    NvmeFunction.reset = lambda self: None  # type: ignore[method-assign]


def dbbuf_survives_reset() -> None:
    """A controller reset keeps the shadow doorbell pages (OpenVMM's PR 4080 bug)."""
    Doorbells.reset = lambda self: None  # type: ignore[method-assign]


def eventidx_never_published() -> None:
    """SQ EventIdx never written: a host obeying need_event stops ringing (run with
    --sq-eventidx eager, so that nothing else makes the controller look at the shadow tail)."""
    Controller._publish_sq_eventidx = lambda self, sq, value: None  # type: ignore[method-assign]
    probe = Doorbells.probe

    def probe_without_sq_store(self: Doorbells, queue: QueueDoorbell, value: int, size: int = 1 << 32) -> int:
        if queue.slot % 2:  # a CQ's slot (doorbell stride 0): published as ever
            return probe(self, queue, value, size)
        return self.load(queue, size)

    Doorbells.probe = probe_without_sq_store  # type: ignore[method-assign]


def exit_on_hangup() -> None:
    """Exit when the first client hangs up, as QEMU's server does."""
    serve = VfioUserServer.serve_connection

    def serve_once(self: VfioUserServer, *args: object, **kwargs: object) -> None:
        serve(self, *args, **kwargs)  # type: ignore[arg-type]
        os._exit(0)

    VfioUserServer.serve_connection = serve_once  # type: ignore[method-assign]


def deaf_after_hangup() -> None:
    """Stay up after the first client hangs up, but never serve another one."""
    serve = VfioUserServer.serve_connection

    def serve_once(self: VfioUserServer, *args: object, **kwargs: object) -> None:
        serve(self, *args, **kwargs)  # type: ignore[arg-type]
        while not self.stopping:  # SIGTERM still stops it
            time.sleep(0.02)

    VfioUserServer.serve_connection = serve_once  # type: ignore[method-assign]


def writes_shifted() -> None:
    """RAM namespace writes land one byte late (a data pointer walked off by one)."""
    write = RamBackend.write

    def shifted(self: RamBackend, offset: int, src: memoryview, *, sync: bool) -> None:
        write(self, offset + 1, src[:-1], sync=sync)

    RamBackend.write = shifted  # type: ignore[method-assign]


BUGS: dict[str, Callable[[], None]] = {
    "device-reset-ignored": device_reset_ignored,
    "dbbuf-survives-reset": dbbuf_survives_reset,
    "eventidx-never-published": eventidx_never_published,
    "exit-on-hangup": exit_on_hangup,
    "deaf-after-hangup": deaf_after_hangup,
    "writes-shifted": writes_shifted,
}

if __name__ == "__main__":
    BUGS[sys.argv[1]]()
    raise SystemExit(cli.main(["serve", *sys.argv[2:]]))
