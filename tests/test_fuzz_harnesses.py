"""The coverage-guided harnesses of fuzz/: every seed replays clean (no engine needed), and with
atheris installed (``pip install '.[fuzz]'``) each harness fuzzes a few hundred inputs."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FUZZ = ROOT / "fuzz"
HARNESSES = sorted(p.stem.removeprefix("harness_") for p in FUZZ.glob("harness_*.py"))
SMOKE_RUNS = 300


def _harness(name: str) -> Callable[[bytes], None]:
    if str(FUZZ) not in sys.path:
        sys.path.insert(0, str(FUZZ))
    module = importlib.import_module(f"harness_{name}")
    one_input: Callable[[bytes], None] = module.one_input
    return one_input


def test_every_harness_has_seeds() -> None:
    assert HARNESSES == ["controller", "dataptr", "parsers", "vfio_user"]
    for name in HARNESSES:
        assert any((FUZZ / "corpus" / name).iterdir()), name


@pytest.mark.parametrize("name", HARNESSES)
def test_seeds_replay_clean(name: str) -> None:
    one_input = _harness(name)
    for seed in sorted((FUZZ / "corpus" / name).iterdir()):
        one_input(seed.read_bytes())


@pytest.mark.parametrize("name", HARNESSES)
def test_atheris_smoke(name: str, tmp_path: Path) -> None:
    pytest.importorskip("atheris")
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    result = subprocess.run(
        [
            sys.executable,
            str(FUZZ / f"harness_{name}.py"),
            f"-runs={SMOKE_RUNS}",
            "-seed=1",
            "-timeout=30",
            f"-artifact_prefix={tmp_path}/",
            str(tmp_path),
            str(FUZZ / "corpus" / name),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Done {SMOKE_RUNS} runs" in result.stderr, result.stderr[-3000:]
    assert not list(tmp_path.glob("crash-*"))
