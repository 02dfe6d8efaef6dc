"""What the coverage-guided harnesses of fuzz/ found, each input as a named test.

harness_parsers: a parser of the user's command line must refuse bad input with ValueError
(``vnvme serve`` prints it as one line naming the option). The namespace inputs below let an
OSError from the system through instead; ``vnvme serve`` still prints one line for them (it
catches OSError) but without the spec it came from. The fix belongs in
src/vnvme/controller/namespace.py (RamBackend, FileBackend). The TOML input makes tomllib
recurse past Python's limit: ``vnvme serve --config FILE`` ends with a RecursionError traceback.
The fix belongs in src/vnvme/serve.py (_load_config). Both files are another change's: xfail
until it lands.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vnvme.controller.namespace import parse_namespace_spec
from vnvme.serve import _load_config

_NAMESPACE_PY = "fix belongs in controller/namespace.py (owned by another change): OSError escapes the parser"


@pytest.mark.xfail(strict=True, raises=OSError, reason=_NAMESPACE_PY)
def test_parsers_ram_namespace_larger_than_the_address_space_is_a_value_error() -> None:
    # harness_parsers input b"\x00ram,size=1000000T": mmap fails with ENOMEM.
    with pytest.raises(ValueError, match="size"):
        parse_namespace_spec("ram,size=1000000T", 1)


@pytest.mark.xfail(strict=True, raises=OSError, reason=_NAMESPACE_PY)
def test_parsers_file_namespace_larger_than_the_file_system_allows_is_a_value_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # harness_parsers input b"\x00file=x.img,size=1000000T": ftruncate fails with EFBIG.
    monkeypatch.chdir(tmp_path)
    try:
        with pytest.raises(ValueError, match="x.img"):
            parse_namespace_spec("file=x.img,size=1000000T", 1)
    finally:
        assert os.listdir(tmp_path) == []  # holds today: the file it created is removed


@pytest.mark.xfail(strict=True, raises=OSError, reason=_NAMESPACE_PY)
def test_parsers_file_namespace_name_too_long_is_a_value_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # harness_parsers input b"\x00file=" + b"a" * 300 + b",size=1M": open fails with ENAMETOOLONG.
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="aaaa"):
        parse_namespace_spec("file=" + "a" * 300 + ",size=1M", 1)


@pytest.mark.xfail(
    strict=True,
    raises=RecursionError,
    reason="fix belongs in serve.py _load_config (owned by another change)",
)
def test_parsers_toml_nested_deeper_than_the_decoder_recurses_is_a_value_error(tmp_path: Path) -> None:
    # harness_parsers: a TOML value nested 5000 deep; tomllib recurses once per level.
    config = tmp_path / "deep.toml"
    config.write_text("namespace = " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ValueError, match="deep.toml"):
        _load_config(str(config))


@pytest.mark.xfail(
    strict=True, reason=_NAMESPACE_PY.replace("OSError escapes the parser", "file left behind")
)
def test_parsers_refused_file_namespace_of_size_zero_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # harness_parsers campaign, crash-893a3f1d: b"\x00file=neg,size=0M" is refused ("backend size
    # must be positive") after FileBackend created the file, which stays behind (vnvme serve too).
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="size"):
        parse_namespace_spec("file=neg,size=0M", 1)
    assert os.listdir(tmp_path) == []
