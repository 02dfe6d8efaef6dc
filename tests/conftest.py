from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings

sys.path.insert(0, os.path.dirname(__file__))

from host import Rig, make_rig  # noqa: E402

settings.register_profile(
    "ci", max_examples=60, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", max_examples=200, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def rig() -> Iterator[Rig]:
    """A probed controller + driver: ns 1 = 16 MiB ram (512 B LBAs), ns 2 = 1 GiB null (4 KiB)."""
    r = make_rig()
    try:
        yield r
    finally:
        r.close()
