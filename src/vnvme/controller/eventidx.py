"""EventIdx policies: when the controller asks the host for a doorbell.

The controller calls its SQ policy at a few named moments and does what the answer says; the
arithmetic is :func:`vnvme.spec.dbbuf.rearm_event_idx` (EventIdx = head + ahead), the memory
accesses are :class:`vnvme.controller.doorbells.Doorbells`. Like the core, a policy has no
clock: ``now`` is an argument, and a deadline it returns comes back as
:meth:`SqEventIdx.deadline_passed` once the edge's ``now`` reaches it.

Moments (an SQ is told only while it follows its shadow slot):

- :meth:`~SqEventIdx.attached`: the SQ switched onto its shadow slot (Doorbell Buffer Config,
  or created afterwards); the answer is the EventIdx to start with.
- :meth:`~SqEventIdx.rang`: a doorbell was written for the SQ (trapped or mapped).
- :meth:`~SqEventIdx.ran_dry`: the SQ is idle at its head: the answer is ``ahead``. For
  ``ahead`` >= 0 the controller publishes EventIdx and probes (fence, re-read); if the host moved
  the tail meanwhile it keeps going and asks again with ``attempts`` counting the lost probes.
  ``ahead`` = -1 asks for no doorbell at all (the edge is polling): published, not probed.
- :meth:`~SqEventIdx.rearmed`: a probe found the SQ still idle; the answer is a deadline (``now``
  units) by which the controller looks at the shadow tail anyway, or None.
- :meth:`~SqEventIdx.deadline_passed`: that deadline passed; the controller looks right after.
- :meth:`~SqEventIdx.posted`: completions were posted to a CQ (once per CQ per pass).

:meth:`~SqEventIdx.rang` and :meth:`~SqEventIdx.posted` are hot and unused by the policies
here: the controller calls them only if a subclass overrides them. The controller caches every
bound method once, so a policy costs a call per moment and allocates nothing per I/O.
Per-SQ state a policy keeps lives in ``sq.policy_state`` (set by :meth:`~SqEventIdx.attached`).

The shape follows QEMU's IOThread adaptive polling (a few events in, a time budget out) and
aioquic's pluggable congestion control (one small class per algorithm behind one interface).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

from vnvme._mypyc import mypyc_attr
from vnvme.controller.config import ControllerConfig, CqEventIdxPolicy, SqEventIdxPolicy
from vnvme.controller.queues import CompletionQueue, SubmissionQueue

#: Learn a CQ's head from its shadow slot (the controller's; a policy may ask before deciding).
RefreshCqHead = Callable[[CompletionQueue], None]


# Every policy class is open to subclasses in pure Python, in the mypyc build too.
@mypyc_attr(allow_interpreted_subclasses=True)
class SqEventIdx:
    """SQ EventIdx policy. The base publishes exactly what the controller has consumed (ahead
    0) and, while the edge polls, nothing the host can cross (ahead -1)."""

    #: The configuration value that selects this policy (None: not selectable by name).
    name: ClassVar[SqEventIdxPolicy | None] = None
    #: Whether an edge that polls starts out polling after every controller reset.
    polls_from_reset: ClassVar[bool] = False

    def __init__(self, config: ControllerConfig, refresh_cq_head: RefreshCqHead) -> None:
        self.config = config
        self.refresh_cq_head = refresh_cq_head
        self.polling = self.polls_from_reset
        #: Over the controller's life (queues come and go): predictions met, missed, and larger
        #: batches offered (policies that predict count them).
        self.met = self.missed = self.offers = 0

    def reset(self) -> None:
        """Controller reset: every queue is gone."""
        self.polling = self.polls_from_reset

    def start_polling(self) -> None:
        """The edge is about to poll every shadow tail itself: no SQ needs to ring."""
        self.polling = True

    def stop_polling(self) -> None:
        """The edge is about to sleep until a doorbell (it rearms every SQ right after)."""
        self.polling = False

    def attached(self, sq: SubmissionQueue) -> int:
        """``ahead`` for an SQ that starts following its shadow slot (at its tail, or at its
        head if -1)."""
        return -1 if self.polling else 0

    def rang(self, sq: SubmissionQueue, now: float) -> None:
        """A doorbell was written for ``sq`` (called only if overridden). A register write
        carries no time: ``now`` is that of the last pass. The tail is read at the next pass."""

    def ran_dry(self, sq: SubmissionQueue, processed: int, attempts: int, now: float) -> int:
        """``sq`` is idle at its head after taking ``processed`` commands in this pass, with
        ``attempts`` probes lost so far: how far ahead of the head to ask for a doorbell."""
        return -1 if self.polling else 0

    def rearmed(self, sq: SubmissionQueue, ahead: int, now: float) -> float | None:
        """The probe after publishing ``ahead`` found ``sq`` idle: a deadline, or None."""
        return None

    def deadline_passed(self, sq: SubmissionQueue, waiting: int, now: float) -> float | None:
        """The deadline :meth:`rearmed` returned has passed, with ``waiting`` commands in the
        shadow slot not taken yet (-1: unknown): None to look now, or a later deadline to keep
        the published EventIdx until then."""
        return None

    def posted(self, cq: CompletionQueue, now: float) -> float | None:
        """Completions were posted to ``cq`` in this pass (called only if overridden): None to
        raise its interrupt, or a deadline to hold it to (the controller asks again at the
        next pass that posts to ``cq``, and once the deadline has come)."""
        return None

    def counters(self, sq: SubmissionQueue) -> tuple[int, int, int]:
        """Predictions ``sq``'s host met, missed, and larger batches offered to it."""
        return 0, 0, 0

    def unreaped(self, cq: CompletionQueue) -> int:
        """Completions posted to ``cq`` that its host has not consumed yet, as its shadow head
        says now (a closed-loop host replaces each one it reaps with a new command)."""
        self.refresh_cq_head(cq)
        return cq.used()


@mypyc_attr(allow_interpreted_subclasses=True)
class EagerSqEventIdx(SqEventIdx):
    """EventIdx = the tail just consumed: one doorbell per batch the host submits while idle."""

    name = SqEventIdxPolicy.EAGER


class _Burst:
    """Policy BATCH's per-SQ state."""

    __slots__ = ("mark", "predicted", "renewing")

    def __init__(self) -> None:
        # ``sq.entries`` when the SQ last went idle: the burst is what it took since. (0 at
        # first, as the count of an SQ switched onto its slot always started at its creation.)
        self.mark = 0
        # How far ahead of the head the outstanding prediction lies, and whether this pass was
        # started by that prediction expiring.
        self.predicted = 0
        self.renewing = False


@mypyc_attr(allow_interpreted_subclasses=True)
class BatchSqEventIdx(SqEventIdx):
    """EventIdx ahead of the head by the batch the host is expected to place next (see
    :attr:`SqEventIdxPolicy.BATCH <vnvme.controller.config.SqEventIdxPolicy.BATCH>`)."""

    name = SqEventIdxPolicy.BATCH

    def __init__(self, config: ControllerConfig, refresh_cq_head: RefreshCqHead) -> None:
        super().__init__(config, refresh_cq_head)
        self.timeout = config.batch_timeout

    def attached(self, sq: SubmissionQueue) -> int:
        sq.policy_state = _Burst()
        return -1 if self.polling else 0

    def ran_dry(self, sq: SubmissionQueue, processed: int, attempts: int, now: float) -> int:
        if self.polling:
            return -1
        if attempts:
            return 0  # the host is moving the tail right now: ask for its very next entry
        state: _Burst = sq.policy_state
        # The host will place as many commands as it has completions to reap: this burst's,
        # and any it has not consumed yet (a pipelined host's bursts are 1).
        n = sq.size
        expected = sq.entries - state.mark
        cq = sq.cq
        if cq.shadow_mode and expected < n:
            expected = max(expected, self.unreaped(cq))
        ahead = max(0, min(expected, n - 1) - 1)
        if state.renewing:
            # Woken by an expired prediction: commands found means the host is still placing
            # them, slower than the timeout; keep predicting.
            state.renewing = False
            if processed:
                ahead = max(ahead, state.predicted)
        return ahead

    def rearmed(self, sq: SubmissionQueue, ahead: int, now: float) -> float | None:
        state: _Burst = sq.policy_state
        state.mark = sq.entries
        state.predicted = ahead
        return now + self.timeout if ahead else None

    def deadline_passed(self, sq: SubmissionQueue, waiting: int, now: float) -> float | None:
        state: _Burst = sq.policy_state
        state.mark = sq.entries  # publish exactly (EventIdx = head), unless this look finds commands
        state.renewing = True
        return None


class _Learned:
    """Policy ADAPTIVE's per-SQ state: what it has learnt of the host, and its counters."""

    __slots__ = (
        "mark",
        "window",
        "gap",
        "armed_at",
        "predicted",
        "expired",
        "wait",
        "raced",
        "offers",
        "met",
        "missed",
        "depth",
        "hold_for",
        "holds",
        "held_met",
        "held_missed",
        "held_at",
        "hold_until",
        "fill",
    )

    def __init__(self, gap: float) -> None:
        self.mark = 0  # sq.entries at the last rearm: what was taken since is the host's burst
        self.window = 1  # the batch the host is believed to place
        self.gap = gap  # seconds per command it takes the host to reach a prediction (average)
        self.armed_at = 0.0  # when the outstanding prediction was published
        self.predicted = 0  # its size (ahead + 1); 0: none outstanding
        self.expired = False  # its deadline passed before the host rang
        self.wait = 0.0  # how long the controller waits this time before it looks
        self.raced = False  # the outstanding prediction is the one command after a lost race
        self.offers = _Offers()  # of larger batches
        self.met = 0
        self.missed = 0
        # Polled (POLL): the completions the host is believed to keep out, how many the held
        # interrupt waits for, its own offers of larger holds (not the asleep prediction's: a
        # server that sleeps between polls predicts with those), when it was first held (-1:
        # none held), until when, and the seconds per command the host takes to place them
        # (average).
        self.depth = 1
        self.hold_for = 1
        self.holds = _Offers()
        self.held_met = self.held_missed = 0
        self.held_at = -1.0
        self.hold_until = 0.0
        self.fill = gap


#: ADAPTIVE: predictions met before another larger batch is offered, at first and at most (the
#: wait doubles after each offer the host could not fill, halves after one it did).
ADAPTIVE_MIN_PATIENCE = 4
ADAPTIVE_MAX_PATIENCE = 1024


class _Offers:
    """When to offer the host more than it has shown it takes (a larger batch; a longer
    interrupt hold): once ``patience`` predictions were met since the last offer; the patience
    halves after an offer the host filled and doubles after one it could not, as KVM's halt
    polling grows and shrinks. ``open``: the outstanding prediction is an offer."""

    __slots__ = ("credit", "patience", "open", "made")

    def __init__(self) -> None:
        self.credit = 0
        self.patience = ADAPTIVE_MIN_PATIENCE
        self.open = False
        self.made = 0

    def due(self) -> bool:
        """Whether the next prediction is to be an offer; if so, it is made (open)."""
        if self.credit < self.patience:
            return False
        self.credit = 0
        self.open = True
        self.made += 1
        return True

    def met(self) -> None:
        """A prediction met (filled, if it was an offer)."""
        if self.open:
            self.patience = max(self.patience // 2, ADAPTIVE_MIN_PATIENCE)
            self.open = False
        self.credit += 1

    def missed(self) -> bool:
        """A prediction missed; whether it was an offer (the credit stays: see _missed)."""
        if not self.open:
            return False
        self.patience = min(self.patience * 2, ADAPTIVE_MAX_PATIENCE)
        self.open = False
        return True


#: ADAPTIVE: weight of a new sample in the host's pace (1/8, as QEMU's default poll-weight).
ADAPTIVE_WEIGHT = 0.125
#: ADAPTIVE: how many times the host's usual time to place the predicted batch it waits.
ADAPTIVE_SLACK = 2.0


@mypyc_attr(allow_interpreted_subclasses=True)
class AdaptiveSqEventIdx(SqEventIdx):
    """EventIdx ahead by a learnt batch, with a learnt wait (see
    :attr:`SqEventIdxPolicy.ADAPTIVE <vnvme.controller.config.SqEventIdxPolicy.ADAPTIVE>`).

    Each idle moment judges the prediction before it: met (the host rang: its pace is
    sampled, the window is kept or widened to what it placed) or missed (the deadline came
    first: the window shrinks to what the host had placed). The next prediction is the window,
    or the completions the host has yet to reap if more (it replaces each one it reaps, as
    BATCH counts), doubled as an offer once enough predictions in a row were met.
    """

    name = SqEventIdxPolicy.ADAPTIVE

    def __init__(self, config: ControllerConfig, refresh_cq_head: RefreshCqHead) -> None:
        super().__init__(config, refresh_cq_head)
        self.min_wait = config.batch_timeout
        self.max_wait = config.max_batch_wait

    def attached(self, sq: SubmissionQueue) -> int:
        sq.policy_state = _Learned(self.min_wait / 2)
        return -1 if self.polling else 0

    def ran_dry(self, sq: SubmissionQueue, processed: int, attempts: int, now: float) -> int:
        if self.polling:
            return -1
        state: _Learned = sq.policy_state
        if attempts or not sq.doorbell.slot_kept:
            # The host is moving the tail right now, or it rings for every command whatever
            # EventIdx says (Linux's admin queue): ask for its very next entry. (An offer made
            # before a lost race was never published: nothing to judge it by.) That entry
            # says nothing of the host's batch: the window stays (a 1-vCPU Linux guest at
            # depth 8 lost one race in about fifty, and each one that set the window to the
            # single command it then rang for split its batches in two).
            state.offers.open = False
            state.raced = True
            return 0
        placed = sq.entries - state.mark
        if state.predicted:
            if not state.expired:
                if not placed:
                    return state.predicted - 1  # woken for something else: the prediction stands
                self._met(state, placed, now)
            elif not placed:
                # Nothing placed by max_batch_wait (deadline_passed waited that long): the host
                # is idle. Ask for its first command, keep the window.
                state.expired = False
                state.predicted = 0
                return 0
            else:
                self._missed(state)
                if not state.offers.missed():
                    # A host that was placing commands, only slower than usual this time: its
                    # pace is at most this (an offer it could not fill says nothing of it).
                    elapsed = min(now - state.armed_at, self.max_wait)
                    state.gap += (elapsed / state.predicted - state.gap) * ADAPTIVE_WEIGHT
                # Halved at most, as KVM's halt polling shrinks: a late host does not undo a
                # window it built, a host that really places fewer brings it down in a few.
                state.window = max(placed, state.window // 2, 1)
        state.expired = state.raced = state.offers.open = False
        n = sq.size
        target = state.window
        cq = sq.cq
        if cq.shadow_mode:
            target = max(target, self.unreaped(cq))
        if target < n - 1 and state.offers.due():
            target *= 2
            self.offers += 1
        return min(target, n - 1) - 1

    def _met(self, state: _Learned, batch: int, now: float) -> None:
        """The host rang: it placed ``batch`` commands."""
        state.met += 1
        self.met += 1
        if state.raced:  # asked for one command after a lost race: not a batch of its own
            state.raced = False
            state.window = max(state.window, batch)
            return
        elapsed = now - state.armed_at
        if elapsed < self.max_wait:  # an idle host (between jobs) says nothing of its pace
            state.gap += (elapsed / state.predicted - state.gap) * ADAPTIVE_WEIGHT
        state.offers.met()
        state.window = batch  # at least the prediction: the host crossed it

    def _missed(self, state: _Learned) -> None:
        # The credit towards the next offer stays: a host late now and then (a guest's vCPU
        # preempted) must not keep a window it outgrew, which a count in a row would (once the
        # patience is high, as after a stretch at depth 1, a miss every few hundred predictions
        # would stop every later offer).
        state.missed += 1
        self.missed += 1

    def rearmed(self, sq: SubmissionQueue, ahead: int, now: float) -> float | None:
        state: _Learned = sq.policy_state
        if state.predicted != ahead + 1 or sq.entries != state.mark:
            # A new prediction (not one that stood through a pass, nor one waited for longer).
            state.armed_at = now
            state.predicted = ahead + 1
            wait = ADAPTIVE_SLACK * state.gap * state.predicted
            state.wait = min(max(wait, self.min_wait), self.max_wait)
        state.mark = sq.entries
        if not ahead:
            return None  # the host rings for its first command: nothing to wait for
        return now + state.wait

    def deadline_passed(self, sq: SubmissionQueue, waiting: int, now: float) -> float | None:
        state: _Learned = sq.policy_state
        if waiting >= state.predicted:
            return None  # the host crossed EventIdx: its doorbell is on its way (met)
        # Not all of the batch is placed yet: none of it (the host's wake-up after an interrupt
        # can take longer than the batch itself), or part (a host slower this time, as a vCPU
        # preempted). Taking a part now would interrupt the host inside its batch (one vCPU
        # takes the interrupt at once) and split it in two for the batches after: wait twice as
        # long, up to max_batch_wait since the prediction was made. An offer the host has
        # started but not filled is judged now (it costs its wait, as before).
        limit = state.armed_at + self.max_wait
        if (waiting == 0 or (waiting > 0 and not state.offers.open)) and now < limit:
            state.wait *= 2
            return min(now + state.wait, limit)
        state.expired = True
        return None

    def counters(self, sq: SubmissionQueue) -> tuple[int, int, int]:
        state = sq.policy_state
        if not isinstance(state, _Learned):
            return 0, 0, 0  # never followed its shadow slot
        # Polled interrupt holds (POLL) are predictions too: met, missed and offered.
        return (
            state.met + state.held_met,
            state.missed + state.held_missed,
            state.offers.made + state.holds.made,
        )


@mypyc_attr(allow_interpreted_subclasses=True)
class PollSqEventIdx(AdaptiveSqEventIdx):
    """The edge polls: EventIdx where the host never crosses it, until it rearms to sleep.
    Served without polling between rearms (an edge whose poll window is shut), an SQ asks for
    doorbells as ADAPTIVE, the event-driven default, does: a shut window is that controller."""

    name = SqEventIdxPolicy.POLL
    polls_from_reset = True

    def posted(self, cq: CompletionQueue, now: float) -> float | None:
        """Polled, the controller takes each command as the host places it and completes it
        while the host is still placing the rest: an interrupt then stops the host inside its
        batch (one vCPU takes it at once), and no batch ever forms (measured with a 1-vCPU
        Linux guest: 0.94 interrupts per I/O at depth 8, 0.73x the event-driven IOPS). So the
        interrupt is held until it carries as many completions as the host is believed to keep
        out (it reaps them all, then places as many), or for about twice its usual time to
        place them (between batch_timeout and max_batch_wait). That number is learnt as
        ADAPTIVE learns a batch: from what interrupts carried, and from larger holds offered
        once enough went as predicted (a host that keeps one out is offered ever more rarely).
        The count is the CQ's own (posted since its last interrupt): reading the host's shadow
        head here cost our own client a fifth of its polled IOPS at depth 1. Never the admin
        CQ (nor a CQ that several SQs share): as coalescing, §5.21.1.8."""
        if not self.polling or not cq.cqid or not cq.ien or len(cq.sqs) != 1:
            return None
        sq = next(iter(cq.sqs.values()))
        state = sq.policy_state
        if not isinstance(state, _Learned):
            return None
        carried = cq.entries - cq.irq_mark  # what an interrupt now would carry
        held_at = state.held_at
        if held_at < 0.0:
            target = state.depth
            holds = state.holds
            if holds.due():
                target *= 2
                self.offers += 1
            if carried >= target:  # as predicted: nothing to hold
                holds.open = False
                holds.credit += 1
                return None
            if self._reaps_unasked(state, cq, carried):
                return None
            state.held_at = now
            state.hold_for = target
            wait = ADAPTIVE_SLACK * state.fill * target
            state.hold_until = now + min(max(wait, self.min_wait), self.max_wait)
            return state.hold_until
        if self._reaps_unasked(state, cq, carried):
            return None
        if carried < state.hold_for and now < state.hold_until:
            return state.hold_until
        elapsed = now - held_at
        state.held_at = -1.0
        if carried >= state.hold_for:  # the host filled the hold: its pace, and what it keeps
            state.fill += (elapsed / state.hold_for - state.fill) * ADAPTIVE_WEIGHT
            state.held_met += 1
            self.met += 1
            state.holds.met()
            state.depth = carried
        else:
            state.held_missed += 1
            self.missed += 1
            if not state.holds.missed():
                # Slower than usual this time (a lower bound of its pace), or it keeps fewer.
                state.fill += (elapsed / state.hold_for - state.fill) * ADAPTIVE_WEIGHT
                state.depth = max(carried, state.depth // 2, 1)
        return None

    def _reaps_unasked(self, state: _Learned, cq: CompletionQueue, carried: int) -> bool:
        """Whether the host has consumed completions no interrupt told it of (it polls its CQ:
        an interrupt only wakes it when it sleeps, and a held one would keep it asleep). Then
        nothing is held for it again until a larger hold is offered (ever more rarely)."""
        if self.unreaped(cq) >= carried:
            return False
        state.holds.missed()
        state.held_at = -1.0
        state.depth = 1
        return True

    def ran_dry(self, sq: SubmissionQueue, processed: int, attempts: int, now: float) -> int:
        if not self.polling:
            return super().ran_dry(sq, processed, attempts, now)
        # Polled: whatever was predicted asleep is moot (the host placed commands without
        # ringing); the next prediction starts from here, after the rearm.
        state: _Learned = sq.policy_state
        state.predicted = 0
        state.expired = state.offers.open = False
        state.mark = sq.entries
        return -1


#: What the controller takes as an SQ policy: a policy class, or anything that makes one.
SqPolicyFactory = Callable[[ControllerConfig, RefreshCqHead], SqEventIdx]

#: Every SQ policy ``ControllerConfig.sq_eventidx`` can name.
SQ_POLICIES: dict[SqEventIdxPolicy, type[SqEventIdx]] = {
    cls.name: cls
    for cls in (EagerSqEventIdx, PollSqEventIdx, BatchSqEventIdx, AdaptiveSqEventIdx)
    if cls.name is not None
}


@mypyc_attr(allow_interpreted_subclasses=True)
class CqEventIdx:
    """CQ EventIdx policy: EventIdx = head + :attr:`ahead` while the CQ has room (a CQ blocked
    full always asks for the next head move), republished after every completion pass if
    :attr:`on_completions`."""

    name: ClassVar[CqEventIdxPolicy]
    ahead: ClassVar[int]
    on_completions: ClassVar[bool]


@mypyc_attr(allow_interpreted_subclasses=True)
class NeverCqEventIdx(CqEventIdx):
    """The host stops at the controller's tail, behind head - 1 until a newer head is learnt:
    never crossed, no CQ doorbell in steady state."""

    name = CqEventIdxPolicy.NEVER
    ahead = -1
    on_completions = False


@mypyc_attr(allow_interpreted_subclasses=True)
class EagerCqEventIdx(CqEventIdx):
    """A doorbell on any progress of the head, republished after every pass (QEMU since
    fa5db2aa): one CQ doorbell per completion batch."""

    name = CqEventIdxPolicy.EAGER
    ahead = 0
    on_completions = True


#: Every CQ policy ``ControllerConfig.cq_eventidx`` can name.
CQ_POLICIES: dict[CqEventIdxPolicy, type[CqEventIdx]] = {
    cls.name: cls for cls in (NeverCqEventIdx, EagerCqEventIdx)
}


def overridden(policy: SqEventIdx, moment: str) -> bool:
    """Whether ``policy``'s class does something at ``moment`` (the controller skips the call
    otherwise: :meth:`SqEventIdx.rang` and :meth:`SqEventIdx.posted` run per I/O)."""
    return getattr(type(policy), moment) is not getattr(SqEventIdx, moment)
