"""What the fuzz properties share: example counts for long campaigns, and a count of the inputs
each property actually executed (scripts/fuzz.py reads it).

- ``VNVME_FUZZ_EXAMPLES=N``: every property decorated with :func:`campaign` runs N examples
  instead of the hypothesis profile's count (CI's ``ci`` profile: 60, derandomized).
- ``VNVME_FUZZ_COUNTS=FILE``: at exit, write ``{property name: inputs executed}`` as JSON to
  FILE. Every call of the property counts, generated examples as well as the replays hypothesis
  makes while it shrinks a failure.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
from collections import Counter
from collections.abc import Callable
from typing import Final, ParamSpec, TypeVar

from hypothesis import settings

P = ParamSpec("P")
R = TypeVar("R")

CAMPAIGN: Final = os.environ.get("VNVME_FUZZ_EXAMPLES")
_COUNTS_FILE: Final = os.environ.get("VNVME_FUZZ_COUNTS")
executed: Counter[str] = Counter()


def campaign() -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Above ``@given``: in a campaign, run VNVME_FUZZ_EXAMPLES examples (else the profile's)."""
    if CAMPAIGN:
        return settings(max_examples=int(CAMPAIGN))
    return settings()


def counted(test: Callable[P, R]) -> Callable[P, R]:
    """Below ``@given``: count every input the property runs, under its name."""
    name = test.__name__

    @functools.wraps(test)
    def one_input(*args: P.args, **kwargs: P.kwargs) -> R:
        executed[name] += 1
        return test(*args, **kwargs)

    return one_input


def _write_counts() -> None:
    if _COUNTS_FILE:
        with open(_COUNTS_FILE, "w") as out:
            json.dump(dict(executed), out, sort_keys=True)


atexit.register(_write_counts)
