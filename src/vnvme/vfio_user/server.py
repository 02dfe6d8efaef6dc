"""A vfio-user server for any device: one client at a time, every message checked.

The server owns the socket, the DMA mappings (mmapped into a :class:`GuestMemory`) and the
message loop; a :class:`Device` owns regions, interrupts and whatever runs behind them. Bad input
gets an error reply carrying an errno and the loop carries on with the next message, except a
header declaring a message larger than the maximum: E2BIG, then the server hangs up, since the
stream has no framing left to carry on with. A client that holds the server (no VERSION within
the handshake timeout, a message it stops part way through sending or reading for the message
timeout) is hung up on too, so the next one can be served (docs/RELIABILITY.md states every
resource bound).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import json
import logging
import mmap
import os
import resource
import select
import socket
import struct
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol

from vnvme.effects import TraceEvent
from vnvme.memory import GuestMemory, GuestMemoryError, RemoteAccess
from vnvme.trace import matching_events
from vnvme.vfio_user import protocol as vu
from vnvme.vfio_user.protocol import Channel, Command, Message, MessageTooLarge, ProtocolError

log = logging.getLogger("vnvme.vfio_user")

# Writes the device may act on before they are answered (see _act_before_reply).
_DEVICE_WRITES = frozenset({int(Command.REGION_WRITE), int(Command.REGION_WRITE_MULTI)})
_AFFINITY_CHECK_INTERVAL = 1024
_ACCESS_SIZE = vu.REGION_ACCESS.size
_ACCESS_UNPACK_FROM = vu.REGION_ACCESS.unpack_from
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
# Bound once: compiled, ``time.monotonic`` is a lookup in the time module per call (the
# loop reads the clock every pass, and per message while polling adaptively).
_monotonic: Final = time.monotonic
# Client commands kept while a DMA reply is awaited (answered after it): past this many, or
# payloads of more than this many of the largest message, or more than one message's worth of
# descriptors, the device's access fails at once rather than the queue growing until dma_timeout.
_MAX_DEFERRED = 1024
_MAX_DEFERRED_MESSAGES_BYTES = 4


def _shares_one_cpu_with_peer(sock: socket.socket) -> bool:
    """The process at the other end of a UNIX socket and this one may run on one CPU only,
    the same one (both pinned there)."""
    try:
        pid = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))[0]
        mine = os.sched_getaffinity(0)
        return len(mine) == 1 and pid > 0 and os.sched_getaffinity(pid) == mine
    except (OSError, AttributeError):  # not a UNIX socket, the peer gone, not Linux
        return False


PAGE_SIZE = 4096

# CPython's mmap keeps a duplicate of the file's descriptor while the map lives unless told
# not to (trackfd, Python 3.13): before that, each DMA region mapped costs one descriptor.
_MMAP_UNTRACKED: dict[str, bool] = {"trackfd": False} if sys.version_info >= (3, 13) else {}
DMA_MAP_DESCRIPTORS = 0 if _MMAP_UNTRACKED else 1
# Descriptors kept free beside DMA regions and eventfds: stdio, sockets, namespace and trace
# files, a message's descriptors in flight.
_SPARE_DESCRIPTORS = 64


def _open_descriptors() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:  # no procfs
        return 64


@dataclass
class Region:
    """One device region as DEVICE_GET_REGION_INFO describes it."""

    index: int
    size: int
    read: Callable[[int, int], bytes] | None = None
    write: Callable[[int, bytes], None] | None = None
    #: A file the client may mmap (whole region, or just ``sparse`` areas), or -1.
    mmap_fd: int = -1
    mmap_offset: int = 0
    sparse: list[tuple[int, int]] = field(default_factory=list)

    @property
    def flags(self) -> vu.RegionFlags:
        flags = vu.RegionFlags(0)
        if self.read is not None:
            flags |= vu.RegionFlags.READ
        if self.write is not None:
            flags |= vu.RegionFlags.WRITE
        if self.mmap_fd >= 0:
            flags |= vu.RegionFlags.MMAP
            if self.sparse:
                flags |= vu.RegionFlags.CAPS
        return flags


@dataclass(frozen=True)
class IrqType:
    index: int
    count: int
    flags: vu.IrqInfoFlags = vu.IrqInfoFlags.EVENTFD | vu.IrqInfoFlags.MASKABLE | vu.IrqInfoFlags.NORESIZE


class DeviceError(Exception):
    """A device refuses an access; the client gets an error reply with ``errno``."""

    def __init__(self, err: int, reason: str) -> None:
        super().__init__(reason)
        self.errno = err
        self.reason = reason


class HandshakeTimeout(Exception):
    """The client did not complete VERSION within ServerOptions.handshake_timeout."""


class Device(Protocol):
    """What a vfio-user server serves."""

    regions: dict[int, Region]
    irqs: dict[int, IrqType]
    memory: GuestMemory

    def attach(self) -> None:
        """A client connected (after VERSION)."""

    def detach(self) -> None:
        """The client went away: drop every eventfd and forget guest memory state."""

    def reset(self) -> None:
        """DEVICE_RESET."""

    def memory_changed(self) -> None:
        """A DMA region was mapped or is about to be unmapped: drop cached views now."""

    def set_irqs(self, index: int, flags: vu.IrqSetFlags, start: int, count: int, data: list[int]) -> None:
        """DEVICE_SET_IRQS: ``data`` holds eventfds (DATA_EVENTFD) or 0/1 (DATA_BOOL, NONE)."""

    def run(self, now: float, poll: bool = True) -> bool:
        """Do pending device work; True if more is pending right away (poll again). ``poll``
        False: the server will sleep after this pass unless work is pending, so a device that
        can poll serves what was signalled as an event-driven one would."""
        ...

    def next_deadline(self) -> float | None:
        """When :meth:`run` must be called at the latest even without a message."""
        ...

    def idle(self) -> bool:
        """About to block waiting for a message: True if nothing can happen meanwhile."""
        ...


@dataclass
class ServerOptions:
    max_data_xfer_size: int = vu.DEFAULT_MAX_DATA_XFER_SIZE
    max_msg_fds: int = 16
    #: Offered in VERSION and enforced (ENOSPC past it), lowered if each mapping costs a
    #: descriptor and the process's descriptor limit cannot hold this many (see
    #: VfioUserServer.max_dma_maps).
    max_dma_maps: int = 4096
    #: Keep calling Device.run while it reports work, checking the socket in between, for up to
    #: this many idle passes before blocking (0: purely event driven).
    poll_passes: int = 0
    #: The share of one CPU those idle passes may take over time (1.0: no limit): past it the
    #: device rearms and the server sleeps until a doorbell, so that a polling server never
    #: starves the client (a guest's vCPUs run on the same few CPUs).
    poll_budget: float = 1.0
    #: How long the server may poll in one go on saved budget (seconds).
    poll_burst: float = 0.005
    #: The longest adaptive poll window (seconds; see :class:`PollWindow`), or None: no
    #: window, idle passes go on up to poll_passes while the budget allows.
    poll_max: float | None = None
    #: How long a DMA_READ / DMA_WRITE to the client may take before the access fails.
    dma_timeout: float = 5.0
    #: Seconds a client has from connecting to complete VERSION (None: no limit). After it,
    #: no limit on silence: a client whose guest is idle legitimately sends nothing for hours.
    handshake_timeout: float | None = 10.0
    #: Seconds the rest of a message begun (half a header, a body not complete) may take to
    #: arrive before the connection is closed (None: no limit).
    message_timeout: float | None = 10.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.poll_budget <= 1.0:
            raise ValueError(f"poll budget {self.poll_budget}: a share of one CPU, 0..1")
        if self.poll_max is not None and not 0.0 <= self.poll_max <= MAX_POLL_WINDOW:
            raise ValueError(f"poll max {self.poll_max}: seconds, 0..{MAX_POLL_WINDOW}")
        for name in ("handshake_timeout", "message_timeout"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} {value}: seconds, more than 0 (None: no limit)")


class PollBudget:
    """Idle polling as a token bucket: time earns ``share`` seconds of polling per second (up
    to ``burst`` saved), and every idle polling pass spends what it took."""

    def __init__(self, share: float, burst: float, now: float) -> None:
        self.share = share
        self.burst = burst
        self.saved = burst
        self.last = now
        #: Seconds spent in idle polling passes, and passes cut short for want of budget.
        self.spent = 0.0
        self.exhausted = 0

    def spend(self, since: float, now: float) -> None:
        """An idle polling pass ran from ``since`` to ``now``."""
        self.spent += now - since
        self.saved -= now - since

    def allows(self, now: float) -> bool:
        if self.share >= 1.0:
            return True
        self.saved = min(self.burst, self.saved + (now - self.last) * self.share)
        self.last = now
        if self.saved > 0:
            return True
        self.exhausted += 1
        return False


#: PollWindow: the first window opened from nothing, and the factor it grows by (QEMU's
#: IOThread defaults: 4 us, poll-grow 2; its poll-shrink 0, collapse to nothing, is ours too).
POLL_WINDOW_START = 4e-6
POLL_WINDOW_GROW = 2.0
#: The largest poll window accepted (seconds): past a burst of budget it could never be spent.
MAX_POLL_WINDOW = 1.0


class PollWindow:
    """How long an idle server polls before it rearms and sleeps, learnt from how long work
    takes to come, after QEMU's IOThread adaptive polling.

    An idle period opens at the first pass that finds nothing and closes when work comes (a
    pass finds some, or a message arrives). Its length judges the window: within it, the window
    was right; after it but within ``max_window``, a longer window would have caught the work,
    so it doubles (from :data:`POLL_WINDOW_START`, up to ``max_window``); later than
    ``max_window``, no window worth its CPU would have, so it collapses to 0 and the server
    rearms and sleeps at once, as the event-driven controller does. The budget bounds every
    window. No clock inside: every moment is ``now``, in seconds.
    """

    def __init__(self, max_window: float, budget: PollBudget | None = None) -> None:
        self.max_window = max_window
        self.budget = budget
        #: The current window (seconds): how long an idle period is polled.
        self.window = 0.0
        self.grows = 0
        self.shrinks = 0
        #: Idle periods ended by a polling pass finding work, and by work after the server slept.
        self.found = 0
        self.woken = 0
        #: When the open idle period began (None: none open).
        self.idle_since: float | None = None
        self._polling = False

    @property
    def polls(self) -> bool:
        """Whether the next idle period is polled at all."""
        return self.window > 0.0

    def idle(self, now: float) -> bool:
        """A pass at ``now`` found nothing: True to poll again, False to rearm and sleep."""
        since = self.idle_since
        if since is None:
            self.idle_since = since = now
            self._polling = True
        if self._polling and now - since < self.window and (self.budget is None or self.budget.allows(now)):
            return True
        self._polling = False
        return False

    def stop(self) -> None:
        """The server sleeps for a reason of its own (its pass limit) within the window."""
        self._polling = False

    def work(self, now: float) -> None:
        """Work came at ``now``: the open idle period (if any) ends and judges the window."""
        since = self.idle_since
        if since is None:
            return
        self.idle_since = None
        if self._polling:
            self.found += 1
        else:
            self.woken += 1
        waited = now - since
        if waited <= self.window:
            return
        if waited > self.max_window:
            if self.window:
                self.window = 0.0
                self.shrinks += 1
        elif self.window < self.max_window:
            grown = self.window * POLL_WINDOW_GROW if self.window else POLL_WINDOW_START
            self.window = min(grown, self.max_window)
            self.grows += 1


@dataclass
class DmaMapping:
    address: int
    size: int
    flags: int
    map: mmap.mmap | None


class VfioUserServer:
    def __init__(
        self,
        device: Device,
        options: ServerOptions | None = None,
        *,
        trace: Sequence[str] = (),
        trace_sink: Callable[[TraceEvent], None] | None = None,
    ) -> None:
        self.device = device
        self.options = options or ServerOptions()
        # Transport trace events (vfio_user_*): the same table and sinks as the controller's.
        self._trace_set = (
            frozenset(n for n in matching_events(trace) if n.startswith("vfio_user_"))
            if trace
            else frozenset()
        )
        self._trace_sink = trace_sink
        # Messages taken, by command (named only when asked for: see messages).
        self._received: Counter[int] = Counter()
        self.errors: Counter[str] = Counter()
        self.clients_served = 0
        # The polling budget and adaptive window of the connection being served (or last served).
        self.poll_budget: PollBudget | None = None
        self.poll_window: PollWindow | None = None
        # What the device's next pass is told: whether the server may poll after it.
        self._device_polls = True
        self.dma: dict[int, DmaMapping] = {}
        self._remote_mappings = 0  # mappings without a descriptor (DMA_READ / DMA_WRITE messages)
        self._same_cpu = False  # see _act_before_reply
        # What Device.run said when a write ran it before its reply; None: the loop runs it.
        self._ran_early: bool | None = None
        # The last message was a write acted on before its reply (see serve_connection).
        self._replied_early = False
        self._writes_until_check = 0
        self.peer_max_fds = vu.DEFAULT_MAX_MSG_FDS
        self.peer_max_xfer = vu.DEFAULT_MAX_DATA_XFER_SIZE
        self._stop = False
        self._handlers: dict[int, Callable[[Message], tuple[bytes, list[int]] | None]] = {
            Command.VERSION: self._version,
            Command.DMA_MAP: self._dma_map,
            Command.DMA_UNMAP: self._dma_unmap,
            Command.DEVICE_GET_INFO: self._device_get_info,
            Command.DEVICE_GET_REGION_INFO: self._region_info,
            Command.DEVICE_GET_IRQ_INFO: self._irq_info,
            Command.DEVICE_SET_IRQS: self._set_irqs,
            Command.REGION_READ: self._region_read,
            Command.REGION_WRITE: self._region_write,
            Command.REGION_WRITE_MULTI: self._region_write_multi,
            Command.DEVICE_RESET: self._device_reset,
        }
        self.version_done = False
        self._channel: Channel | None = None
        self._deferred: collections.deque[Message] = collections.deque()
        self._deferred_bytes = 0  # their payloads
        self._deferred_fds = 0  # and descriptors
        # The listener and wake-up fd of the connection being served (serve_connection).
        self._others: tuple[socket.socket | None, int | None] = (None, None)
        self._watch: dict[int, Callable[[], None]] = {}
        self._stop_connection = False
        self._server_msg_id = 0
        self.dma_messages = 0
        #: The DMA regions a client may map at once (offered as max_dma_maps): the option's,
        #: or as many as the descriptor limit leaves room for beside what is open already,
        #: every interrupt vector's eventfd and two messages' descriptors.
        self.max_dma_maps = self.options.max_dma_maps
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if DMA_MAP_DESCRIPTORS and soft != resource.RLIM_INFINITY:
            vectors = sum(irq.count for irq in device.irqs.values())
            reserve = _open_descriptors() + vectors + 2 * self.options.max_msg_fds + _SPARE_DESCRIPTORS
            self.max_dma_maps = max(0, min(self.max_dma_maps, soft - reserve))

    def _trace(self, name: str, *args: int | str) -> None:
        if name in self._trace_set and self._trace_sink is not None:
            self._trace_sink(TraceEvent(name, args))

    @property
    def messages(self) -> Counter[str]:
        """Messages taken, by command name."""
        return Counter({vu.command_name(command): n for command, n in self._received.items()})

    @property
    def max_message(self) -> int:
        return self.options.max_data_xfer_size + vu.MESSAGE_OVERHEAD

    def stop(self) -> None:
        self._stop = True

    @property
    def stopping(self) -> bool:
        return self._stop

    # Section: the connection loop

    def serve_connection(
        self,
        sock: socket.socket,
        *,
        listener: socket.socket | None = None,
        wakeup: int | None = None,
        watch: Mapping[int, Callable[[], None]] | None = None,
    ) -> None:
        """Serve one client until it disconnects or :meth:`stop` is called; a second client
        connecting to ``listener`` meanwhile is refused (closed at once). ``watch``: more
        descriptors to poll in the same loop, each with what to call when it is readable (it
        must not block)."""
        channel = self._begin_connection(sock)
        poller = select.poll()
        self._watch = dict(watch or {})
        watched = (
            [sock.fileno()]
            + ([listener.fileno()] if listener else [])
            + ([wakeup] if wakeup is not None else [])
            + list(self._watch)
        )
        for fd in watched:
            poller.register(fd, select.POLLIN)
        reason = ""
        # One name per handler here and below: mypyc gives an ``as`` name one type per function.
        try:
            self._others = (listener, wakeup)
            self._serve_messages(channel, poller, watched)
        except MessageTooLarge as too_large:
            self._refuse_too_large(channel, too_large)
            reason = f"{too_large.reason}: framing lost, connection closed"
        except vu.MessageTimeout as stalled:
            self._stalled(stalled)
            reason = str(stalled)
        except HandshakeTimeout:
            seconds = self.options.handshake_timeout
            self.errors["handshake_timeout"] += 1
            log.warning("no VERSION within %s s of connecting; closing the connection", seconds)
            self._trace("vfio_user_err_handshake_timeout", str(seconds))
            reason = f"no VERSION within {seconds} s"
        except vu.Disconnected as gone:
            log.info("client disconnected")
            reason = str(gone)
        except (ConnectionResetError, BrokenPipeError) as lost:
            log.info("client connection lost: %s", lost)
            reason = str(lost)
        finally:
            self._end_connection(channel, reason)

    def _stalled(self, exc: vu.MessageTimeout) -> None:
        """A message begun was never completed (the client's, or ours it stopped reading):
        counted and traced; the connection ends."""
        self.errors["message_timeout"] += 1
        log.warning("%s; closing the connection", exc)
        self._trace("vfio_user_err_message_timeout", exc.direction, exc.done, exc.expected, str(exc.seconds))

    def _begin_connection(self, sock: socket.socket) -> Channel:
        channel = Channel(
            sock,
            max_message=self.max_message,
            max_fds=self.options.max_msg_fds,
            buffered=True,
            message_timeout=self.options.message_timeout,
        )
        self._channel = channel
        self._writes_until_check = 0  # a new client: look at its CPU affinity again
        self._ran_early = None
        self._replied_early = False
        self._deferred.clear()
        self._deferred_bytes = self._deferred_fds = 0
        self._stop_connection = False
        self.clients_served += 1
        self._trace("vfio_user_connect", self.clients_served)
        self.version_done = False
        return channel

    def _end_connection(self, channel: Channel, reason: str) -> None:
        if not reason:
            reason = "server stopping" if self._stop else "client unreachable"
        self._trace("vfio_user_disconnect", reason)
        self._channel = None
        channel.drop_pending()
        for message in self._deferred:
            message.close_fds()
        self._deferred.clear()
        self._deferred_bytes = self._deferred_fds = 0
        self._disconnect()

    def _serve_messages(self, channel: Channel, poller: select.poll, watched: list[int]) -> None:
        """The connection's loop: device passes, then messages (or a wait for one)."""
        device = self.device
        sock_fd = watched[0]
        passes = self.options.poll_passes
        idle_passes = 0
        budget = self.poll_budget = PollBudget(
            self.options.poll_budget, self.options.poll_burst, time.monotonic()
        )
        poll_max = self.options.poll_max
        window = self.poll_window = None if poll_max is None or not passes else PollWindow(poll_max, budget)
        self._device_polls = window is None
        spinning_since: float | None = None
        limit = self.options.handshake_timeout
        # Until VERSION is done, every wait ends by this time (None once it is done).
        handshake_by = None if limit is None else time.monotonic() + limit
        while not self._stop and not self._stop_connection:
            while self._deferred:
                # Commands that arrived while we waited for a DMA reply, in order.
                if window is not None:
                    self._message_came(window)
                self._handle_message(channel, self._undefer())
            if channel.framing_lost is not None:
                # Met while waiting for a DMA reply: answered after the commands before it.
                raise channel.framing_lost
            busy = self._ran_early
            now = _monotonic()
            if spinning_since is not None:
                budget.spend(spinning_since, now)
                spinning_since = None
            if busy is None:
                busy = device.run(now, self._device_polls)
            else:
                self._ran_early = None  # the pass the last message's write ran is this one
            if self._deferred or channel.framing_lost is not None:
                continue  # the pass waited for DMA replies and commands came in meanwhile
            if busy:
                if window is not None:
                    window.work(now)
                poll_on = True
            elif window is None:
                poll_on = idle_passes < passes and budget.allows(now)
            elif window.idle(now):
                poll_on = idle_passes < passes
                if not poll_on:
                    window.stop()
            else:
                poll_on = False
            if window is not None:
                self._device_polls = window.polls
            if poll_on:
                if not busy:
                    spinning_since = now  # an idle polling pass: charged to the budget
                idle_passes = 0 if busy else idle_passes + 1
                timeout_ms: float | None = 0
            elif device.idle():
                deadline = device.next_deadline()
                timeout_ms = None if deadline is None else max(0.0, (deadline - _monotonic()) * 1e3)
            else:
                idle_passes = 0
                continue
            if handshake_by is not None:
                if self.version_done:
                    handshake_by = None
                else:
                    left_ms = (handshake_by - time.monotonic()) * 1e3
                    if left_ms <= 0:
                        raise HandshakeTimeout
                    timeout_ms = left_ms if timeout_ms is None else min(timeout_ms, left_ms)
            if channel.buffered_header():
                # A message came in with the last read: poll() cannot see it.
                events = [(sock_fd, select.POLLIN)]
            else:
                if timeout_ms != 0 and self._replied_early:
                    # About to wait, but a client on our CPU answered after we acted on its write
                    # has usually sent its next message by now: one read, no poll(). Once after
                    # each early reply; not in polling passes, where poll(0) is cheaper than a
                    # failed read, nor after posted writes, which no reply paces.
                    self._replied_early = False
                    early = channel.receive_nowait()
                    if early is not None:
                        if window is not None:
                            self._message_came(window)
                        self._handle_message(channel, early)
                        idle_passes = 0
                        continue
                events = self._wait(poller, watched, timeout_ms)
            for fd, _ in events:
                if fd == sock_fd:
                    if window is not None:  # a call per message only when polling adaptively
                        self._message_came(window)
                    self._handle_message(channel, channel.receive())  # _handle_one
                    idle_passes = 0
                else:
                    self._other_event(fd)

    @staticmethod
    def _message_came(window: PollWindow) -> None:
        """A message is work come (a doorbell, most often): it ends an idle period."""
        if window.idle_since is not None:
            window.work(_monotonic())

    def _wait(
        self, poller: select.poll, watched: list[int], timeout_ms: float | None
    ) -> list[tuple[int, int]]:
        """The fds ready within ``timeout_ms`` (None: no limit)."""
        if timeout_ms is not None and 0 < timeout_ms < 1:
            # poll() rounds a timeout up to whole milliseconds; select() waits in microseconds.
            ready, _, _ = select.select(watched, [], [], timeout_ms / 1e3)
            return [(fd, select.POLLIN) for fd in ready]
        return poller.poll(timeout_ms)

    def _other_event(self, fd: int) -> None:
        """A second client at the listener (refused), the wake-up fd (drained), or a watched fd."""
        listener, wakeup = self._others
        if fd in self._watch:
            self._watch[fd]()
        elif listener is not None and fd == listener.fileno():
            extra, _ = listener.accept()
            log.warning("refusing a second client while one is attached")
            self.errors["second_client"] += 1
            extra.close()
        elif wakeup is not None and fd == wakeup:
            with contextlib.suppress(BlockingIOError):
                os.read(wakeup, 512)

    def _refuse_too_large(self, channel: Channel, exc: MessageTooLarge) -> None:
        """E2BIG for a header declaring more than the maximum (none of its body read), then
        hang up: the caller still owns and closes the socket, shut down here so the client sees
        the end at once whatever the caller does."""
        name = vu.command_name(exc.command)
        self.errors["message_too_large"] += 1
        log.warning("%s id %d: %s; closing the connection", name, exc.msg_id, exc.reason)
        self._trace("vfio_user_err_message_too_large", name, exc.msg_id, exc.size, exc.limit)
        with contextlib.suppress(OSError):
            if not exc.flags & vu.FLAG_NO_REPLY:
                # As every error reply: the header only, with the request's id and command.
                channel.send(
                    vu.pack_message(exc.msg_id, exc.command, vu.TYPE_REPLY | vu.FLAG_ERROR, b"", exc.errno)
                )
            channel.sock.shutdown(socket.SHUT_RDWR)

    def _handle_one(self, channel: Channel) -> None:
        self._handle_message(channel, channel.receive())

    def _handle_message(self, channel: Channel, message: Message) -> None:
        self._ran_early = None
        self._replied_early = False
        self._received[message.command] += 1
        try:
            result = self._dispatch(message)
        except (ProtocolError, DeviceError) as refused:
            name = vu.command_name(message.command)
            self.errors[name] += 1
            log.debug("%s refused: %s", name, refused)
            self._trace("vfio_user_err_message", name, message.msg_id, refused.errno, refused.reason)
            message.close_fds()
            if not message.no_reply:
                channel.reply_error(message, refused.errno)
            return
        except Exception as bug:  # a bug here must not take the server down
            name = vu.command_name(message.command)
            self.errors[name] += 1
            log.exception("%s failed", name)
            self._trace("vfio_user_err_message", name, message.msg_id, errno.EIO, repr(bug))
            message.close_fds()
            if not message.no_reply:
                channel.reply_error(message, errno.EIO)
            del bug
            return
        if result is None or message.flags & vu.FLAG_NO_REPLY:
            return
        if message.command in _DEVICE_WRITES and self._act_before_reply(channel):
            self._ran_early = self.device.run(_monotonic(), self._device_polls)
            self._replied_early = True
        payload, fds = result
        channel.reply(message, payload, fds)

    def _act_before_reply(self, channel: Channel) -> bool:
        """Whether the device should act on a write (a doorbell) before it is answered.

        Yes when the client can only run on the one CPU we run on: the reply wakes it and it
        may take the CPU at once; it then finds the completions with the reply, instead of
        waiting again for the interrupt (the CPU going back and forth twice per doorbell).
        On another CPU the client is better off hearing back at once: its wake-up overlaps
        the device's work. Never with memory reached through DMA messages: the write is
        answered first and the work follows. Affinities are looked at again every so often.
        """
        if self._remote_mappings:
            return False
        self._writes_until_check -= 1
        if self._writes_until_check <= 0:
            self._writes_until_check = _AFFINITY_CHECK_INTERVAL
            self._same_cpu = _shares_one_cpu_with_peer(channel.sock)
        return self._same_cpu

    def _dispatch(self, message: Message) -> tuple[bytes, list[int]] | None:
        if (
            message.flags & vu.TYPE_MASK == vu.TYPE_COMMAND
            and self.version_done
            and not (message.undersized or message.fds_truncated or message.fds)
        ):
            # A well-formed command without descriptors (every one on the I/O path): only
            # the handler is left to check; anything else meets the checks below in order.
            handler = self._handlers.get(message.command)
            if handler is not None:
                return handler(message)
        if message.undersized:
            raise ProtocolError(errno.EINVAL, "message size smaller than the header")
        if message.is_reply or message.flags & vu.TYPE_MASK not in (vu.TYPE_COMMAND,):
            raise ProtocolError(errno.EINVAL, "expected a command message")
        if message.fds_truncated:
            raise ProtocolError(errno.EINVAL, "too many file descriptors")
        if not self.version_done and message.command != Command.VERSION:
            raise ProtocolError(errno.EINVAL, "VERSION must come first")
        handler = self._handlers.get(message.command)
        if handler is None:
            raise ProtocolError(errno.ENOSYS, f"command {message.command} not supported")
        if message.fds and message.command not in (Command.DMA_MAP, Command.DEVICE_SET_IRQS):
            raise ProtocolError(errno.EINVAL, "unexpected file descriptors")
        return handler(message)

    def _disconnect(self) -> None:
        """Client gone: the device resets as on a bus reset and every mapping is dropped."""
        try:
            self.device.detach()
        finally:
            self._unmap_all()

    # Section: handlers

    def _version(self, message: Message) -> tuple[bytes, list[int]]:
        payload = message.payload
        if len(payload) < 4:
            raise ProtocolError(errno.EINVAL, "VERSION too short")
        major = int.from_bytes(payload[0:2], "little")
        minor = int.from_bytes(payload[2:4], "little")
        if major != vu.VERSION_MAJOR:
            raise ProtocolError(errno.ENOTSUP, f"protocol major {major} not supported")
        caps: dict[str, object] = {}
        text = payload[4:].split(b"\0", 1)[0]
        if text:
            try:
                parsed = json.loads(text)
            except (ValueError, UnicodeDecodeError, RecursionError):
                # RecursionError: nesting deeper than the decoder follows ("[[[[...").
                raise ProtocolError(errno.EINVAL, "VERSION capabilities are not JSON") from None
            if not isinstance(parsed, dict):
                raise ProtocolError(errno.EINVAL, "VERSION data is not an object")
            got = parsed.get("capabilities", {})
            if not isinstance(got, dict):
                raise ProtocolError(errno.EINVAL, "capabilities is not an object")
            caps = got
        max_fds = caps.get("max_msg_fds", vu.DEFAULT_MAX_MSG_FDS)
        max_xfer = caps.get("max_data_xfer_size", vu.DEFAULT_MAX_DATA_XFER_SIZE)
        # JSON true / false decode to bool, an int subclass: a count must be a plain number.
        if type(max_fds) is not int or type(max_xfer) is not int or max_fds < 0 or max_xfer < 1:
            raise ProtocolError(errno.EINVAL, "bad max_msg_fds / max_data_xfer_size")
        self.peer_max_fds, self.peer_max_xfer = max_fds, max_xfer
        reply_caps = {
            "capabilities": {
                "max_msg_fds": self.options.max_msg_fds,
                "max_data_xfer_size": self.options.max_data_xfer_size,
                "max_dma_maps": self.max_dma_maps,
                "pgsizes": PAGE_SIZE,
                "write_multiple": True,
            }
        }
        if self.version_done:
            self._disconnect_state()
        self.version_done = True
        self._trace("vfio_user_version", major, minor, max_fds, max_xfer)
        self.device.attach()
        body = json.dumps(reply_caps).encode() + b"\0"
        return (
            vu.VERSION_MAJOR.to_bytes(2, "little")
            + min(minor, vu.VERSION_MINOR).to_bytes(2, "little")
            + body,
            [],
        )

    def _disconnect_state(self) -> None:
        self.device.detach()
        self._unmap_all()

    def _dma_map(self, message: Message) -> tuple[bytes, list[int]]:
        if len(message.payload) < vu.DMA_MAP.size:
            raise ProtocolError(errno.EINVAL, "DMA_MAP too short")
        argsz, flags, offset, address, size = vu.DMA_MAP.unpack_from(message.payload)
        fds = message.fds
        fds_seen = fds[0] if fds else -1
        try:
            if argsz < vu.DMA_MAP.size or len(fds) > 1:
                raise ProtocolError(errno.EINVAL, "DMA_MAP argsz or fd count")
            # ~ of an IntFlag stays inside its members (0 here): complement the plain int.
            if flags & ~int(vu.DmaFlags.READ | vu.DmaFlags.WRITE) or not flags & vu.DmaFlags.READ:
                raise ProtocolError(errno.EINVAL, f"DMA_MAP flags {flags:#x}")
            if size == 0 or (address | size | offset) & (PAGE_SIZE - 1) or address + size > 1 << 64:
                raise ProtocolError(errno.EINVAL, "DMA_MAP address, size or offset not page aligned")
            if len(self.dma) >= self.max_dma_maps:
                raise ProtocolError(errno.ENOSPC, "too many DMA mappings")
            for other in self.dma.values():
                if address < other.address + other.size and other.address < address + size:
                    raise ProtocolError(errno.EEXIST, f"DMA_MAP overlaps the mapping at {other.address:#x}")
            if not fds:
                # Not mappable: the device reaches it with DMA_READ / DMA_WRITE messages.
                if offset:
                    raise ProtocolError(errno.EINVAL, "DMA_MAP offset without a file descriptor")
                access = RemoteAccess(self._remote_read, self._remote_write)
                writable = bool(flags & vu.DmaFlags.WRITE)
                self.device.memory.map_remote(address, size, access, writable=writable)
                self.dma[address] = DmaMapping(address, size, flags, None)
                self._remote_mappings += 1
                self._trace("vfio_user_dma_map", address, size, flags, -1)
                self.device.memory_changed()
                return b"", []
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if flags & vu.DmaFlags.WRITE else 0)
            try:
                mapping = mmap.mmap(
                    fds[0], size, flags=mmap.MAP_SHARED, prot=prot, offset=offset, **_MMAP_UNTRACKED
                )
            except (OSError, ValueError, OverflowError) as exc:
                raise ProtocolError(getattr(exc, "errno", None) or errno.EINVAL, f"mmap: {exc}") from None
        finally:
            message.close_fds()
        self.device.memory.map(address, mapping, writable=bool(flags & vu.DmaFlags.WRITE), owner=mapping)
        self.dma[address] = DmaMapping(address, size, flags, mapping)
        self._trace("vfio_user_dma_map", address, size, flags, fds_seen)
        self.device.memory_changed()
        return b"", []

    def _dma_unmap(self, message: Message) -> tuple[bytes, list[int]]:
        if len(message.payload) < vu.DMA_UNMAP.size:
            raise ProtocolError(errno.EINVAL, "DMA_UNMAP too short")
        argsz, flags, address, size = vu.DMA_UNMAP.unpack_from(message.payload)
        if flags & vu.DmaUnmapFlags.GET_DIRTY_BITMAP:
            raise ProtocolError(errno.ENOTSUP, "dirty page tracking is not supported")
        if flags & ~int(vu.DmaUnmapFlags.ALL):
            raise ProtocolError(errno.EINVAL, f"DMA_UNMAP flags {flags:#x}")
        if flags & vu.DmaUnmapFlags.ALL:
            if address or size:
                raise ProtocolError(errno.EINVAL, "DMA_UNMAP ALL with an address or size")
            self._unmap_all()
        else:
            mapping = self.dma.get(address)
            if mapping is None or mapping.size != size:
                raise ProtocolError(errno.ENOENT, f"no DMA mapping [{address:#x}, +{size:#x})")
            self._unmap(mapping)
        return vu.DMA_UNMAP.pack(vu.DMA_UNMAP.size, flags, address, size), []

    # Section: DMA through messages (memory mapped without a file descriptor)

    def _remote_read(self, address: int, dest: memoryview) -> None:
        step = max(1, min(self.peer_max_xfer, self.options.max_data_xfer_size))
        for pos in range(0, len(dest), step):
            count = min(step, len(dest) - pos)
            reply = self._dma_request(
                Command.DMA_READ, vu.DMA_ACCESS.pack(address + pos, count), address + pos, count
            )
            if len(reply) < vu.DMA_ACCESS.size + count:
                raise GuestMemoryError(address + pos, count, "short DMA_READ reply")
            got_addr, got_count = vu.DMA_ACCESS.unpack_from(reply)
            if (got_addr, got_count) != (address + pos, count):
                raise GuestMemoryError(address + pos, count, "DMA_READ reply for another range")
            dest[pos : pos + count] = reply[vu.DMA_ACCESS.size : vu.DMA_ACCESS.size + count]

    def _remote_write(self, address: int, src: memoryview) -> None:
        step = max(1, min(self.peer_max_xfer, self.options.max_data_xfer_size))
        for pos in range(0, len(src), step):
            count = min(step, len(src) - pos)
            payload = vu.DMA_ACCESS.pack(address + pos, count) + bytes(src[pos : pos + count])
            self._dma_request(Command.DMA_WRITE, payload, address + pos, count)

    def _dma_request(self, command: Command, payload: bytes, address: int, count: int) -> bytes:
        """Send a server-to-client request and wait for its reply; client commands arriving
        meanwhile are kept for the main loop. Failures are the device's data transfer errors."""
        channel = self._channel
        if channel is None:
            raise GuestMemoryError(address, count, "no client to reach")
        if channel.framing_lost is not None:
            raise GuestMemoryError(address, count, "the client's message stream lost its framing")
        self._server_msg_id = (self._server_msg_id + 1) & 0xFFFF
        msg_id = self._server_msg_id
        self.dma_messages += 1
        self._trace("vfio_user_dma_request", command.name, address, count)
        try:
            channel.send(vu.pack_message(msg_id, command, vu.TYPE_COMMAND, payload))
            deadline = time.monotonic() + self.options.dma_timeout
            while True:
                remaining = deadline - time.monotonic()
                if (
                    not channel.buffered_header()
                    and not select.select([channel.sock], [], [], max(remaining, 0))[0]
                ):
                    raise GuestMemoryError(address, count, f"no reply to {command.name}")
                try:
                    message = channel.receive()
                except MessageTooLarge:
                    # The main loop answers it (after the commands deferred before it) and
                    # hangs up; the device's access fails meanwhile.
                    raise GuestMemoryError(address, count, "the client sent a message too large") from None
                if message.is_reply and message.msg_id == msg_id and message.command == command:
                    if message.is_error:
                        raise GuestMemoryError(address, count, f"{command.name}: errno {message.error}")
                    return message.payload
                if message.is_reply:
                    self.errors["stray_reply"] += 1
                    message.close_fds()
                    continue
                if not self._defer(message):
                    self.errors["deferred_overflow"] += 1
                    raise GuestMemoryError(
                        address,
                        count,
                        f"{len(self._deferred)} commands came instead of the {command.name} reply",
                    )
        except (vu.Disconnected, OSError) as exc:
            self._stop_connection = True
            if isinstance(exc, vu.MessageTimeout):
                self._stalled(exc)
            raise GuestMemoryError(address, count, f"client unreachable: {exc}") from None

    def _defer(self, message: Message) -> bool:
        """Keep a command for the main loop; False once the deferred commands reach a limit."""
        self._deferred.append(message)
        self._deferred_bytes += len(message.payload)
        self._deferred_fds += len(message.fds)
        return (
            len(self._deferred) < _MAX_DEFERRED
            and self._deferred_bytes <= _MAX_DEFERRED_MESSAGES_BYTES * self.max_message
            and self._deferred_fds <= self.options.max_msg_fds
        )

    def _undefer(self) -> Message:
        message = self._deferred.popleft()
        self._deferred_bytes -= len(message.payload)
        self._deferred_fds -= len(message.fds)
        return message

    def _unmap(self, mapping: DmaMapping) -> None:
        self._trace("vfio_user_dma_unmap", mapping.address, mapping.size)
        del self.dma[mapping.address]
        if mapping.map is None:
            self._remote_mappings -= 1
        self.device.memory.unmap(mapping.address, mapping.size)
        # Release every view the device holds before the memory goes (spec: before replying).
        self.device.memory_changed()
        if mapping.map is not None:
            mapping.map.close()

    def _unmap_all(self) -> None:
        for mapping in list(self.dma.values()):
            self._unmap(mapping)

    def _device_get_info(self, message: Message) -> tuple[bytes, list[int]]:
        if len(message.payload) < vu.DEVICE_INFO.size:
            raise ProtocolError(errno.EINVAL, "DEVICE_GET_INFO too short")
        flags = vu.DeviceFlags.RESET | vu.DeviceFlags.PCI
        return vu.DEVICE_INFO.pack(vu.DEVICE_INFO.size, flags, vu.PCI_NUM_REGIONS, vu.PCI_NUM_IRQS), []

    def _region_info(self, message: Message) -> tuple[bytes, list[int]]:
        if len(message.payload) < vu.REGION_INFO.size:
            raise ProtocolError(errno.EINVAL, "DEVICE_GET_REGION_INFO too short")
        argsz, _flags, index, _cap, _size, _offset = vu.REGION_INFO.unpack_from(message.payload)
        if index >= vu.PCI_NUM_REGIONS:
            raise ProtocolError(errno.EINVAL, f"region {index} does not exist")
        region = self.device.regions.get(index)
        if region is None:
            return vu.REGION_INFO.pack(vu.REGION_INFO.size, 0, index, 0, 0, 0), []
        caps = b""
        if region.sparse and region.mmap_fd >= 0:
            caps = (
                vu.CAP_HEADER.pack(vu.REGION_INFO_CAP_SPARSE_MMAP, 1, 0)
                + vu.SPARSE_MMAP.pack(len(region.sparse), 0)
                + b"".join(vu.SPARSE_AREA.pack(off, size) for off, size in region.sparse)
            )
        need = vu.REGION_INFO.size + len(caps)
        flags = region.flags
        if argsz < need:
            # Say how much room the full answer needs, without the caps; and without the CAPS
            # flag (as libvfio-user): QEMU's vfio-user-pci refuses CAPS with cap_offset 0 (EINVAL).
            short_flags = flags & ~vu.RegionFlags.CAPS
            info = vu.REGION_INFO.pack(need, short_flags, index, 0, region.size, region.mmap_offset)
            return info, [region.mmap_fd] if region.mmap_fd >= 0 else []
        cap_offset = vu.REGION_INFO.size if caps else 0
        info = vu.REGION_INFO.pack(need, flags, index, cap_offset, region.size, region.mmap_offset)
        return info + caps, [region.mmap_fd] if region.mmap_fd >= 0 else []

    def _irq_info(self, message: Message) -> tuple[bytes, list[int]]:
        if len(message.payload) < vu.IRQ_INFO.size:
            raise ProtocolError(errno.EINVAL, "DEVICE_GET_IRQ_INFO too short")
        _argsz, _flags, index, _count = vu.IRQ_INFO.unpack_from(message.payload)
        if index >= vu.PCI_NUM_IRQS:
            raise ProtocolError(errno.EINVAL, f"IRQ index {index} does not exist")
        irq = self.device.irqs.get(index)
        if irq is None:
            return vu.IRQ_INFO.pack(vu.IRQ_INFO.size, 0, index, 0), []
        return vu.IRQ_INFO.pack(vu.IRQ_INFO.size, irq.flags, index, irq.count), []

    def _set_irqs(self, message: Message) -> tuple[bytes, list[int]]:
        payload, fds = message.payload, message.fds
        try:
            if len(payload) < vu.IRQ_SET.size:
                raise ProtocolError(errno.EINVAL, "DEVICE_SET_IRQS too short")
            argsz, flags, index, start, count = vu.IRQ_SET.unpack_from(payload)
            self._trace("vfio_user_set_irqs", index, flags, start, count)
            data_kind = flags & vu.IRQ_SET_DATA_MASK
            action = flags & vu.IRQ_SET_ACTION_MASK
            if flags & ~int(vu.IRQ_SET_DATA_MASK | vu.IRQ_SET_ACTION_MASK):
                raise ProtocolError(errno.EINVAL, f"SET_IRQS flags {flags:#x}")
            if data_kind.bit_count() != 1 or action.bit_count() != 1:
                raise ProtocolError(errno.EINVAL, "SET_IRQS needs exactly one DATA and one ACTION flag")
            irq = self.device.irqs.get(index)
            if irq is None:
                raise ProtocolError(errno.EINVAL, f"IRQ index {index} not supported")
            if start > irq.count or count > irq.count - start:
                raise ProtocolError(errno.EINVAL, f"SET_IRQS range {start}+{count} beyond {irq.count}")
            data: list[int]
            if data_kind == vu.IrqSetFlags.DATA_EVENTFD:
                # QEMU sends either one fd for each vector, or none to de-assign them all.
                if fds and len(fds) != count:
                    raise ProtocolError(errno.EINVAL, f"{len(fds)} eventfds for {count} vectors")
                if action != vu.IrqSetFlags.ACTION_TRIGGER:
                    raise ProtocolError(errno.ENOTSUP, "only TRIGGER eventfds are supported")
                data = list(fds) if fds else [-1] * count
                fds_taken = list(fds)
                message.fds = []  # the device owns them now
                try:
                    self.device.set_irqs(index, vu.IrqSetFlags(flags), start, count, data)
                except BaseException:
                    for fd in fds_taken:
                        os.close(fd)
                    raise
                return b"", []
            if fds:
                raise ProtocolError(errno.EINVAL, "file descriptors without DATA_EVENTFD")
            if data_kind == vu.IrqSetFlags.DATA_BOOL:
                raw = payload[vu.IRQ_SET.size : vu.IRQ_SET.size + count]
                if len(raw) < count or argsz < vu.IRQ_SET.size + count:
                    raise ProtocolError(errno.EINVAL, "SET_IRQS DATA_BOOL shorter than count")
                data = [1 if b else 0 for b in raw]
            else:
                data = [1] * count
            self.device.set_irqs(index, vu.IrqSetFlags(flags), start, count, data)
            return b"", []
        finally:
            message.close_fds()

    def _region(self, index: int, offset: int, count: int) -> Region:
        region = self.device.regions.get(index)
        if region is None:
            raise ProtocolError(errno.EINVAL, f"region {index} does not exist")
        if count == 0 or count > self.options.max_data_xfer_size:
            raise ProtocolError(errno.EINVAL, f"access of {count} bytes")
        if offset >= region.size or count > region.size - offset:
            raise ProtocolError(errno.EINVAL, f"access [{offset:#x}, +{count}) beyond region {index}")
        return region

    def _region_read(self, message: Message) -> tuple[bytes, list[int]]:
        if len(message.payload) < vu.REGION_ACCESS.size:
            raise ProtocolError(errno.EINVAL, "REGION_READ too short")
        offset, index, count = vu.REGION_ACCESS.unpack_from(message.payload)
        region = self._region(index, offset, count)
        if region.read is None:
            raise ProtocolError(errno.EPERM, f"region {index} is not readable")
        data = region.read(offset, count)
        return vu.REGION_ACCESS.pack(offset, index, len(data)) + data, []

    def _region_write(self, message: Message) -> tuple[bytes, list[int]]:
        payload = message.payload
        if len(payload) < _ACCESS_SIZE:
            raise ProtocolError(errno.EINVAL, "REGION_WRITE too short")
        offset, index, count = _ACCESS_UNPACK_FROM(payload)
        region = self._region(index, offset, count)
        if len(payload) - _ACCESS_SIZE != count:
            raise ProtocolError(
                errno.EINVAL, f"REGION_WRITE count {count} but {len(payload) - 16} data bytes"
            )
        if region.write is None:
            raise ProtocolError(errno.EPERM, f"region {index} is read-only")
        region.write(offset, payload[_ACCESS_SIZE:])
        # The reply echoes offset, region and count: the request's own first 16 bytes.
        return payload[:_ACCESS_SIZE], []

    def _region_write_multi(self, message: Message) -> tuple[bytes, list[int]]:
        payload = message.payload
        if len(payload) < vu.WRITE_MULTI_COUNT.size:
            raise ProtocolError(errno.EINVAL, "REGION_WRITE_MULTI too short")
        (wr_cnt,) = vu.WRITE_MULTI_COUNT.unpack_from(payload)
        entry = vu.WRITE_MULTI_ENTRY
        if wr_cnt > (len(payload) - 8) // entry.size or len(payload) != 8 + wr_cnt * entry.size:
            raise ProtocolError(
                errno.EINVAL, f"REGION_WRITE_MULTI of {wr_cnt} writes in {len(payload)} bytes"
            )
        # Check every entry before the first write: a refused message changes nothing (only a
        # device refusing one write can stop the rest part way).
        writes: list[tuple[Callable[[int, bytes], None], int, bytes]] = []
        for i in range(wr_cnt):
            offset, index, count, data = entry.unpack_from(payload, 8 + i * entry.size)
            if count > 8:
                raise ProtocolError(errno.EINVAL, "REGION_WRITE_MULTI entry longer than 8 bytes")
            region = self._region(index, offset, count)
            if region.write is None:
                raise ProtocolError(errno.EPERM, f"region {index} is read-only")
            writes.append((region.write, offset, data[:count]))
        for write, offset, data in writes:
            write(offset, data)
        return vu.WRITE_MULTI_COUNT.pack(len(writes)), []

    def _device_reset(self, message: Message) -> tuple[bytes, list[int]]:
        self._trace("vfio_user_reset")
        self.device.reset()
        return b"", []
