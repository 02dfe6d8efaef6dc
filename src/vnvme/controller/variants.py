"""The doorbell variants, declared once: how the controller's doorbells are configured (shadow
doorbells, EventIdx policies, polling, a mappable doorbell page) and how the host rings them
(posted writes), with the selections each tool runs.

``vnvme serve`` offers every variant through its options (:meth:`DoorbellVariant.serve_args`
are relative to :data:`SERVE_SQ_EVENTIDX` / :data:`SERVE_CQ_EVENTIDX`, its defaults);
``vnvme bench`` runs :data:`BENCH` (by default :data:`BENCH_DEFAULT`), ``vnvme demo`` runs
:data:`DEMO` in one process, ``vnvme vm compare`` boots a guest on each of :data:`VM_COMPARE`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from vnvme.controller.config import ControllerConfig, CqEventIdxPolicy, SqEventIdxPolicy

#: ``vnvme serve``'s EventIdx policies when no option says otherwise.
SERVE_SQ_EVENTIDX: Final = SqEventIdxPolicy.ADAPTIVE
SERVE_CQ_EVENTIDX: Final = CqEventIdxPolicy.NEVER
#: The SQ policies ``vnvme serve --sq-eventidx`` takes (polling is ``--poll``: it also changes
#: how the server runs the controller).
SERVE_SQ_CHOICES: Final = tuple(p.value for p in SqEventIdxPolicy if p is not SqEventIdxPolicy.POLL)


@dataclass(frozen=True)
class DoorbellVariant:
    #: ``vnvme bench --variants`` name.
    name: str
    #: How tables and reports call it.
    label: str
    #: Doorbell Buffer Config offered by the controller and used by the host.
    shadow: bool = True
    sq_eventidx: SqEventIdxPolicy = SERVE_SQ_EVENTIDX
    cq_eventidx: CqEventIdxPolicy = SERVE_CQ_EVENTIDX
    #: The host's doorbell writes do not wait for their reply (QEMU's default for vfio-user).
    posted: bool = False
    #: The doorbells are stores into a page the client maps (no message at all).
    mapped: bool = False
    #: ``vnvme serve --poll-budget`` for a polling variant (None: serve's default).
    poll_budget: float | None = None

    @property
    def polls(self) -> bool:
        """The controller polls the shadow tails (its edge runs it that way)."""
        return self.sq_eventidx is SqEventIdxPolicy.POLL

    def serve_args(self) -> tuple[str, ...]:
        """The ``vnvme serve`` options that run this variant."""
        args: list[str] = []
        if not self.shadow:
            args.append("--no-shadow-doorbells")
        if self.polls:
            args.append("--poll")
        elif self.sq_eventidx is not SERVE_SQ_EVENTIDX:
            args += ["--sq-eventidx", self.sq_eventidx.value]
        if self.cq_eventidx is not SERVE_CQ_EVENTIDX:
            args += ["--cq-eventidx", self.cq_eventidx.value]
        if self.mapped:
            args.append("--mappable-doorbells")
        if self.poll_budget is not None:
            args += ["--poll-budget", str(self.poll_budget)]
        return tuple(args)

    def config(self) -> ControllerConfig:
        """A controller configured as this variant (in-process: the caller runs it polling if
        :attr:`polls`)."""
        return ControllerConfig(
            shadow_doorbells=self.shadow, sq_eventidx=self.sq_eventidx, cq_eventidx=self.cq_eventidx
        )


VARIANTS: Final[dict[str, DoorbellVariant]] = {
    v.name: v
    for v in (
        DoorbellVariant("no-dbbuf", "no dbbuf", shadow=False),
        DoorbellVariant("dbbuf", "dbbuf"),
        DoorbellVariant("dbbuf-batch", "dbbuf, SQ EventIdx batch", sq_eventidx=SqEventIdxPolicy.BATCH),
        DoorbellVariant("dbbuf-eager", "dbbuf, SQ EventIdx eager", sq_eventidx=SqEventIdxPolicy.EAGER),
        DoorbellVariant("dbbuf-cq-eager", "dbbuf, CQ EventIdx eager", cq_eventidx=CqEventIdxPolicy.EAGER),
        DoorbellVariant(
            "dbbuf-eager-cq-eager",
            "dbbuf, SQ+CQ EventIdx eager",
            sq_eventidx=SqEventIdxPolicy.EAGER,
            cq_eventidx=CqEventIdxPolicy.EAGER,
        ),
        DoorbellVariant("dbbuf-poll", "dbbuf, controller polls", sq_eventidx=SqEventIdxPolicy.POLL),
        DoorbellVariant(
            "dbbuf-poll-cpu",
            "dbbuf, controller polls, a whole CPU",
            sq_eventidx=SqEventIdxPolicy.POLL,
            poll_budget=1.0,
        ),
        DoorbellVariant("posted-no-dbbuf", "no dbbuf, posted writes", shadow=False, posted=True),
        DoorbellVariant("posted-dbbuf", "dbbuf, posted writes", posted=True),
        DoorbellVariant("mappable", "dbbuf, mappable doorbells", mapped=True),
    )
}

#: What ``vnvme bench --variants`` offers ('all': these, in this order) ...
BENCH: Final = (
    "no-dbbuf",
    "dbbuf",
    "dbbuf-batch",
    "dbbuf-eager",
    "dbbuf-cq-eager",
    "dbbuf-poll",
    "dbbuf-poll-cpu",
    "posted-no-dbbuf",
    "posted-dbbuf",
    "mappable",
)
#: ... runs without --variants ...
BENCH_DEFAULT: Final = ("no-dbbuf", "dbbuf")
#: ... and can run against a server it does not start (all on the client's side).
BENCH_EXTERNAL: Final = ("no-dbbuf", "dbbuf", "posted-no-dbbuf", "posted-dbbuf")
#: What ``vnvme demo`` compares in one process (the controller's own defaults: SQ EventIdx eager).
DEMO: Final = ("no-dbbuf", "dbbuf-eager", "dbbuf-eager-cq-eager", "dbbuf-poll")
#: What ``vnvme vm compare`` boots a guest on.
VM_COMPARE: Final = ("dbbuf", "dbbuf-batch", "no-dbbuf", "dbbuf-poll", "dbbuf-poll-cpu", "mappable")

for _selection in (BENCH, BENCH_DEFAULT, BENCH_EXTERNAL, DEMO, VM_COMPARE):
    if not set(_selection) <= VARIANTS.keys():
        raise AssertionError(f"unknown variant in {_selection}")
if not set(BENCH_DEFAULT) | set(BENCH_EXTERNAL) <= set(BENCH):
    raise AssertionError("bench runs a variant it does not offer")
if any(VARIANTS[name].posted or VARIANTS[name].mapped for name in DEMO):
    raise AssertionError("the demo runs in one process: no posted writes, no mapped page")
