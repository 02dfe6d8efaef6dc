"""``vnvme serve``: the controller as a vfio-user PCI device on a UNIX socket."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import enum
import json
import logging
import os
import resource
import select
import shlex
import signal
import socket
import stat
import sys
import tomllib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TextIO, TypeVar

from vnvme.control import ControlServer
from vnvme.controller.config import ControllerConfig, CqEventIdxPolicy, SqEventIdxPolicy
from vnvme.controller.faults import apply_rules, parse_fault_rule
from vnvme.controller.hostcheck import format_report
from vnvme.controller.namespace import Namespace, NullBackend, parse_namespace_spec
from vnvme.controller.variants import SERVE_CQ_EVENTIDX, SERVE_SQ_CHOICES, SERVE_SQ_EVENTIDX
from vnvme.effects import TraceEvent
from vnvme.function import NvmeFunction
from vnvme.paths import check_output_file, output_directory
from vnvme.trace import JsonLinesSink, format_event, matching_events
from vnvme.vfio_user.server import (
    DMA_MAP_DESCRIPTORS,
    PollWindow,
    ServerOptions,
    VfioUserServer,
)

log = logging.getLogger("vnvme.serve")

DEFAULT_SOCKET = "/tmp/vnvme.sock"
REFERENCE_NAMESPACE = "null,size=1G"
#: --poll-budget's default: a quarter of a CPU at most, and below a whole CPU --poll polls only
#: for its adaptive window (--poll-max): a host that places its next command within the window
#: keeps it open, one slower than --poll-max (a Linux guest under TCG takes 200-400 us) closes
#: it, and the server then rearms and sleeps at once like the event-driven controller, spending
#: nothing on polling (spinning had cost such a guest IOPS at every depth: benchmarks/vm/).
DEFAULT_POLL_BUDGET = 0.25
#: --poll-max's default, QEMU's IOThread poll-max-ns (32 us): about what taking one trapped
#: doorbell costs this server (a wake-up, a message and its reply, a rearm), so a longer window
#: would spend more CPU than the doorbell it saves; and far below a TCG guest's pace.
DEFAULT_POLL_MAX = 32e-6


# Defaults read from an instance: a class attribute of a mypyc-compiled class is a descriptor.
_SERVER_DEFAULTS = ServerOptions()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Every option of ``vnvme serve``, in groups (as ``--help`` shows them)."""
    _device_arguments(parser.add_argument_group("the device", "socket, namespaces, faults and queues"))
    _doorbell_arguments(parser.add_argument_group("doorbells", "shadow doorbells and the EventIdx policies"))
    _polling_arguments(
        parser.add_argument_group(
            "polling", "a controller or a doorbell page polled instead of trapped doorbells"
        )
    )
    _output_arguments(parser.add_argument_group("traces and statistics"))


def _device_arguments(parser: argparse._ArgumentGroup) -> None:
    parser.add_argument(
        "--socket",
        default=DEFAULT_SOCKET,
        help=f"UNIX socket to listen on ({DEFAULT_SOCKET}); only a stale socket there is replaced, "
        "anything else at that path is refused and left alone",
    )
    parser.add_argument(
        "--namespace",
        action="append",
        default=[],
        metavar="SPEC",
        help="a namespace, repeatable: 'null,size=16G', 'ram,size=1G,lba=4096', 'file=disk.img'. "
        "A file keeps its size: a larger size= needs ',grow'; a missing file is created only with "
        "a size. ',readonly' write protects the namespace (required for a file whose mode allows "
        f"no write). None given: the reference device, one '{REFERENCE_NAMESPACE}' namespace "
        "reading zeroes",
    )
    parser.add_argument("--config", metavar="TOML", help="namespaces and options from a TOML file")
    parser.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="SPEC",
        help="inject a fault into matching I/O commands, repeatable: "
        "'nsid=1,op=read,lba=100-199,media-error' (Unrecovered Read Error, data untouched), "
        "'op=write,status=0x4002' (fail with that status: (SCT << 8) | SC, 0x4000 = DNR), "
        "'nsid=2,op=flush,delay=0.05' (complete 50 ms late); 'after=N' and 'count=N' pick "
        "which matches; see vnvme.controller.faults",
    )
    parser.add_argument(
        "--control",
        metavar="PATH",
        help="also listen on this UNIX socket for requests that change the fault rules while "
        "serving ('fault add SPEC', 'fault remove ID', 'fault clear', 'fault list'; one line each, "
        "see vnvme ctl); the same path rules as --socket",
    )
    parser.add_argument("--max-io-queues", type=int, default=64, help="I/O queue pairs the controller offers")
    parser.add_argument("--queue-entries", type=int, default=1024, help="CAP.MQES + 1 (1024)")
    parser.add_argument(
        "--handshake-timeout",
        type=float,
        default=_SERVER_DEFAULTS.handshake_timeout,
        metavar="SECONDS",
        help="a client that has not completed VERSION this long after connecting is hung up on, "
        f"so the next one can be served; 0: no limit ({_SERVER_DEFAULTS.handshake_timeout})",
    )
    parser.add_argument(
        "--message-timeout",
        type=float,
        default=_SERVER_DEFAULTS.message_timeout,
        metavar="SECONDS",
        help="a client that stops part way through a message (half a header, a body never "
        f"finished) is hung up on after this long; 0: no limit ({_SERVER_DEFAULTS.message_timeout}). "
        "A client that sends nothing between messages is never timed out",
    )


def _doorbell_arguments(parser: argparse._ArgumentGroup) -> None:
    parser.add_argument(
        "--no-shadow-doorbells",
        action="store_true",
        help="do not advertise Doorbell Buffer Config (OACS bit 8): every doorbell is a trapped write",
    )
    parser.add_argument(
        "--cq-eventidx",
        choices=[p.value for p in CqEventIdxPolicy],
        default=SERVE_CQ_EVENTIDX.value,
        help="CQ EventIdx policy: 'never' (default) reads the shadow CQ head whenever the controller "
        "needs room, so the host rings no CQ doorbell; 'eager' publishes EventIdx = head as QEMU "
        "does (one CQ doorbell per completion batch)",
    )
    parser.add_argument(
        "--sq-eventidx",
        choices=SERVE_SQ_CHOICES,
        default=SERVE_SQ_EVENTIDX.value,
        help="SQ EventIdx policy while event driven: 'adaptive' (default) learns per queue how "
        "many commands the host places and how fast, publishes EventIdx = head + k - 1 for the k "
        "it expects, and looks at the shadow tail itself if the host has not rung after about "
        "twice its usual time (between --batch-timeout and --max-batch-wait); 'batch' predicts "
        "the last burst and waits --batch-timeout; 'eager' publishes the tail just consumed "
        "(QEMU, SPDK): the host rings for the first command of every batch",
    )
    parser.add_argument(
        "--batch-timeout",
        type=float,
        default=ControllerConfig.batch_timeout,
        help="with --sq-eventidx batch: seconds before the controller looks at a shadow tail the "
        f"host has not rung for; with adaptive: the shortest such wait ({ControllerConfig.batch_timeout})",
    )
    parser.add_argument(
        "--max-batch-wait",
        type=float,
        default=ControllerConfig.max_batch_wait,
        help="with --sq-eventidx adaptive: the longest wait, in seconds, for a predicted batch "
        f"({ControllerConfig.max_batch_wait})",
    )


def _polling_arguments(parser: argparse._ArgumentGroup) -> None:
    parser.add_argument(
        "--poll",
        action="store_true",
        help="the controller polls the shadow SQ tails (SPDK-style) instead of waiting for doorbells; "
        "with --poll-budget 1 the host then rings next to none and it costs a CPU while busy; below "
        "1 it polls only for an adaptive window (--poll-max) and the host rings when it sleeps",
    )
    parser.add_argument(
        "--poll-passes",
        type=int,
        default=2000,
        help="with --poll: idle passes at most before the controller rearms EventIdx and sleeps "
        "(2000); below a whole CPU of --poll-budget, the adaptive window (--poll-max) ends them sooner",
    )
    parser.add_argument(
        "--poll-budget",
        type=float,
        default=DEFAULT_POLL_BUDGET,
        help="with --poll or --mappable-doorbells: the share of one CPU the server may spend "
        "polling without finding work (0..1, 1 = no limit); past it the controller rearms and "
        "the server sleeps until a doorbell, so a guest on the same CPUs is not starved. Below 1, "
        f"--poll polls only for its adaptive window ({DEFAULT_POLL_BUDGET})",
    )
    parser.add_argument(
        "--poll-max",
        type=float,
        default=DEFAULT_POLL_MAX,
        metavar="SECONDS",
        help="with --poll and --poll-budget below 1: the longest adaptive poll window. An idle "
        "server polls for the window, then rearms and sleeps; work that comes after the window but "
        "within this doubles it, work later than this closes it (event driven until work comes "
        f"sooner again); 0: never poll idle ({DEFAULT_POLL_MAX})",
    )
    parser.add_argument(
        "--mappable-doorbells",
        action="store_true",
        help="offer the doorbell page as shared memory the client maps (sparse mmap of BAR0): doorbell "
        "writes cost no message; the device polls the page (spinning --poll-passes, then every "
        "--idle-sleep)",
    )
    parser.add_argument(
        "--idle-sleep",
        type=float,
        default=100e-6,
        help="with --mappable-doorbells: seconds between looks at an idle doorbell page (0.0001)",
    )


def _output_arguments(parser: argparse._ArgumentGroup) -> None:
    parser.add_argument(
        "--trace", action="append", default=[], metavar="PATTERN", help="trace events matching PATTERN (glob)"
    )
    parser.add_argument(
        "--trace-file",
        metavar="F",
        help="where trace events go (default stderr); a .jsonl name writes JSON lines",
    )
    parser.add_argument(
        "--check-host",
        action="store_true",
        help="watch the host's side of the protocol (queue indexes, CIDs, shadow doorbells, data "
        "pointers): every violation is counted by rule and traced (pci_nvme_host_*); a report "
        "goes to stderr at exit and on SIGUSR1, and into the statistics",
    )
    parser.add_argument(
        "--check-host-report",
        metavar="FILE",
        help="also write the host check report to FILE as JSON, at exit and on SIGUSR1 (implies "
        "--check-host; FILE is created or replaced, never anything else)",
    )
    parser.add_argument(
        "--quiet",
        action="store_true",
        help="do not print the banner nor the statistics at exit (SIGUSR1 still prints them)",
    )


# Every key a --config TOML file may hold, with the type its value must have.
_CONFIG_KEYS: dict[str, tuple[type, ...]] = {
    "namespace": (list,),
    "fault": (list,),
    "control": (str,),
    "shadow_doorbells": (bool,),
    "sq_eventidx": (str,),
    "cq_eventidx": (str,),
    "batch_timeout": (int, float),
    "max_batch_wait": (int, float),
    "poll": (bool,),
    "poll_passes": (int,),
    "poll_budget": (int, float),
    "poll_max": (int, float),
    "mappable_doorbells": (bool,),
    "idle_sleep": (int, float),
    "max_io_queues": (int,),
    "queue_entries": (int,),
    "handshake_timeout": (int, float),
    "message_timeout": (int, float),
    "check_host": (bool,),
}


def _load_config(path: str) -> dict[str, Any]:
    """A --config file, checked for unknown keys and value types; errors name the file."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: not valid TOML: {exc}") from None
    except RecursionError:  # tomllib recurses once per level of nesting
        raise ValueError(f"{path}: nested too deeply to read") from None
    except OSError as exc:
        raise ValueError(f"{path}: {exc.strerror}") from None
    unknown = set(data) - set(_CONFIG_KEYS)
    if unknown:
        raise ValueError(
            f"{path}: unknown key(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(_CONFIG_KEYS))})"
        )
    for key, value in data.items():
        types = _CONFIG_KEYS[key]
        # bool is an int in Python; TOML keeps them apart, and so do we.
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            wanted = " or ".join("a list of strings" if t is list else t.__name__ for t in types)
            raise ValueError(f"{path}: {key} must be {wanted}, not {value!r}")
        if isinstance(value, list) and not all(isinstance(item, str) for item in value):
            raise ValueError(f"{path}: {key} must be a list of strings")
    return data


E = TypeVar("E", bound=enum.Enum)


def _choice(kind: type[E], value: object, where: str) -> E:
    """An enum member from its value, or an error that lists the valid choices."""
    try:
        return kind(value)
    except ValueError:
        choices = ", ".join(repr(member.value) for member in kind)
        raise ValueError(f"{where}: {value!r} is not one of {choices}") from None


def build_namespaces(specs: Sequence[str], faults: Sequence[str] = ()) -> list[Namespace]:
    """Namespaces from their specs (NSIDs 1, 2, ... in order), with fault rules attached."""
    rules = [parse_fault_rule(text) for text in faults]  # bad rules fail before a file is opened
    if not specs:
        namespaces = [Namespace(1, NullBackend(1 << 30), 512)]
    else:
        namespaces = []
        try:
            for nsid, spec in enumerate(specs, start=1):
                namespaces.append(parse_namespace_spec(spec, nsid))
        except BaseException:
            discard_namespaces(namespaces)
            raise
    missing = {rule.nsid for rule in rules if rule.nsid is not None} - {ns.nsid for ns in namespaces}
    if missing:
        discard_namespaces(namespaces)
        raise ValueError(f"fault rule for a namespace that does not exist: nsid {min(missing)}")
    apply_rules(namespaces, rules)
    return namespaces


def discard_namespaces(namespaces: Sequence[Namespace]) -> None:
    """A start failed: close every backend, and remove the files this start created."""
    for ns in namespaces:
        ns.backend.discard_if_created()


def qemu_command_line(socket_path: str) -> str:
    device = json.dumps({"driver": "vfio-user-pci", "socket": {"type": "unix", "path": socket_path}})
    return " ".join(
        [
            "qemu-system-x86_64 -accel tcg -m 2G",
            "-object memory-backend-memfd,id=mem,size=2G,share=on -machine q35,memory-backend=mem",
            f"-device {shlex.quote(device)}",
            "-kernel vmlinuz -initrd initrd.img -append console=ttyS0 -nographic",
        ]
    )


def format_statistics(server: VfioUserServer, function: NvmeFunction) -> str:
    controller = function.controller
    stats = dataclasses.asdict(controller.statistics())
    out = {
        "controller": stats,
        "interrupts": dataclasses.asdict(function.stats),
        "messages": dict(server.messages),
        "message_errors": dict(server.errors),
        "clients_served": server.clients_served,
        "polling": {
            "idle_seconds": round(budget.spent, 6) if (budget := server.poll_budget) else 0.0,
            "cut_short": budget.exhausted if budget else 0,
            "window": _window_statistics(server.poll_window),
        },
    }
    if controller.host_check is not None:
        out["host_check"] = controller.host_check.report()
    return json.dumps(out, sort_keys=True)


def _window_statistics(window: PollWindow | None) -> dict[str, float] | None:
    """The adaptive poll window's state (None: the server polls without one)."""
    if window is None:
        return None
    return {
        "current_us": round(window.window * 1e6, 3),
        "max_us": round(window.max_window * 1e6, 3),
        "grows": window.grows,
        "shrinks": window.shrinks,
        "found_polling": window.found,
        "woken": window.woken,
    }


def check_report_path(path: str) -> None:
    """Refuse, before the server starts, a --check-host-report path it could not replace
    safely: only a regular file there is ever replaced."""
    output_directory("--check-host-report", path)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISREG(mode):
        raise ValueError(f"--check-host-report {path}: {_file_kind(mode)} is there; not replaced")


def write_report(path: str, report: dict[str, Any]) -> None:
    """Write ``report`` as JSON to a new file beside ``path``, then rename it over ``path``: a
    reader sees the old report or the new one, and nothing but ``path`` is ever replaced.
    Raises ValueError with one line on failure (the new file is removed)."""
    directory, name = os.path.split(os.path.abspath(path))
    staging = os.path.join(directory, f".{name}.{os.getpid()}.tmp")
    created = False
    try:
        check_report_path(path)
        fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        created = True
        with os.fdopen(fd, "w") as f:
            json.dump(report, f, indent=2, ensure_ascii=False)
            f.write("\n")
        os.replace(staging, path)
        created = False
    except OSError as exc:
        raise ValueError(f"cannot write the host check report to {path}: {exc.strerror or exc}") from None
    finally:
        if created:
            with contextlib.suppress(OSError):
                os.unlink(staging)


class _HostReports:
    """Where ``vnvme serve --check-host`` reports go: stderr (text), and --check-host-report."""

    def __init__(self, function: NvmeFunction, path: str | None) -> None:
        self.function = function
        self.path = path
        self.failed = False

    def __call__(self, *, final: bool) -> None:
        controller = self.function.controller
        checker = controller.host_check
        if checker is None:
            return
        # Not from a signal handler: that may run in the middle of a controller call.
        report = checker.report(controller.now if final else None)
        print(format_report(report), file=sys.stderr, flush=True)
        if self.path is not None:
            try:
                write_report(self.path, report)
            except ValueError as exc:
                print(f"vnvme serve: {exc}", file=sys.stderr, flush=True)
                self.failed = True


def _trace_sink(path: str | None) -> tuple[Callable[[TraceEvent], None], TextIO | None]:
    if path is None:
        return (lambda event: print(format_event(event), file=sys.stderr)), None
    stream = open(path, "a", buffering=1)  # noqa: SIM115 - closed when the server stops
    if path.endswith(".jsonl"):
        return JsonLinesSink(stream), stream

    def text(event: TraceEvent) -> None:
        stream.write(format_event(event) + "\n")

    return text, stream


def _file_kind(mode: int) -> str:
    kinds = [
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISCHR, "a character device"),
    ]
    return next((name for test, name in kinds if test(mode)), "not a socket")


def _someone_listens(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2.0)  # a live server with a full backlog blocks connect(): not stale
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        return False
    except OSError:
        return True  # anything but a refusal: assume it is alive, never remove it
    finally:
        probe.close()
    return True


@dataclasses.dataclass
class Listener:
    """The listening socket and the identity of the file it made, so only that file is removed."""

    sock: socket.socket
    path: str
    identity: os.stat_result

    def close(self) -> None:
        self.sock.close()
        try:
            current = os.lstat(self.path)
        except FileNotFoundError:
            return
        if os.path.samestat(current, self.identity):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


def listen(path: str, option: str = "--socket") -> Listener:
    """Listen on ``path``. Only a stale socket there is replaced; anything else is refused
    (``option``: what the user gave the path with, for the message)."""
    output_directory(option, path)
    try:
        existing: os.stat_result | None = os.lstat(path)
    except FileNotFoundError:
        existing = None
    if existing is not None:
        if not stat.S_ISSOCK(existing.st_mode):
            raise ValueError(
                f"{path}: exists and is {_file_kind(existing.st_mode)}; vnvme serve replaces only a "
                f"stale socket: choose another {option} path"
            )
        if _someone_listens(path):
            raise ValueError(f"{path}: another server is listening")
        with contextlib.suppress(FileNotFoundError):
            if os.path.samestat(os.lstat(path), existing):
                os.unlink(path)  # a stale socket from a server that is gone
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # Bind under a temporary name and link it into place once listening: the path appears only
    # when a client can connect, and link() never replaces what appeared there meanwhile.
    staging = f"{path}.{os.getpid()}.tmp"
    old_umask = os.umask(0o177)  # owner-only from the start, no window before a chmod
    try:
        sock.bind(staging)
    except OSError as exc:
        sock.close()
        # A path over AF_UNIX's limit raises with no errno: its message is all there is.
        reason = exc.strerror or str(exc)
        raise ValueError(f"{path}: cannot create the socket ({staging}): {reason}") from None
    finally:
        os.umask(old_umask)
    try:
        sock.listen(1)
        try:
            os.link(staging, path)
        except FileExistsError:
            raise ValueError(f"{path}: appeared while vnvme serve was starting; not replaced") from None
        return Listener(sock, path, os.lstat(path))
    except BaseException:
        sock.close()
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(staging)


def _controller_config(args: argparse.Namespace, file_options: dict[str, Any]) -> ControllerConfig:
    """The controller's configuration: the --config file's values, else the options'."""

    def option(key: str) -> Any:
        return _option(args, file_options, key)

    def policy(kind: type[E], key: str) -> E:
        where = f"{args.config}: {key}" if key in file_options else "--" + key.replace("_", "-")
        return _choice(kind, option(key), where)

    sq_policy = policy(SqEventIdxPolicy, "sq_eventidx")
    cq_policy = policy(CqEventIdxPolicy, "cq_eventidx")
    return ControllerConfig(
        shadow_doorbells=file_options.get("shadow_doorbells", True) and not args.no_shadow_doorbells,
        sq_eventidx=SqEventIdxPolicy.POLL if _polls(args, file_options) else sq_policy,
        batch_timeout=float(option("batch_timeout")),
        max_batch_wait=float(option("max_batch_wait")),
        cq_eventidx=cq_policy,
        max_io_queues=int(option("max_io_queues")),
        interrupt_vectors=int(option("max_io_queues")) + 1,
        max_queue_entries=int(option("queue_entries")),
        check_host=bool(
            file_options.get("check_host", False) or args.check_host or args.check_host_report is not None
        ),
    )


def _option(args: argparse.Namespace, file_options: dict[str, Any], key: str) -> Any:
    """A setting from the --config file if it has it, else from the command line."""
    return file_options.get(key, getattr(args, key))


def _raise_descriptor_limit(options: ServerOptions) -> None:
    """Where each DMA region costs a descriptor, the soft limit raised (up to the hard one) to
    hold max_dma_maps of them and more; the server offers fewer if it still cannot."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = options.max_dma_maps * DMA_MAP_DESCRIPTORS + 1024
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(hard, wanted)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def _timeout(args: argparse.Namespace, file_options: dict[str, Any], key: str) -> float | None:
    """A timeout setting in seconds; 0 means no limit (None)."""
    value = float(_option(args, file_options, key))
    if not value >= 0:  # negative or NaN
        where = f"{args.config}: {key}" if key in file_options else "--" + key.replace("_", "-")
        raise ValueError(f"{where}: {value}: seconds, or 0 for no limit")
    return value or None


def _polls(args: argparse.Namespace, file_options: dict[str, Any]) -> bool:
    return bool(file_options.get("poll", False) or args.poll)


def _banner(
    args: argparse.Namespace, function: NvmeFunction, mappable: bool, control_path: str | None, out: TextIO
) -> None:
    config = function.controller.config
    ns_text = ", ".join(
        f"nsid {ns.nsid}: {ns.backend.describe()}, {ns.lba_size}-byte LBAs"
        for ns in function.controller.namespaces.values()
    )
    print(f"vnvme serving on {args.socket} ({ns_text})", file=out)
    if control_path:
        print(f"fault rules change at {control_path} (vnvme ctl --control {control_path} help)", file=out)
    polls = config.sq_eventidx is SqEventIdxPolicy.POLL
    print(
        f"shadow doorbells {'on' if config.shadow_doorbells else 'off'}, SQ EventIdx {config.sq_eventidx}, "
        f"CQ EventIdx {config.cq_eventidx}, {'controller polls' if polls else 'event driven'}, "
        f"{'mappable' if mappable else 'trapped'} doorbells",
        file=out,
    )
    print(f"attach QEMU (>= 10.1) with:\n  {qemu_command_line(args.socket)}", file=out, flush=True)


@contextlib.contextmanager
def _signals(
    server: VfioUserServer, function: NvmeFunction, out: TextIO, host_reports: _HostReports
) -> Iterator[int]:
    """SIGINT / SIGTERM stop the server, SIGUSR1 prints the statistics; yields the wake-up fd
    the loop polls (a signal wakes it). Installed before the socket appears, so a client's
    SIGTERM right after that always finds them."""
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    old_wakeup = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)

    def stop(signum: int, frame: object) -> None:
        server.stop()

    def report(signum: int, frame: object) -> None:
        print(format_statistics(server, function), file=out, flush=True)  # with the exit statistics
        host_reports(final=False)

    handlers = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    handlers[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, report)
    try:
        yield wake_r
    finally:
        signal.set_wakeup_fd(old_wakeup)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        os.close(wake_r)
        os.close(wake_w)


def _accept_clients(
    listener: Listener, server: VfioUserServer, wake_r: int, control: ControlServer | None = None
) -> None:
    """Serve one client after another until a signal stops the server; the control socket is
    served between clients and, in the same loop, while one is attached."""
    poller = select.poll()
    poller.register(listener.sock, select.POLLIN)
    poller.register(wake_r, select.POLLIN)
    watch = {control.fileno(): control.handle} if control else {}
    for fd in watch:
        poller.register(fd, select.POLLIN)
    while not server.stopping:
        for fd, _ in poller.poll():
            if fd == wake_r:
                os.read(wake_r, 512)
            elif fd in watch:
                watch[fd]()
            elif not server.stopping:
                conn, _ = listener.sock.accept()
                log.info("client connected")
                server.serve_connection(conn, listener=listener.sock, wakeup=wake_r, watch=watch)
                conn.close()


def _close_control(control: ControlServer | None, listener: Listener | None) -> None:
    """Stop the --control socket's server, then remove its file (only the one it made)."""
    if control is not None:
        control.close()
    if listener is not None:
        listener.close()


def run(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    file_options: dict[str, Any] = _load_config(args.config) if args.config else {}
    config = _controller_config(args, file_options)
    poll = _polls(args, file_options)
    mappable = bool(file_options.get("mappable_doorbells", False) or args.mappable_doorbells)
    if args.trace:
        matching_events(args.trace)  # unknown patterns fail before anything starts
        if args.trace_file is not None:
            check_output_file("--trace-file", args.trace_file)
    if args.check_host_report is not None:
        check_report_path(args.check_host_report)
    fault_specs = list(file_options.get("fault", [])) + list(args.fault)
    control_path: str | None = _option(args, file_options, "control")
    # Checked before a namespace's file is created.
    passes = int(_option(args, file_options, "poll_passes")) if poll or mappable else 0
    budget = float(_option(args, file_options, "poll_budget"))
    options = ServerOptions(
        poll_passes=passes,
        poll_budget=budget,
        poll_max=float(_option(args, file_options, "poll_max"))
        if poll and not mappable and budget < 1.0
        else None,
        handshake_timeout=_timeout(args, file_options, "handshake_timeout"),
        message_timeout=_timeout(args, file_options, "message_timeout"),
    )
    namespaces = build_namespaces(list(file_options.get("namespace", [])) + list(args.namespace), fault_specs)
    try:
        sink, trace_stream = _trace_sink(args.trace_file) if args.trace else (None, None)
        function = NvmeFunction(
            namespaces,
            config,
            controller_polls=poll,
            trace=args.trace,
            trace_sink=sink,
            mappable_doorbells=mappable,
            idle_sleep=float(_option(args, file_options, "idle_sleep")),
        )
    except BaseException:
        discard_namespaces(namespaces)
        raise
    _raise_descriptor_limit(options)
    server = VfioUserServer(function, options, trace=args.trace, trace_sink=sink)
    host_reports = _HostReports(function, args.check_host_report)
    try:
        with _signals(server, function, out, host_reports) as wake_r:
            control_listener: Listener | None = None
            control: ControlServer | None = None
            try:
                # The control socket first: once --socket appears, a client may use both.
                if control_path:
                    if os.path.abspath(control_path) == os.path.abspath(args.socket):
                        raise ValueError(f"{control_path}: --control and --socket must differ")
                    control_listener = listen(control_path, "--control")
                    control = ControlServer(control_listener.sock, function.controller, tuple(fault_specs))
                listener = listen(args.socket)
            except BaseException:
                # A start that fails leaves no file it created behind (a namespace's, the sockets).
                _close_control(control, control_listener)
                function.close()
                discard_namespaces(namespaces)
                raise
            if not args.quiet:
                _banner(args, function, mappable, control_path, out)
            try:
                _accept_clients(listener, server, wake_r, control)
            finally:
                # No new client from here on; a second SIGTERM meanwhile only repeats "stop".
                listener.close()  # removes the socket, if the path still names it
                _close_control(control, control_listener)
                function.close()  # flushes every backend
                host_reports(final=True)  # first: its last look is in the statistics too
                if not args.quiet:
                    print(format_statistics(server, function), file=out, flush=True)
    finally:
        if trace_stream is not None:
            trace_stream.close()
    return 1 if host_reports.failed else 0
