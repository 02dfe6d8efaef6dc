"""Output files and folders named on the command line: a missing folder the user names as a
working folder is created; anything else that cannot be used is one line and exit status 2,
before any work (no guest boots, no server starts), and nothing already there is changed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import vnvme.vm.command
from vnvme.cli import main
from vnvme.vm.provision import ProvisionError
from vnvme.vm.scenarios import Scenario, ScenarioReport


class _NoProvisioning:
    """Stands in for the provisioner: records that the command got that far, and stops it there
    (so no guest can boot whatever the paths)."""

    calls = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def image(self, kernel: str) -> Any:
        type(self).calls += 1
        raise ProvisionError("stopped by the test")


@pytest.fixture
def no_provisioning(monkeypatch: pytest.MonkeyPatch) -> type[_NoProvisioning]:
    _NoProvisioning.calls = 0
    monkeypatch.setattr(vnvme.vm.command, "Provisioner", _NoProvisioning)
    return _NoProvisioning


@pytest.mark.parametrize("command", ["run", "compare", "soak"])
def test_vm_work_dir_in_a_missing_folder_is_created(
    command: str, tmp_path: Path, no_provisioning: type[_NoProvisioning], capsys: pytest.CaptureFixture[str]
) -> None:
    work = tmp_path / "does-not-exist" / "runs"
    cache = tmp_path / "no-cache-yet"
    assert main(["vm", command, "--work-dir", str(work), "--cache", str(cache)]) == 2
    assert no_provisioning.calls == 1
    assert work.is_dir() and cache.is_dir()
    assert "provisioning failed: stopped by the test" in capsys.readouterr().err


def _bad_paths(tmp: Path) -> list[tuple[str, list[str], str]]:
    """(subcommand, options, what the one line says) for paths that cannot be used."""
    regular = tmp / "notes.txt"
    folder = tmp / "results"
    under_file = str(regular / "sub")
    return [
        ("provision", ["--cache", str(regular)], f"--cache {regular}: exists and is not a directory"),
        ("run", ["--cache", under_file], f"--cache {under_file}: cannot create it: Not a directory"),
        ("run", ["--work-dir", str(regular)], f"--work-dir {regular}: exists and is not a directory"),
        (
            "compare",
            ["--work-dir", under_file],
            f"--work-dir {under_file}: cannot create it: Not a directory",
        ),
        ("soak", ["--work-dir", under_file], f"--work-dir {under_file}: cannot create it: Not a directory"),
        ("run", ["--json", str(folder)], f"--json {folder}: is a directory"),
        ("soak", ["--json", str(folder)], f"--json {folder}: is a directory"),
        ("compare", ["--json", str(tmp / "no" / "r.json")], f"directory {tmp / 'no'} does not exist"),
        ("compare", ["--markdown", str(folder)], f"--markdown {folder}: is a directory"),
        ("compare", ["--markdown", under_file], f"directory {regular} does not exist"),
    ]


def test_vm_paths_that_cannot_be_used_are_one_line_before_provisioning(
    tmp_path: Path, no_provisioning: type[_NoProvisioning], capsys: pytest.CaptureFixture[str]
) -> None:
    regular = tmp_path / "notes.txt"
    regular.write_text("mine\n")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "kept").write_text("mine too\n")
    for command, options, message in _bad_paths(tmp_path):
        assert main(["vm", command, *options]) == 2, (command, options)
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"vnvme vm {command}: "), err
        assert message in err, err
    assert no_provisioning.calls == 0
    assert regular.read_text() == "mine\n"
    assert (tmp_path / "results" / "kept").read_text() == "mine too\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "results"]


def test_serve_trace_file_that_cannot_be_written_names_the_option(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    for path, message in (
        (tmp_path / "missing" / "t.log", f"directory {tmp_path / 'missing'} does not exist"),
        (tmp_path, "is a directory"),
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "vnvme", "serve", "--quiet", "--socket", str(tmp_path / "s.sock")]
            + ["--namespace", f"file={image},size=1M", "--trace", "*", "--trace-file", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
        assert proc.returncode == 2
        assert proc.stderr == f"vnvme serve: --trace-file {path}: {message}\n"
    assert list(tmp_path.iterdir()) == []  # neither the namespace's file nor a socket was left


def test_vm_report_whose_folder_went_during_the_run_is_one_line_and_status_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "reports"
    folder.mkdir()

    class Provisioned(_NoProvisioning):
        def image(self, kernel: str) -> Any:
            return object()  # only handed on to run_scenarios, replaced below

    def run_scenarios(image: Any, options: Any) -> ScenarioReport:
        folder.rmdir()  # the user tidies up while the guests run
        return ScenarioReport("6.12", "QEMU", [Scenario("boots", True, "ok")], [], None)

    monkeypatch.setattr(vnvme.vm.command, "Provisioner", Provisioned)
    monkeypatch.setattr(vnvme.vm.command, "run_scenarios", run_scenarios)
    path = folder / "r.json"
    assert main(["vm", "run", "--cache", str(tmp_path / "cache"), "--json", str(path)]) == 1
    out, err = capsys.readouterr()
    assert "PASS  boots" in out  # the results were shown before the report was lost
    assert err == f"vnvme vm run: --json {path}: cannot write it: No such file or directory\n"
