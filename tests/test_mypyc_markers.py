"""The markers the optional mypyc build needs (vnvme._mypyc) cost the pure-Python package
nothing: without mypy_extensions installed they are no-ops, not an ImportError."""

from __future__ import annotations

import importlib
import sys

import pytest

import vnvme._mypyc


def test_markers_are_no_ops_without_mypy_extensions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mypy_extensions", None)  # import fails, as if not installed
    try:
        markers = importlib.reload(vnvme._mypyc)

        class Part:
            pass

        assert markers.trait(Part) is Part
        assert markers.mypyc_attr(allow_interpreted_subclasses=True)(Part) is Part
    finally:
        monkeypatch.undo()
        importlib.reload(vnvme._mypyc)
