"""What the coverage-guided harnesses of fuzz/ found, each input as a named test.

harness_parsers: a parser of the user's command line must refuse bad input with ValueError
(``vnvme serve`` prints it as one line naming the option); these inputs let an OSError from the
system through instead. ``vnvme serve`` still prints one line for them (it catches OSError) but
without the spec it came from. The fix belongs in src/vnvme/controller/namespace.py (RamBackend,
FileBackend), which another change owns: xfail until it lands.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vnvme.controller.namespace import parse_namespace_spec

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
