#!/usr/bin/env python3
"""Hostile vfio-user peers against a `vnvme serve` process, one after another, each followed by a
well-behaved client doing verified I/O. Prints the server's open descriptors (/proc/PID/fd),
mappings of the peers' memfds (/proc/PID/maps) and VmRSS before, at the peak, and after each.

    PYTHONPATH=src python scripts/hostile_peers.py [--timeout 1] [--json]

Exit status 1 if a peer left the server with more descriptors or mappings than it had before,
or the next client was not served.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import json
import os
import select
import socket
import subprocess
import sys
import tempfile
import termios
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

from vnvme.bench.scale import sample as server_usage
from vnvme.driver import NvmeDriver
from vnvme.driver.vfio_user import VfioUserTransport
from vnvme.vfio_user import protocol as vu
from vnvme.vfio_user.protocol import Channel, Command

MEMFD_NAME = "vnvme-hostile"
SCM_MAX_FD = 253  # the kernel's limit of descriptors in one SCM_RIGHTS message
PAGE = 4096


@dataclass
class Sample:
    fds: int
    maps: int
    rss_kib: int


@dataclass
class Outcome:
    peer: str
    what: str
    before: Sample
    peak: Sample
    after: Sample
    seconds: float
    next_client_io: bool
    notes: dict[str, object] = field(default_factory=dict)


class Server:
    def __init__(self, directory: str, timeout: float) -> None:
        self.path = os.path.join(directory, "vnvme.sock")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vnvme", "serve", "--socket", self.path, "--namespace", "ram,size=8M"]
            + ["--handshake-timeout", str(timeout), "--message-timeout", str(timeout)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 30
        while not os.path.exists(self.path):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise SystemExit(
                    f"vnvme serve did not start: {self.proc.stderr.read() if self.proc.stderr else ''}"
                )
            time.sleep(0.02)

    def sample(self) -> Sample:
        pid = self.proc.pid
        usage = server_usage(pid)  # descriptors and VmRSS, read as the scale bench reads them
        with open(f"/proc/{pid}/maps") as maps:
            mapped = sum(1 for line in maps if MEMFD_NAME in line)
        return Sample(usage.fds, mapped, usage.rss_kib)

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.terminate()  # our own child, by its PID
        out, _err = self.proc.communicate(timeout=30)
        return out


def connect(path: str) -> tuple[socket.socket, Channel]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    return sock, Channel(sock, max_message=1 << 21, max_fds=4)


def call(
    channel: Channel, msg_id: int, command: int, payload: bytes, fds: list[int] | None = None
) -> vu.Message:
    channel.send(vu.pack_message(msg_id, command, vu.TYPE_COMMAND, payload), fds)
    if not select.select([channel.sock], [], [], 30)[0]:
        raise SystemExit(f"no reply to {vu.command_name(command)} within 30 s")
    return channel.receive()


def version(channel: Channel) -> dict[str, object]:
    payload = b"\0\0\1\0" + json.dumps({"capabilities": {"max_msg_fds": 4}}).encode() + b"\0"
    reply = call(channel, 1, Command.VERSION, payload)
    caps: dict[str, object] = json.loads(reply.payload[4:].rstrip(b"\0"))["capabilities"]
    return caps


def wait_hung_up(sock: socket.socket, limit: float = 60) -> float:
    """Seconds until the server closes the connection (EOF or reset)."""
    start = time.monotonic()
    sock.settimeout(limit)
    with contextlib.suppress(ConnectionResetError):
        while sock.recv(1 << 16):
            pass
    sock.close()
    return time.monotonic() - start


def hang_up(sock: socket.socket) -> None:
    """Close our end and wait until the server has closed its own (its clean-up done)."""
    sock.shutdown(socket.SHUT_WR)
    wait_hung_up(sock)


def wait_read(sock: socket.socket) -> None:
    """Until the server has read everything sent (our send queue is empty)."""
    deadline = time.monotonic() + 30
    while fcntl.ioctl(sock, termios.TIOCOUTQ, b"\0\0\0\0") != b"\0\0\0\0" and time.monotonic() < deadline:
        time.sleep(0.01)


def well_behaved_client(path: str) -> bool:
    transport = VfioUserTransport(path, memory_size=4 << 20, timeout=30)
    try:
        driver = NvmeDriver(transport, io_queue_depth=8)
        driver.probe()
        data = os.urandom(8192)
        driver.write(1, 16, data)
        ok = driver.read(1, 16, 16) == data
        driver.shutdown()
        driver.close()
        hang_up(transport.client.channel.sock)
        return ok
    finally:
        transport.close()


# Section: the peers. Each returns notes, and calls peak() at its worst moment.

Peak = Callable[[], None]


def max_dma_regions(path: str, peak: Peak) -> dict[str, object]:
    sock, channel = connect(path)
    limit = version(channel)["max_dma_maps"]
    assert isinstance(limit, int)
    memfd = os.memfd_create(MEMFD_NAME, os.MFD_CLOEXEC)
    os.ftruncate(memfd, PAGE)
    flags = vu.DmaFlags.READ | vu.DmaFlags.WRITE
    mapped = 0
    for i in range(limit + 1):
        payload = vu.DMA_MAP.pack(vu.DMA_MAP.size, flags, 0, (1 << 32) + 2 * i * PAGE, PAGE)
        reply = call(channel, 2 + i & 0xFFFF, Command.DMA_MAP, payload, [memfd])
        if reply.is_error:
            break
        mapped += 1
    peak()
    os.close(memfd)
    hang_up(sock)
    return {
        "max_dma_maps": limit,
        "mapped": mapped,
        "one_more": errno.errorcode.get(reply.error, reply.error),
    }


def max_fds_in_one_message(path: str, peak: Peak) -> dict[str, object]:
    sock, channel = connect(path)
    caps = version(channel)
    source = os.eventfd(0, os.EFD_CLOEXEC)
    many = [os.dup(source) for _ in range(SCM_MAX_FD)]
    flags = vu.IrqSetFlags.DATA_EVENTFD | vu.IrqSetFlags.ACTION_TRIGGER
    irq_set = vu.IRQ_SET.pack(vu.IRQ_SET.size, flags, vu.PciIrq.MSIX, 0, 2)
    reply = call(channel, 2, Command.DEVICE_SET_IRQS, irq_set, many)
    peak()
    for fd in [source, *many]:
        os.close(fd)
    hang_up(sock)
    return {"max_msg_fds": caps["max_msg_fds"], "sent": SCM_MAX_FD, "reply": errno.errorcode.get(reply.error)}


def fds_on_every_piece(path: str, peak: Peak) -> dict[str, object]:
    """A message sent a byte at a time, every byte with max_msg_fds descriptors, never finished."""
    sock, channel = connect(path)
    caps = version(channel)
    count = caps["max_msg_fds"]
    assert isinstance(count, int)
    source = os.eventfd(0, os.EFD_CLOEXEC)
    batch = [os.dup(source) for _ in range(count)]
    pieces = 200
    channel.send(vu.HEADER.pack(2, Command.DEVICE_SET_IRQS, 16 + 4096, vu.TYPE_COMMAND, 0), batch)
    for _ in range(pieces - 1):
        channel.send(b"\0", batch)
    wait_read(sock)
    peak()
    for fd in [source, *batch]:
        os.close(fd)
    return {"pieces": pieces, "fds_sent": pieces * count, "hung_up_after_s": round(wait_hung_up(sock), 2)}


def half_header(path: str, peak: Peak) -> dict[str, object]:
    sock, channel = connect(path)
    version(channel)
    sock.sendall(vu.HEADER.pack(2, Command.REGION_WRITE, 16 + 8, vu.TYPE_COMMAND, 0)[:8])
    peak()
    return {"sent": 8, "hung_up_after_s": round(wait_hung_up(sock), 2)}


def half_body(path: str, peak: Peak) -> dict[str, object]:
    """The largest message allowed, declared; half of it sent."""
    sock, channel = connect(path)
    caps = version(channel)
    xfer = caps["max_data_xfer_size"]
    assert isinstance(xfer, int)
    size = 16 + vu.REGION_ACCESS.size + xfer
    sock.sendall(vu.HEADER.pack(2, Command.REGION_WRITE, size, vu.TYPE_COMMAND, 0) + bytes(size // 2))
    wait_read(sock)
    peak()
    return {"declared": size, "sent": 16 + size // 2, "hung_up_after_s": round(wait_hung_up(sock), 2)}


def never_speaks(path: str, peak: Peak) -> dict[str, object]:
    sock, _ = connect(path)
    peak()
    return {"hung_up_after_s": round(wait_hung_up(sock), 2)}


def never_reads(path: str, peak: Peak) -> dict[str, object]:
    sock, channel = connect(path)
    version(channel)
    # Each reply (256 bytes of config space) outweighs its request: the server's replies fill
    # our receive queue before its requests run out, whatever it had read when ours filled.
    # Replies no larger than the requests could all fit, if the server had read none until
    # then: it waits for the next request, not stuck, and is rightly never hung up on.
    read = vu.REGION_ACCESS.pack(0, vu.PciRegion.CONFIG, 256)
    request = vu.pack_message(2, Command.REGION_READ, vu.TYPE_COMMAND, read)
    sock.setblocking(False)
    sent = 0
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        while True:
            try:
                sock.sendall(request)  # a partial send of 32 bytes cannot happen here
            except BlockingIOError:
                break  # the server stopped reading: it is stuck sending replies we never read
            sent += 1
    peak()
    # Wait for the hang-up without reading a byte (reading would let the server go on).
    start = time.monotonic()
    poller = select.poll()
    poller.register(sock, select.POLLHUP)
    hung_up = any(event & select.POLLHUP for _, event in poller.poll(60_000))
    sock.close()
    return {"requests_sent": sent, "hung_up_after_s": round(time.monotonic() - start, 2) if hung_up else None}


PEERS: list[tuple[str, str, Callable[[str, Peak], dict[str, object]]]] = [
    ("a", "maps max_dma_maps DMA regions, then one more", max_dma_regions),
    ("b", f"sends {SCM_MAX_FD} descriptors in one message", max_fds_in_one_message),
    ("b", "sends a message in 200 pieces, each with max_msg_fds descriptors", fds_on_every_piece),
    ("c", "sends half a header, then nothing", half_header),
    ("c", "declares the largest message, sends half", half_body),
    ("c", "never reads the replies", never_reads),
    ("d", "connects and never speaks", never_speaks),
]


@contextlib.contextmanager
def serving(timeout: float) -> Iterator[Server]:
    with tempfile.TemporaryDirectory() as directory:
        server = Server(directory, timeout)
        try:
            yield server
        finally:
            server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--timeout", type=float, default=1.0, help="--handshake-timeout and --message-timeout (1 s)"
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per peer instead of a table")
    parser.add_argument("--rounds", type=int, default=1, help="run every peer this many times (1)")
    args = parser.parse_args(argv)
    failed = False
    with serving(args.timeout) as server:
        well_behaved_client(server.path)  # warm-up: what one client leaves allocated for good
        for item, what, peer in PEERS * args.rounds:
            before = server.sample()
            worst = [before]

            def peak() -> None:
                worst.append(server.sample())  # noqa: B023 - called before the loop moves on

            start = time.monotonic()
            notes = peer(server.path, peak)
            seconds = time.monotonic() - start
            served = well_behaved_client(server.path)
            after = server.sample()
            top = Sample(*(max(getattr(s, f) for s in worst) for f in ("fds", "maps", "rss_kib")))
            outcome = Outcome(item, what, before, top, after, round(seconds, 2), served, notes)
            failed |= not served or after.fds > before.fds or after.maps > before.maps
            if args.json:
                print(json.dumps(asdict(outcome)), flush=True)
            else:
                print(
                    f"({item}) {what}: fds {before.fds} -> peak {top.fds} -> {after.fds}; "
                    f"memfd maps peak {top.maps} -> {after.maps}; VmRSS {before.rss_kib} -> "
                    f"peak {top.rss_kib} -> {after.rss_kib} KiB; {seconds:.2f} s; next client "
                    f"{'served, I/O verified' if served else 'NOT SERVED'}; {notes}",
                    flush=True,
                )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
