"""``vnvme check`` against ``vnvme serve``: every check passes on the real server, and servers with
one deliberate bug each (tests/check_broken_server.py) make the check for that bug FAIL."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import vnvme
from vnvme import cli
from vnvme.check import target as target_module
from vnvme.check.command import run_one
from vnvme.check.registry import Check, Verdict
from vnvme.check.target import Context, Options, Target

SRC = Path(vnvme.__file__).resolve().parents[1]
BROKEN = Path(__file__).with_name("check_broken_server.py")
SERVE = f"{shlex.quote(sys.executable)} -m vnvme serve --socket {{socket}} --quiet"


@pytest.fixture(autouse=True)
def _children_import_this_checkout(monkeypatch: pytest.MonkeyPatch) -> None:
    """Servers started by ``--server-cmd`` run this checkout's vnvme, whatever is installed;
    these servers exit on hang-up in milliseconds, if at all: a shorter wait to learn which."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])))
    monkeypatch.setattr(target_module, "HANGUP_GRACE", 0.5)


def broken(bug: str, *serve_args: str) -> str:
    args = " ".join(serve_args)
    return (
        f"{shlex.quote(sys.executable)} {shlex.quote(str(BROKEN))} {bug} --socket {{socket}} --quiet {args}"
    )


def check(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any]]:
    code = cli.main(["check", "--json", *args])
    document: dict[str, Any] = json.loads(capsys.readouterr().out)
    return code, document


def verdicts(document: dict[str, Any]) -> dict[str, str]:
    return {c["name"]: c["verdict"] for c in document["checks"]}


def evidence(document: dict[str, Any], name: str) -> str:
    (found,) = [c["evidence"] for c in document["checks"] if c["name"] == name]
    assert isinstance(found, str)
    return found


def test_every_check_passes_against_vnvme_serve(capsys: pytest.CaptureFixture[str]) -> None:
    code, doc = check(capsys, "--server-cmd", SERVE + " --namespace ram,size=64M", "--allow-writes")
    got = verdicts(doc)
    # The protocol leaves config space after DEVICE_RESET open: reported, not judged.
    assert got.pop("vfio-user.device-reset-config") == "INFO"
    assert got == dict.fromkeys(got, "PASS"), {n: evidence(doc, n) for n, v in got.items() if v != "PASS"}
    assert len(got) >= 30
    assert code == 0
    assert "read back equal" in evidence(doc, "nvme.io-write")  # a RAM namespace keeps data
    assert doc["server_exits_on_hangup"] is False
    assert doc["servers_started"] <= 8  # reused between checks: restarted only for CPU placements


def test_text_output_names_verdict_section_and_evidence(capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["check", "--server-cmd", SERVE, "--check", "nvme.cap-vs", "--check", "nvme.io-write"])
    out = capsys.readouterr().out
    assert code == 0
    assert "PASS  nvme.cap-vs" in out and "[NVMe 1.3 §3.1.1 CAP, §3.1.2 VS]" in out and "MQES 1023" in out
    assert "SKIP  nvme.io-write" in out and "--allow-writes" in out
    assert "summary: 1 PASS, 0 FAIL, 1 SKIP, 0 INFO" in out


def test_without_shadow_doorbells_the_dbbuf_checks_skip(capsys: pytest.CaptureFixture[str]) -> None:
    code, doc = check(capsys, "--server-cmd", SERVE + " --no-shadow-doorbells", "--check", "dbbuf.*")
    assert set(verdicts(doc).values()) == {"SKIP"}
    assert len(doc["checks"]) >= 8
    assert all("OACS" in c["evidence"] for c in doc["checks"])
    assert code == 0


def test_device_reset_that_resets_nothing_fails(capsys: pytest.CaptureFixture[str]) -> None:
    code, doc = check(
        capsys, "--server-cmd", broken("device-reset-ignored"), "--check", "vfio-user.device-reset*"
    )
    assert verdicts(doc) == {"vfio-user.device-reset": "FAIL", "vfio-user.device-reset-config": "INFO"}
    assert "after DEVICE_RESET: CC 0x460001, CSTS 0x1" in evidence(doc, "vfio-user.device-reset")
    assert code == 1


@pytest.mark.pure_python
def test_shadow_pages_kept_across_a_reset_fail(capsys: pytest.CaptureFixture[str]) -> None:
    code, doc = check(
        capsys,
        "--server-cmd",
        broken("dbbuf-survives-reset"),
        "--check",
        "dbbuf.*reset-forgets",
        "--timeout",
        "1",
    )
    assert verdicts(doc) == {"dbbuf.reset-forgets": "FAIL", "dbbuf.device-reset-forgets": "FAIL"}
    # Either the controller wrote into the old pages or it took their garbage for doorbells.
    for name in ("dbbuf.reset-forgets", "dbbuf.device-reset-forgets"):
        found = evidence(doc, name)
        assert "pages written: shadow" in found or "depth" in found, found
    assert code == 1


@pytest.mark.pure_python
def test_eventidx_never_published_stalls_a_need_event_host(capsys: pytest.CaptureFixture[str]) -> None:
    code, doc = check(
        capsys,
        "--server-cmd",
        broken("eventidx-never-published", "--sq-eventidx", "eager"),
        "--check",
        "dbbuf.need-event.nonposted.same-cpu",
        "--timeout",
        "1",
    )
    assert verdicts(doc) == {"dbbuf.need-event.nonposted.same-cpu": "FAIL"}
    assert "queue 1, depth 1: queue 1: no completion" in evidence(doc, "dbbuf.need-event.nonposted.same-cpu")
    assert code == 1


def test_a_server_that_exits_on_hangup_is_restarted_and_reconnect_skips(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, doc = check(
        capsys,
        "--server-cmd",
        broken("exit-on-hangup"),
        "--check",
        "vfio-user.re*",
        "--check",
        "vfio-user.version",
        "--check",
        "nvme.identify",
    )
    got = verdicts(doc)
    assert got.pop("vfio-user.reconnect") == "SKIP"
    assert "exited" in evidence(doc, "vfio-user.reconnect")
    assert got == dict.fromkeys(got, "PASS")
    assert doc["server_exits_on_hangup"] is True
    assert doc["servers_started"] == len(doc["checks"])
    assert code == 0


def test_a_server_that_stays_up_but_serves_no_second_client_fails_reconnect(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, doc = check(
        capsys,
        "--server-cmd",
        broken("deaf-after-hangup"),
        "--check",
        "vfio-user.reconnect",
        "--timeout",
        "1",
    )
    assert verdicts(doc) == {"vfio-user.reconnect": "FAIL"}
    assert "still runs, but a new client failed: TimeoutError: no reply to VERSION" in evidence(
        doc, "vfio-user.reconnect"
    )
    assert code == 1


def test_writes_that_read_back_different_fail_and_zeroes_are_reported(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = ["--check", "nvme.io-write", "--allow-writes"]
    code, doc = check(capsys, "--server-cmd", broken("writes-shifted", "--namespace", "ram,size=1M"), *args)
    assert verdicts(doc) == {"nvme.io-write": "FAIL"}
    assert "read back different data (first difference at byte 0)" in evidence(doc, "nvme.io-write")
    assert code == 1
    code, doc = check(capsys, "--server-cmd", SERVE + " --namespace null,size=1M", *args)
    assert verdicts(doc) == {"nvme.io-write": "INFO"}  # a null namespace or lost writes: not judged
    assert code == 0


@pytest.fixture
def listening() -> Iterator[str]:
    """A vnvme serve started here; ``vnvme check --socket`` only connects to it."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "vnvme.sock")
        proc = subprocess.Popen(shlex.split(SERVE.format(socket=path)))
        try:
            deadline = time.monotonic() + 30
            while not os.path.exists(path):
                assert proc.poll() is None and time.monotonic() < deadline, "vnvme serve did not start"
                time.sleep(0.01)
            yield path
        finally:
            proc.terminate()
            proc.wait(10)


def test_socket_only_runs_what_needs_no_restart(capsys: pytest.CaptureFixture[str], listening: str) -> None:
    code, doc = check(
        capsys,
        "--socket",
        listening,
        "--check",
        "nvme.identify",
        "--check",
        "dbbuf.need-event.posted.same-cpu",
    )
    assert verdicts(doc) == {"nvme.identify": "PASS", "dbbuf.need-event.posted.same-cpu": "SKIP"}
    assert "--server-cmd" in evidence(doc, "dbbuf.need-event.posted.same-cpu")
    assert code == 0


def test_bad_command_lines_get_one_line_and_status_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["check"]) == 2
    assert capsys.readouterr().err == "vnvme check: give --socket PATH, --server-cmd CMD, or both\n"
    assert cli.main(["check", "--socket", "/nonexistent", "--check", "no-such-check"]) == 2
    assert "no check matches no-such-check" in capsys.readouterr().err
    assert cli.main(["check", "--server-cmd", "vnvme serve"]) == 2
    assert "--server-cmd must contain {socket}" in capsys.readouterr().err
    assert cli.main(["check", "--server-cmd", "run.sh '{socket}"]) == 2
    assert capsys.readouterr().err == "vnvme check: No closing quotation\n"


def test_no_server_to_check_stops_the_run_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        missing = os.path.join(tmp, "nothing.sock")
        assert cli.main(["check", "--socket", missing]) == 2
        assert (
            capsys.readouterr().err
            == f"vnvme check: cannot connect to {missing}: No such file or directory\n"
        )
        assert cli.main(["check", "--socket", missing, "--server-cmd", "false {socket}"]) == 2
        assert capsys.readouterr().err == "vnvme check: the server exited (status 1)\n"
        occupied = os.path.join(tmp, "file")
        Path(occupied).write_text("mine")
        assert cli.main(["check", "--socket", occupied, "--server-cmd", SERVE]) == 2
        assert "is not a stale socket: not starting a server there" in capsys.readouterr().err
        assert Path(occupied).read_text() == "mine"


def test_a_check_that_raises_is_a_fail_with_the_exception_as_evidence() -> None:
    def explodes(ctx: Context) -> Any:
        raise TimeoutError("no reply to REGION_READ within 5 s")

    target = Target("/nonexistent", None)
    result = run_one(Check("x.explodes", "x", "nowhere", explodes, ""), target, Options())
    assert result.outcome.verdict == Verdict.FAIL
    assert result.outcome.evidence == "TimeoutError: no reply to REGION_READ within 5 s"
