"""The doorbell variants, declared once in vnvme.controller.variants, as each tool runs them."""

from __future__ import annotations

import pytest

from vnvme import demo
from vnvme.bench import runner
from vnvme.cli import build_parser
from vnvme.controller import variants
from vnvme.controller.config import CqEventIdxPolicy, SqEventIdxPolicy
from vnvme.controller.variants import VARIANTS


@pytest.mark.parametrize("name", list(VARIANTS))
def test_vnvme_serve_offers_every_variant(name: str) -> None:
    """The options serve_args() derives, parsed by ``vnvme serve`` itself, select the variant."""
    variant = VARIANTS[name]
    args = build_parser().parse_args(["serve", "--socket", "s", *variant.serve_args()])
    assert args.no_shadow_doorbells is not variant.shadow
    assert args.poll is variant.polls
    if not variant.polls:
        assert SqEventIdxPolicy(args.sq_eventidx) is variant.sq_eventidx
    assert CqEventIdxPolicy(args.cq_eventidx) is variant.cq_eventidx
    assert args.mappable_doorbells is variant.mapped


def test_the_bench_runs_what_it_ran() -> None:
    assert {name: v.serve_args() for name, v in runner.VARIANTS.items()} == {
        "no-dbbuf": ("--no-shadow-doorbells",),
        "dbbuf": (),
        "dbbuf-batch": ("--sq-eventidx", "batch"),
        "dbbuf-eager": ("--sq-eventidx", "eager"),
        "dbbuf-cq-eager": ("--cq-eventidx", "eager"),
        "dbbuf-poll": ("--poll",),
        "dbbuf-poll-cpu": ("--poll", "--poll-budget", "1.0"),
        "posted-no-dbbuf": ("--no-shadow-doorbells",),
        "posted-dbbuf": (),
        "mappable": ("--mappable-doorbells",),
    }
    assert runner.DEFAULT_VARIANTS == ("no-dbbuf", "dbbuf")
    assert all(not VARIANTS[n].mapped for n in runner.EXTERNAL_VARIANTS)


def test_the_demo_compares_the_controller_defaults_and_their_neighbours() -> None:
    configs = [(v.shadow, v.config().sq_eventidx, v.config().cq_eventidx) for v in demo.VARIANTS]
    eager, never = SqEventIdxPolicy.EAGER, CqEventIdxPolicy.NEVER
    assert configs[1:] == [
        (True, eager, never),
        (True, eager, CqEventIdxPolicy.EAGER),
        (True, SqEventIdxPolicy.POLL, never),
    ]
    assert not configs[0][0]
    assert all(len(v.label) <= 28 for v in demo.VARIANTS)  # the demo's table column


def test_a_poll_budget_reaches_serve() -> None:
    assert VARIANTS["dbbuf-poll-cpu"].serve_args() == ("--poll", "--poll-budget", "1.0")
    assert VARIANTS["dbbuf-poll"].serve_args() == ("--poll",)  # serve's default budget


def test_every_policy_is_offered_by_serve() -> None:
    offered = {v.sq_eventidx for v in VARIANTS.values()}, {v.cq_eventidx for v in VARIANTS.values()}
    assert offered == (set(SqEventIdxPolicy), set(CqEventIdxPolicy))
    assert set(variants.SERVE_SQ_CHOICES) == {p.value for p in SqEventIdxPolicy} - {"poll"}
