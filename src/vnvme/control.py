"""``vnvme serve --control PATH``: change the fault rules of a serving controller, and its client.

The control socket is a UNIX stream socket that takes one request per line and answers each
with one line, ``ok ...`` or ``error ...``:

    fault add SPEC     a rule as ``--fault SPEC`` takes it  -> ok rule ID: SPEC
    fault remove ID    one rule                             -> ok removed rule ID
    fault clear        every rule (--fault ones included)   -> ok cleared N rule(s)
    fault list         the rules, with their match counts   -> ok N rule(s)[: ID: SPEC (matched M); ...]
    help               the requests                         -> ok ...

A rule takes effect from the next command the controller fetches. The server polls the socket
in the loop that serves vfio-user, never waits on it: a client is read when it has sent
something, a request is at most :data:`MAX_REQUEST` bytes, at most :data:`MAX_CLIENTS` clients
are connected at once, and a client that does not read its replies is disconnected.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import stat
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from vnvme.controller.faults import FaultRule, RuleHook, parse_fault_rule, set_fault_hook

if TYPE_CHECKING:
    from vnvme.controller.controller import Controller

log = logging.getLogger("vnvme.control")

#: Bytes of one request line, its newline included.
MAX_REQUEST = 4096
#: Control clients connected at once; one more is told so and closed.
MAX_CLIENTS = 8
HELP = "requests: fault add SPEC | fault remove ID | fault clear | fault list | help"


class ControlError(ValueError):
    """A request that cannot be served; the message is the reply's text after ``error``."""


@dataclass
class _Client:
    sock: socket.socket
    pending: bytes = b""


@dataclass
class _Rule:
    spec: str
    rule: FaultRule = field(repr=False)


class ControlServer:
    """The server side: ``sock`` listens (made by the caller, which also removes its path);
    :meth:`fileno` is one descriptor to poll, readable whenever :meth:`handle` has work."""

    def __init__(self, sock: socket.socket, controller: Controller, faults: tuple[str, ...] = ()) -> None:
        self._listener = sock
        self._controller = controller
        self._clients: dict[int, _Client] = {}
        self._rules: dict[int, _Rule] = {}
        self._next_id = 1
        for spec in faults:  # the --fault rules: listed, removed and cleared like the others
            self._add(spec)
        self._apply()
        sock.setblocking(False)
        # One epoll for the listener and every client: its descriptor is all the serve loop watches.
        self._epoll = select.epoll()
        self._epoll.register(sock.fileno(), select.EPOLLIN)

    def fileno(self) -> int:
        return self._epoll.fileno()

    def handle(self) -> None:
        """Accept, read and answer whatever is ready; never waits."""
        for fd, _ in self._epoll.poll(0):
            if fd == self._listener.fileno():
                self._accept()
            elif fd in self._clients:
                self._read(self._clients[fd])

    def close(self) -> None:
        for client in list(self._clients.values()):
            self._drop(client)
        self._epoll.close()

    # Section: connections

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of descriptors, say: the serve loop goes on
                log.warning("control socket: accept failed: %s", exc)
                return
            conn.setblocking(False)
            if len(self._clients) >= MAX_CLIENTS:
                with contextlib.suppress(OSError):
                    conn.send(f"error more than {MAX_CLIENTS} control clients at once\n".encode())
                conn.close()
                continue
            self._clients[conn.fileno()] = _Client(conn)
            self._epoll.register(conn.fileno(), select.EPOLLIN)

    def _drop(self, client: _Client) -> None:
        fd = client.sock.fileno()
        self._clients.pop(fd, None)
        with contextlib.suppress(OSError, ValueError):
            self._epoll.unregister(fd)
        client.sock.close()

    def _read(self, client: _Client) -> None:
        try:
            data = client.sock.recv(MAX_REQUEST)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(client)
            return
        if not data:
            self._drop(client)
            return
        client.pending += data
        while b"\n" in client.pending:
            line, _, client.pending = client.pending.partition(b"\n")
            if not self._reply(client, self.request(line)):
                return
        if len(client.pending) >= MAX_REQUEST:
            self._reply(client, f"error a request is at most {MAX_REQUEST} bytes, newline included")
            self._drop(client)

    def _reply(self, client: _Client, text: str) -> bool:
        """Send one reply line; a client whose socket is full (it does not read) is dropped."""
        data = (text + "\n").encode()
        try:
            sent = client.sock.send(data)
        except OSError:
            sent = -1
        if sent != len(data):
            self._drop(client)
            return False
        return True

    # Section: requests

    def request(self, line: bytes) -> str:
        """The reply line (without its newline) to one request line."""
        try:
            text = line.decode("utf-8").strip()
        except UnicodeDecodeError:
            return "error a request is a line of UTF-8 text"
        try:
            return "ok " + self._serve(text.split(None, 2))
        except ControlError as exc:
            return f"error {exc}"
        except Exception as exc:  # a bug here must not take the device down with it
            log.exception("control request %r failed", text)
            return f"error internal: {type(exc).__name__}: {exc}"

    def _serve(self, words: list[str]) -> str:
        if words == ["help"]:
            return HELP
        if len(words) < 2 or words[0] != "fault":
            raise ControlError(f"unknown request {' '.join(words)[:80]!r}; {HELP}")
        verb, rest = words[1], words[2] if len(words) > 2 else ""
        if verb == "add":
            if not rest:
                raise ControlError("fault add needs a SPEC, e.g. fault add lba=0-7,media-error=dnr")
            rule_id = self._add(rest)
            self._apply()
            return f"rule {rule_id}: {rest}"
        if verb == "remove":
            if not rest.isdigit() or int(rest) not in self._rules:
                raise ControlError(f"fault remove {rest!r}: no such rule (fault list names them)")
            del self._rules[int(rest)]
            self._apply()
            return f"removed rule {rest}"
        if rest:
            raise ControlError(f"fault {verb} takes no argument")
        if verb == "clear":
            count = len(self._rules)
            self._rules.clear()
            self._apply()
            return f"cleared {count} rule(s)"
        if verb == "list":
            listed = "; ".join(f"{i}: {r.spec} (matched {r.rule.matched})" for i, r in self._rules.items())
            return f"{len(self._rules)} rule(s)" + (f": {listed}" if listed else "")
        raise ControlError(f"unknown request 'fault {verb}'; {HELP}")

    def _add(self, spec: str) -> int:
        try:
            rule = parse_fault_rule(spec)
        except ValueError as exc:
            raise ControlError(str(exc)) from None
        if rule.nsid is not None and rule.nsid not in self._controller.namespaces:
            raise ControlError(f"nsid={rule.nsid}: no such namespace")
        rule_id = self._next_id
        self._next_id += 1
        self._rules[rule_id] = _Rule(spec, rule)
        return rule_id

    def _apply(self) -> None:
        """Each namespace's hook: the rules naming it or no namespace, in the order added."""
        for nsid in self._controller.namespaces:
            mine = [r.rule for r in self._rules.values() if r.rule.nsid in (None, nsid)]
            set_fault_hook(self._controller, nsid, RuleHook(mine) if mine else None)


def request(path: str, line: str, timeout: float = 10.0) -> str:
    """Send one request to a control socket and return its reply line (without the newline).

    Raises :class:`OSError` (one line in its message) if the socket cannot be reached or does
    not answer within ``timeout`` seconds."""
    if "\n" in line:
        raise ValueError("a request is one line")
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            while True:
                try:
                    sock.connect(path)
                    break
                except BlockingIOError:  # the backlog is full: the server accepts at its next pass
                    if time.monotonic() > deadline:
                        raise TimeoutError from None
                    time.sleep(0.01)
            sock.sendall(line.encode() + b"\n")
            reply = b""
            while not reply.endswith(b"\n"):
                chunk = sock.recv(MAX_REQUEST)
                if not chunk:
                    break
                reply += chunk
        except TimeoutError:
            raise OSError(f"{path}: no reply within {timeout:g} s") from None
        except OSError as exc:
            if os.path.exists(path) and not stat.S_ISSOCK(os.stat(path).st_mode):
                # connect() says only "Connection refused" of a directory or a regular file.
                raise OSError(f"{path}: not a socket (vnvme serve --control PATH makes one)") from None
            raise OSError(f"{path}: {exc.strerror or exc}") from None
    if not reply.endswith(b"\n"):
        raise OSError(f"{path}: the server closed the connection without a reply")
    return reply.decode(errors="replace").rstrip("\n")
