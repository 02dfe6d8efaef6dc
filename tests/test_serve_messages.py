"""``vnvme serve`` refuses bad options and config files with one line that says what to fix."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def _refused(*args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "vnvme", "serve", "--quiet", *args],
        capture_output=True,
        text=True,
        timeout=20,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vnvme serve: "), result.stderr
    return lines[0]


@pytest.mark.parametrize(
    ("toml", "needles"),
    [
        ('sq_eventidx = "sometimes"\n', ["sq_eventidx", "'sometimes'", "'eager'", "'batch'"]),
        ('cq_eventidx = "x"\n', ["cq_eventidx", "'never'", "'eager'"]),
        ("poll = yes\n", ["not valid TOML", "line 1"]),
        ('namespace = "ram"\n', ["namespace must be a list of strings"]),
        ("namespace = [1]\n", ["namespace must be a list of strings"]),
        ('batch_timeout = "soon"\n', ["batch_timeout must be int or float"]),
        ("poll = 1\n", ["poll must be bool"]),
        ("max_io_queues = true\n", ["max_io_queues must be int"]),
        ("colour = 1\n", ["unknown key(s) colour", "known:"]),
    ],
)
def test_config_errors_name_the_file_and_the_choices(tmp_path: Path, toml: str, needles: list[str]) -> None:
    config = tmp_path / "vnvme.toml"
    config.write_text(toml)
    line = _refused("--socket", str(tmp_path / "s.sock"), "--config", str(config))
    assert str(config) in line, line
    for needle in needles:
        assert needle in line, line
    assert "SqEventIdxPolicy" not in line and "CqEventIdxPolicy" not in line


def test_missing_config_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.toml"
    line = _refused("--socket", str(tmp_path / "s.sock"), "--config", str(missing))
    assert str(missing) in line and "No such file" in line
