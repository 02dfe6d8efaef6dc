"""What the optional mypyc build (``scripts/build_mypyc.sh``) needs to see in the source.

``trait``: the Controller's parts written in files of their own (CommandProcessing,
DoorbellWrites) are its base classes; mypyc compiles a class with more than one base only if
the others are traits. ``mypyc_attr(allow_interpreted_subclasses=True)``: a class others may
extend in pure Python (the EventIdx policies). In pure Python both do nothing (and need no mypy
installed).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mypy_extensions import mypyc_attr as mypyc_attr
    from mypy_extensions import trait as trait
else:
    try:
        from mypy_extensions import mypyc_attr, trait
    except ImportError:  # without mypy_extensions: no-ops, as mypy_extensions' own are

        def trait(cls):
            return cls

        def mypyc_attr(*_args, **_kwargs):
            return trait


__all__ = ["mypyc_attr", "trait"]
