"""``vnvme vm compare`` stopped by SIGTERM (a CI job cancelled, ``timeout``, systemd) while a
guest runs fio: it once died at once and left the guest's QEMU, ``vnvme serve`` and its run
folder behind."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from vnvme.vm.provision import Provisioner

pytestmark = [pytest.mark.vm, pytest.mark.timeout(900)]


def _descendants(pid: int) -> dict[int, str]:
    """Every live process below ``pid``, with its command line."""
    parents: dict[int, int] = {}
    commands: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                commands[int(entry)] = f.read().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue
    found: dict[int, str] = {}
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        for child, ppid in parents.items():
            if ppid == parent and child not in found:
                found[child] = commands.get(child, "")
                frontier.append(child)
    return found


def test_vm_compare_stopped_by_sigterm_stops_its_guest_and_server(vm_say: Callable[[str], None]) -> None:
    Provisioner(say=vm_say).image("6.1")  # the cache, as the other VM tests use it
    # A short folder: the server's socket goes in the run folder, and pytest's tmp_path is
    # too long for a Unix socket path.
    work = Path(tempfile.mkdtemp(prefix="vt-", dir="/tmp"))
    try:
        _run_and_terminate(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run_and_terminate(work: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "vnvme", "vm", "compare", "--kernel", "6.1", "--iodepth", "1"]
        + ["--runtime", "60", "--variants", "dbbuf", "--no-qemu", "--work-dir", str(work)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        children: dict[int, str] = {}
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            children = _descendants(proc.pid)
            commands = " | ".join(children.values())
            if "qemu-system" in commands and "vnvme serve" in commands:
                break
            time.sleep(0.5)
        else:
            proc.kill()
            pytest.fail(f"the guest and its server never both ran: {proc.communicate()[1][-2000:]}")
        time.sleep(8)  # booted, into fio's 60 s
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    left = [pid for pid in children if os.path.exists(f"/proc/{pid}")]
    for pid in left:  # the test's own leftovers, if the fix regresses: not for the next test
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert proc.returncode == 128 + signal.SIGTERM
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == "vnvme vm: interrupted by SIGTERM"
    assert not left, f"still running: {[children[pid] for pid in left]}"
    assert os.listdir(work) == []  # the run folder went with them (no --keep)
