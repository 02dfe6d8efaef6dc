from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings

sys.path.insert(0, os.path.dirname(__file__))

import vnvme.controller.controller  # noqa: E402
from host import Rig, make_rig  # noqa: E402

#: The hot path is compiled in place (scripts/build_mypyc.sh).
COMPILED = (vnvme.controller.controller.__file__ or "").endswith(".so")

settings.register_profile(
    "ci", max_examples=60, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", max_examples=200, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if COMPILED:
        skip = pytest.mark.skip(reason="replaces code the mypyc build compiles")
        for item in items:
            if item.get_closest_marker("pure_python"):
                item.add_marker(skip)


@pytest.fixture
def rig() -> Iterator[Rig]:
    """A probed controller + driver: ns 1 = 16 MiB ram (512 B LBAs), ns 2 = 1 GiB null (4 KiB)."""
    r = make_rig()
    try:
        yield r
    finally:
        r.close()
