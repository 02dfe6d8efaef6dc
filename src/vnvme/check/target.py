"""The server under test and what one check holds while it runs.

:class:`Target` owns the server: either one already listening (``--socket``), or one started
from ``--server-cmd`` and started again whenever a check needs a fresh one (QEMU's server exits
when its client hangs up; vnvme's stays). :class:`Context` hands a check its connections and
closes them afterwards, whatever happened.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from vnvme.bench.runner import Placement, ServerProcess
from vnvme.check.registry import Skip
from vnvme.driver.driver import NvmeDriver
from vnvme.driver.vfio_user import VfioUserTransport
from vnvme.vfio_user.client import VfioUserClient

#: How long a freshly disconnected server is given to exit before it is taken to stay up.
HANGUP_GRACE = 2.0


class Unusable(Exception):
    """No server to check at all (it did not start, nothing listens): the run stops here."""


@dataclass
class Options:
    """Knobs every check sees."""

    timeout: float = 5.0  # seconds for any reply or completion
    memory_size: int = 16 << 20  # host memory handed to the server per connection
    io_queue_depth: int = 64
    allow_writes: bool = False  # Write commands change the namespace's data: only when asked
    ios_per_depth: int = 500  # reads per depth in the need_event checks


class Target:
    def __init__(self, socket_path: str | None, server_cmd: str | None) -> None:
        if socket_path is None and server_cmd is None:
            raise ValueError("give --socket PATH, --server-cmd CMD, or both")
        if server_cmd is not None:
            if not shlex.split(server_cmd):  # unbalanced quotes raise ValueError here too
                raise ValueError("--server-cmd is empty")
            if socket_path is None and "{socket}" not in server_cmd:
                raise ValueError(
                    "--server-cmd must contain {socket}, or give --socket with the path it listens on"
                )
        self.server_cmd = server_cmd
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if socket_path is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="vnvme-check-")
            socket_path = os.path.join(self._tmp.name, "server.sock")
        self.socket = socket_path
        self.server: ServerProcess | None = None
        self._server_cpus: frozenset[int] | None = None
        self._used = False  # the running server has had a client
        #: Whether the server exits when its client hangs up (learnt after the first check).
        self.exits_on_hangup: bool | None = None
        self.starts = 0
        self.connected = False  # some connection succeeded during this run

    def describe(self) -> str:
        if self.server_cmd is None:
            return f"the server listening on {self.socket}"
        return f"servers started with: {self.server_cmd}"

    # Section: the server's life

    def _start(self, cpus: frozenset[int] | None) -> None:
        assert self.server_cmd is not None
        if os.path.lexists(self.socket):
            # Only a socket nobody answers on: anything else at the path is not ours to remove.
            if not _stale_socket(self.socket):
                raise Unusable(f"{self.socket} exists and is not a stale socket: not starting a server there")
            os.unlink(self.socket)
        command = [part.replace("{socket}", self.socket) for part in shlex.split(self.server_cmd)]
        try:
            self.server = ServerProcess(command, self.socket, cpus, ours=False)
        except (RuntimeError, OSError) as exc:
            raise Unusable(str(exc).strip()[:300]) from None
        self._server_cpus = cpus
        self._used = False
        self.starts += 1

    def _stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def _alive(self) -> bool:
        return self.server is not None and self.server.proc.poll() is None

    def server_alive(self) -> bool:
        """A server this run started is still running (False when it did not start one)."""
        return self._alive()

    def fresh(self, cpus: frozenset[int] | None = None) -> str:
        """The socket of a server ready for a new client: started (again) if there is none, it
        died, it exits on hang-up and has had a client, or it runs on other CPUs than asked."""
        if self.server_cmd is None:
            if cpus is not None:
                raise Skip("placing the server on a CPU needs --server-cmd")
            self._used = True
            return self.socket
        if self.server is not None and (
            not self._alive() or (self._used and self.exits_on_hangup) or cpus != self._server_cpus
        ):
            self._stop()
        if self.server is None:
            self._start(cpus)
        self._used = True
        return self.socket

    def again(self) -> str:
        """The socket of the server already used in this check, never a new one."""
        if self.server_cmd is not None and not self._alive():
            code = self.server.proc.returncode if self.server is not None else None
            raise Skip(f"the server exited (status {code}) after its client hung up: nothing to connect to")
        return self.socket

    def settle_after_hangup(self, *, expect_exit: bool = False) -> None:
        """Give a server started here that may exit on hang-up the time to do so."""
        if self.server is None or (self.exits_on_hangup is False and not expect_exit):
            return
        deadline = time.monotonic() + HANGUP_GRACE
        while self._alive() and time.monotonic() < deadline:
            time.sleep(0.02)

    def after_check(self) -> None:
        """Learn once whether the server exits when its client hangs up."""
        if self.server is None or not self._used or self.exits_on_hangup is not None:
            return
        self.settle_after_hangup(expect_exit=True)
        self.exits_on_hangup = not self._alive()

    def close(self) -> None:
        self._stop()
        if self._tmp is not None:
            self._tmp.cleanup()


def _stale_socket(path: str) -> bool:
    import socket
    import stat

    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return False
    except OSError:
        return False
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    finally:
        probe.close()
    return False


class Context:
    """One check's view of the target: connections made here are closed when it ends."""

    def __init__(self, target: Target, options: Options) -> None:
        self.target = target
        self.options = options
        self._connected = False
        self._cpus: frozenset[int] | None = None
        self._clients: list[VfioUserClient] = []
        self._transports: list[VfioUserTransport] = []
        self._drivers: list[NvmeDriver] = []

    def _path(self) -> str:
        if self._connected:
            return self.target.again()
        path = self.target.fresh(self._cpus)
        self._connected = True
        return path

    def _unreachable(self, path: str, exc: OSError) -> Exception:
        """Nothing answered at ``path``: the run is over if nothing ever did, else this check
        cannot run (the server went away after an earlier client)."""
        if not self.target.connected:
            return Unusable(f"cannot connect to {path}: {exc.strerror}")
        return Skip(f"cannot connect to {path} any more: {exc.strerror}")

    def client(self) -> VfioUserClient:
        """A bare connection: nothing sent yet (VERSION is the caller's)."""
        path = self._path()
        try:
            client = VfioUserClient(path, timeout=self.options.timeout)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise self._unreachable(path, exc) from None
        self.target.connected = True
        self._clients.append(client)
        return client

    def transport(self, **options: Any) -> VfioUserTransport:
        """VERSION, DMA_MAP of host memory, MSI-X eventfds, BAR0 and the command register set."""
        path = self._path()
        options.setdefault("memory_size", self.options.memory_size)
        try:
            transport = VfioUserTransport(path, timeout=self.options.timeout, **options)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise self._unreachable(path, exc) from None
        self.target.connected = True
        self._transports.append(transport)
        return transport

    def driver(
        self, transport: VfioUserTransport | None = None, *, probe: bool = True, **options: Any
    ) -> NvmeDriver:
        """The host driver on ``transport`` (a new one if None), probed as Linux would."""
        options.setdefault("io_queue_depth", self.options.io_queue_depth)
        options.setdefault("command_timeout", self.options.timeout)
        options.setdefault("async_events", False)
        driver = NvmeDriver(transport if transport is not None else self.transport(), **options)
        self._drivers.append(driver)
        if probe:
            driver.probe()
        return driver

    @contextlib.contextmanager
    def placement(self, placement: Placement) -> Iterator[None]:
        """Run the server (started for this check) and this process on the given CPUs."""
        if self._connected:
            raise RuntimeError("placement() must come before the check's first connection")
        if placement.server_cpus is None or placement.client_cpus is None:
            yield
            return
        self._cpus = placement.server_cpus
        old = os.sched_getaffinity(0)
        os.sched_setaffinity(0, placement.client_cpus)
        try:
            yield
        finally:
            os.sched_setaffinity(0, old)

    def close(self) -> None:
        for driver in reversed(self._drivers):
            with contextlib.suppress(Exception):
                driver.close()
        for transport in reversed(self._transports):
            with contextlib.suppress(Exception):
                transport.close()
        for client in reversed(self._clients):
            with contextlib.suppress(Exception):
                client.close()
        self._drivers.clear()
        self._transports.clear()
        self._clients.clear()
