"""The table of checks: each one declared once with its name, group, spec section and function.

A check function takes a :class:`~vnvme.check.target.Context` and returns an :class:`Outcome`
(or raises :class:`Skip`). PASS and FAIL are for what a specification requires; INFO reports
what was seen where the specifications leave the behaviour open; SKIP is for what this run
could not exercise (a feature not advertised, a server that cannot be restarted).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vnvme.check.target import Context


class Verdict(StrEnum):
    PASS = "PASS"
    FAIL = "FAIL"
    SKIP = "SKIP"
    INFO = "INFO"


@dataclass(frozen=True)
class Outcome:
    verdict: Verdict
    evidence: str


def passed(evidence: str) -> Outcome:
    return Outcome(Verdict.PASS, evidence)


def failed(evidence: str) -> Outcome:
    return Outcome(Verdict.FAIL, evidence)


def info(evidence: str) -> Outcome:
    return Outcome(Verdict.INFO, evidence)


def verdict(ok: bool, evidence: str) -> Outcome:
    """PASS or FAIL on ``ok``, with the same evidence either way."""
    return Outcome(Verdict.PASS if ok else Verdict.FAIL, evidence)


class Skip(Exception):
    """This check cannot run here; the message says why."""


class Fail(Exception):
    """Raised from deep inside a check: FAIL with this message as the evidence."""


CheckFunction = Callable[["Context"], Outcome]


@dataclass(frozen=True)
class Check:
    name: str
    group: str  # "vfio-user", "nvme" or "dbbuf"
    section: str  # where the rule is written
    function: CheckFunction
    summary: str


CHECKS: list[Check] = []


def check(name: str, section: str) -> Callable[[CheckFunction], CheckFunction]:
    """Declare a check: appended to :data:`CHECKS` in definition order; the group is the name's
    first part and the summary the function's docstring."""

    def register(function: CheckFunction) -> CheckFunction:
        if any(c.name == name for c in CHECKS):
            raise ValueError(f"check {name} declared twice")
        summary = " ".join((function.__doc__ or name).split())
        CHECKS.append(Check(name, name.split(".", 1)[0], section, function, summary))
        return function

    return register
