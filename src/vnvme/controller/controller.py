"""The NVMe controller core: registers, queues, shadow doorbells, command dispatch.

Sans-I/O (the h11 / aioquic shape): the caller feeds register accesses and owns the guest memory
object; every public method returns the :mod:`effects <vnvme.effects>` it produced. No sockets,
threads or clocks in here: time (``now``) and work budgets are arguments.

Threading model: one controller is used from one thread at a time.

Processing model. A BAR doorbell write marks its SQ pending; :meth:`Controller.process` runs
pending SQs round robin, posts completions, then signals interrupts (one per CQ pass, after
coalescing). With shadow doorbells an SQ's tail is read from the shadow page (every slot access
goes through :class:`~vnvme.controller.doorbells.Doorbells`), and an idle SQ publishes EventIdx
as its policy says (:mod:`vnvme.controller.eventidx`, told of the moments named there).
A polling edge calls :meth:`Controller.poll` instead of waiting for doorbells, and
:meth:`Controller.rearm` before it stops polling.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Final

from vnvme.controller import admin, faults
from vnvme.controller.admin_state import AsyncEvents, ErrorLog, FeatureState, SmartCounters
from vnvme.controller.config import ControllerConfig
from vnvme.controller.doorbell_writes import DoorbellWrites
from vnvme.controller.doorbells import Doorbells
from vnvme.controller.eventidx import CQ_POLICIES, SQ_POLICIES, SqPolicyFactory
from vnvme.controller.hostcheck import HostChecker
from vnvme.controller.interrupts import Interrupts
from vnvme.controller.namespace import Namespace
from vnvme.controller.processing import CommandProcessing
from vnvme.controller.queues import CompletionQueue, QueueStatistics, SubmissionQueue
from vnvme.controller.registers import RegisterFile, RegisterRefused, capabilities
from vnvme.controller.state import TRANSITIONS, Event, Step, cc_events, enable_refusal
from vnvme.controller.statistics import ControllerStatistics
from vnvme.effects import ControllerFatal, Effect, TraceEvent
from vnvme.memory import GuestMemory, GuestMemoryError
from vnvme.spec import registers as regs
from vnvme.spec.commands import (
    CQE_SIZE,
    SQE_SIZE,
    AsyncEventSmartInfo,
    AsyncEventType,
    LogPageId,
    opcode_name,
)
from vnvme.spec.dbbuf import cq_slot, rearm_event_idx, sq_slot
from vnvme.spec.log_pages import CriticalWarning
from vnvme.spec.registers import AQA, CC, CSTS, Reg
from vnvme.trace import TRACE_EVENTS, matching_events

log = logging.getLogger("vnvme.controller")

_DEFAULT_BUDGET: Final = 4096
# The Critical Warning bits this controller can raise, and their SMART / Health event info (§5.2).
_WARNING_EVENTS: Final = {
    CriticalWarning.TEMPERATURE: AsyncEventSmartInfo.TEMPERATURE_THRESHOLD,
    CriticalWarning.RELIABILITY_DEGRADED: AsyncEventSmartInfo.RELIABILITY,
}


class Controller(DoorbellWrites, CommandProcessing):
    """An NVMe 1.3 controller with Doorbell Buffer Config, over a :class:`GuestMemory`."""

    def __init__(
        self,
        memory: GuestMemory,
        namespaces: Sequence[Namespace] = (),
        config: ControllerConfig | None = None,
        *,
        sq_policy: SqPolicyFactory | None = None,
    ) -> None:
        """``sq_policy``: an SQ EventIdx policy class (or factory) instead of the one
        ``config.sq_eventidx`` names."""
        cfg = self.config = config or ControllerConfig()
        self.memory = memory
        self._take_namespaces(namespaces)
        self.cap = capabilities(cfg)
        self.dstrd = cfg.dstrd
        self.bar0_size = regs.bar0_size(cfg.max_io_queues + 1, cfg.dstrd)
        self._doorbell_end = regs.DOORBELL_BASE + 2 * (cfg.max_io_queues + 1) * (4 << cfg.dstrd)
        self.cc = 0
        self.csts = 0
        self.page_size = 4096
        self.sqs: list[SubmissionQueue | None] = [None] * (cfg.max_io_queues + 1)
        self.cqs: list[CompletionQueue | None] = [None] * (cfg.max_io_queues + 1)
        self.doorbells = Doorbells()
        self._pending: dict[int, SubmissionQueue] = {}
        self._cut_turn = None
        self._scan_from: int = 0  # the sqid the last scan of every SQ began at (_scan_order)
        self._touched_cqs: dict[int, CompletionQueue] = {}
        self._effects: list[Effect] = []
        self.tracing = False
        self._trace_set: frozenset[str] = frozenset()
        self._memory_generation = memory.generation
        # Set while some queue's or doorbell page's memory is not mapped (see _sync_memory),
        # with the Doorbell Buffer Config to restore once it is back.
        self._memory_missing: str | None = None
        self._dbbuf_wanted: tuple[bool, int, int, int] = (False, 0, 0, 0)
        self._fatal = False
        self._set_policies(sq_policy or SQ_POLICIES[cfg.sq_eventidx], CQ_POLICIES[cfg.cq_eventidx])
        # SQs whose policy asked for a deadline (sq.deadline), by sqid.
        self._deadlines: dict[int, SubmissionQueue] = {}
        # CQs whose interrupt the SQ policy holds (a polled host still placing its batch), by
        # cqid, with the deadline it is held to.
        self._held_irqs: dict[int, tuple[CompletionQueue, float]] = {}
        self.now = 0.0
        self._reset_counters()
        self.features: FeatureState = FeatureState(self)
        self.async_events = AsyncEvents(self)
        self.interrupts = Interrupts(self.features, self._effects, self)
        self.registers = self._register_file()
        self._steps: dict[Step, Callable[..., str | None]] = {
            Step.START: self._start,
            Step.FORGET: self._forget,
            Step.FLUSH: self._flush,
            Step.HALT: self._halt,
        }
        self._command_state(cfg)
        #: The host-protocol checker (``config.check_host``), or None: then nothing watches.
        self.host_check: HostChecker | None = None
        if cfg.check_host:
            self.host_check = HostChecker()
            self.host_check.install(self)

    def _take_namespaces(self, namespaces: Sequence[Namespace]) -> None:
        self.namespaces: dict[int, Namespace] = {}
        for ns in namespaces:
            if ns.nsid in self.namespaces:
                raise ValueError(f"duplicate NSID {ns.nsid}")
            ns.assign_identifiers(self.config.serial)
            self.namespaces[ns.nsid] = ns
        # Identify NN: the largest NSID; the inactive ones in between read as zeroes.
        self.nn = max(self.namespaces, default=0)

    def _reset_counters(self) -> None:
        """Statistics counters (the hot path increments them as plain attributes)."""
        self._db_sq_admin = 0
        self._db_sq_io = 0
        self._db_cq_admin = 0
        self._db_cq_io = 0
        self._invalid_doorbells = 0
        self._rearms_won = 0
        self._rearms_lost = 0
        self._completions = 0
        self._error_completions = 0
        self._dbbuf_configs = 0
        self._internal_errors = 0
        self._mapped_doorbells = 0
        self._enable_count = 0
        self._admin_counts = [0] * 256
        self._io_counts = [0] * 256

    def _register_file(self) -> RegisterFile:
        """BAR0's registers: the live ones read from their owners, the side effects of a write."""
        interrupts = self.interrupts
        return RegisterFile(
            live={
                Reg.CAP: lambda: self.cap,
                Reg.CC: lambda: self.cc,
                Reg.CSTS: lambda: self.csts,
                Reg.INTMS: lambda: interrupts.intms,
                Reg.INTMC: lambda: interrupts.intms,
            },
            actions={
                Reg.CC: self._write_cc,
                Reg.CSTS: self._write_csts,
                Reg.INTMS: interrupts.mask,
                Reg.INTMC: interrupts.unmask,
                Reg.NSSR: self._write_nssr,
            },
            enabled=lambda: self.enabled,
            tracer=self,
        )

    def _command_state(self, cfg: ControllerConfig) -> None:
        """What the command handlers keep and use: error log, SMART, handler tables, limits."""
        self.error_log = ErrorLog(cfg.error_log_entries)
        self.smart = SmartCounters()
        self.io_handlers = faults.io_handlers(self.namespaces.values())
        # Completions a fault hook delays (faults.py): deadlines for next_deadline() / process().
        self.delayed = faults.DelayedCompletions()
        self.admin_handlers = admin.admin_handlers(self)
        self.identify_controller = admin.identify_controller_data(self)
        # MDTS is in units of CAP.MPSMIN pages.
        self.max_transfer = (1 << cfg.mdts) * regs.page_size(cfg.mps_min) if cfg.mdts else 1 << 62

    # Section: public interface

    def mmio_read(self, offset: int, size: int) -> int:
        """Read ``size`` (1, 2, 4 or 8) bytes of BAR0 at ``offset``; a refused read is traced
        and reads as zero."""
        try:
            return self.registers.read(offset, size)
        except RegisterRefused as refused:
            self._trace_refused(refused)
            return 0

    def bar0_read(self, offset: int, size: int) -> int:
        """:meth:`mmio_read` for an edge: a refused read raises :class:`RegisterRefused`."""
        return self.registers.read(offset, size)

    def mmio_write(self, offset: int, size: int, value: int) -> list[Effect]:
        """Write ``size`` bytes of BAR0 at ``offset``. Never raises for guest input: a refused
        write is traced and ignored. With no error reply to give, a 32-bit write at any
        doorbell offset is taken as a doorbell (one off the stride: an invalid doorbell)."""
        try:
            return self.bar0_write(offset, size, value, any_doorbell=True)
        except RegisterRefused as refused:
            self._trace_refused(refused)
            return self._take_effects()

    def bar0_write(self, offset: int, size: int, value: int, *, any_doorbell: bool = False) -> list[Effect]:
        """:meth:`mmio_write` for an edge: a write its peer must be told of (the rules are
        :mod:`vnvme.controller.registers`') raises :class:`RegisterRefused`."""
        try:
            if size == 4 and offset >= regs.DOORBELL_BASE and (any_doorbell or not offset & 3):
                self._doorbell_write(offset, value & 0xFFFFFFFF)  # the common case
            else:
                self.registers.write(offset, size, value)
        except RegisterRefused:
            raise
        except Exception as exc:  # an emulator bug must not take the process down
            log.exception("mmio_write(%#x, %d, %#x) failed", offset, size, value)
            self._internal_errors += 1
            self._set_fatal(f"internal error in register write: {exc!r}")
        return self._take_effects() if self._effects else []  # a doorbell mostly leaves none

    def _trace_refused(self, refused: RegisterRefused) -> None:
        for report in refused.reports:
            self.registers.ignored(*report)

    def process(self, now: float | None = None, budget: int | None = None) -> list[Effect]:
        """Run pending submission queues (up to ``budget`` commands) and deliver interrupts."""
        if now is not None:
            self.now = now
        if not (
            self._pending
            or self._touched_cqs
            or self._deadlines
            or self._held_irqs
            or self.interrupts.coalescing
            or self.delayed.held
            or self.memory.generation != self._memory_generation
        ):
            return self._take_effects()  # nothing pending, nothing to deliver or expire
        if self._memory_missing:
            if self.memory.generation != self._memory_generation:
                self._sync_memory()  # the memory may be back
            if self._memory_missing:
                if self._pending or self.delayed.held:
                    self._memory_gone()
                # Otherwise wait for the memory to come back; interrupts owed stay owed, and so
                # do an EventIdx policy's deadlines (its own, not a use by the host).
                return self._take_effects()
        if self._deadlines:
            self._expire_deadlines()
        try:
            if self.delayed.held:
                self.delayed.post_due(self, self.now)
            self._run_pending(_DEFAULT_BUDGET if budget is None else budget)
            self._deliver_interrupts()
        except Exception as exc:
            log.exception("process() failed")
            self._internal_errors += 1
            self._set_fatal(f"internal error: {exc!r}")
        return self._take_effects()

    def poll(self, now: float | None = None, budget: int | None = None) -> list[Effect]:
        """Polling mode: look at every shadow SQ tail, as if each had been rung, then process."""
        if self.doorbells.active and self._ready():
            for sq in self._scan_order():
                if sq is not None and sq.shadow_mode and not sq.blocked:
                    self._pending[sq.sqid] = sq
        return self.process(now, budget)

    def rearm(self) -> bool:
        """Before a polling edge sleeps: publish EAGER EventIdx values and re-check every shadow
        tail. True if nothing is pending (safe to sleep until a doorbell), False if work arrived."""
        if not self.doorbells.active or not self._ready():
            return not self._pending
        self.sq_policy.stop_polling()
        for cqid, (cq, _) in self._held_irqs.items():
            self._held_irqs[cqid] = (cq, self.now)  # due: the next pass raises them
        quiet = True
        for sq in self.sqs:
            if sq is None or not sq.shadow_mode:
                continue
            tail = self._probe_sq(sq, rearm_event_idx(sq.head, 0, sq.size))
            if tail is not None and tail != sq.head:
                sq.rearms_lost += 1
                self._rearms_lost += 1
                self._pending[sq.sqid] = sq
                quiet = False
            else:
                sq.rearms_won += 1
                self._rearms_won += 1
        return quiet and not self._pending

    @property
    def polling(self) -> bool:
        """Idle shadow SQs ask for no doorbell (from reset, or start_polling, until rearm)."""
        return self.sq_policy.polling

    def start_polling(self) -> None:
        """The edge is about to poll: idle SQs ask for no doorbell until it rearms."""
        self.sq_policy.start_polling()

    @property
    def has_pending_work(self) -> bool:
        return bool(self._pending) and not self._fatal

    def next_deadline(self) -> float | None:
        """When :meth:`process` must run next at the latest (``now`` units), if ever: coalesced
        interrupts, an SQ EventIdx policy's deadline, a completion a fault hook delays."""
        if (
            not self._deadlines
            and not self._held_irqs
            and not self.features.interrupt_coalescing
            and not self.delayed.held
        ):
            return None  # asked before every wait: the common answer without the work
        if self._memory_missing:
            return self.delayed.earliest()  # nothing else can run before the memory is back
        deadline = self._next_deadline()
        held = self.delayed.earliest()
        return held if deadline is None or (held is not None and held < deadline) else deadline

    def _next_deadline(self) -> float | None:
        deadline: float | None = None
        if self._deadlines:
            deadline = min(
                (sq.deadline for sq in self._deadlines.values() if sq.deadline is not None), default=None
            )
        if self._held_irqs:
            held = min(until for _, until in self._held_irqs.values())
            deadline = held if deadline is None else min(deadline, held)
        coalescing = self.interrupts.next_deadline()
        if coalescing is None:
            return deadline
        return coalescing if deadline is None else min(deadline, coalescing)

    def take_effects(self) -> list[Effect]:
        """Effects emitted outside the calls that return them (e.g. traces from reads)."""
        return self._take_effects()

    def reset(self) -> list[Effect]:
        """A reset from outside (bus reset, vfio-user DEVICE_RESET): CC cleared, queues gone."""
        self._fire(Event.RESET)
        return self._take_effects()

    @property
    def has_volatile_cache(self) -> bool:
        """Identify VWC: some namespace's backend completes writes before they are durable."""
        return any(ns.backend.volatile_cache for ns in self.namespaces.values())

    def close(self) -> None:
        """Flush and close every backend; a failing one does not stop the others."""
        failure: BaseException | None = None
        for ns in self.namespaces.values():
            try:
                ns.backend.flush()
            except BaseException as exc:
                failure = failure or exc
            finally:
                ns.backend.close()
        if failure is not None:
            raise failure

    def enable_trace(self, patterns: Iterable[str]) -> frozenset[str]:
        """Turn on the trace events matching ``patterns`` (globs); returns the selection."""
        self._trace_set = matching_events(patterns)
        self.tracing = bool(self._trace_set)
        return self._trace_set

    def disable_trace(self) -> None:
        self._trace_set = frozenset()
        self.tracing = False

    def statistics(self) -> ControllerStatistics:
        checker = self.host_check
        host_totals = checker.totals() if checker is not None else (0, 0)
        return ControllerStatistics(
            register_reads=self.registers.reads,
            register_writes=self.registers.writes,
            doorbell_sq_admin=self._db_sq_admin,
            doorbell_sq_io=self._db_sq_io,
            doorbell_cq_admin=self._db_cq_admin,
            doorbell_cq_io=self._db_cq_io,
            invalid_doorbell_writes=self._invalid_doorbells,
            shadow_reads=self.doorbells.reads,
            eventidx_writes=self.doorbells.eventidx_writes,
            rearms_won=self._rearms_won,
            rearms_lost=self._rearms_lost,
            interrupts_raised=self.interrupts.raised,
            completions_posted=self._completions,
            error_completions=self._error_completions,
            dbbuf_configs=self._dbbuf_configs,
            shadow_catchups=self.doorbells.catchups,
            internal_errors=self._internal_errors,
            mapped_doorbell_updates=self._mapped_doorbells,
            predictions_met=self.sq_policy.met,
            predictions_missed=self.sq_policy.missed,
            batch_offers=self.sq_policy.offers,
            host_check_errors=host_totals[0],
            host_check_warnings=host_totals[1],
            host_check=checker.counts() if checker is not None else {},
            admin_commands={opcode_name(op, True): n for op, n in enumerate(self._admin_counts) if n},
            io_commands={opcode_name(op, False): n for op, n in enumerate(self._io_counts) if n},
        )

    def queue_statistics(self) -> list[QueueStatistics]:
        sqs = []
        for sq in self.sqs:
            if sq is not None:
                met, missed, offers = self.sq_policy.counters(sq)
                sqs.append(
                    dataclasses.replace(
                        sq.statistics(), predictions_met=met, predictions_missed=missed, batch_offers=offers
                    )
                )
        cqs = [
            dataclasses.replace(cq.statistics(), interrupts=self.interrupts.by_vector.get(cq.vector, 0))
            for cq in self.cqs
            if cq is not None
        ]
        return sqs + cqs

    def critical_warning(self) -> int:
        """SMART Critical Warning bits (§5.14.1.2): temperature against the thresholds, and NVM
        subsystem reliability degraded (bit 2) once a media error has occurred: an emulated
        medium has no wear to weigh them against, so every injected or backend media error
        counts as significant. It stays set, as the SMART counters do, across resets."""
        temperature = self.config.temperature_kelvin
        features = self.features
        too_hot = temperature >= features.over_temperature
        too_cold = features.under_temperature and temperature <= features.under_temperature
        warning = CriticalWarning.TEMPERATURE if too_hot or too_cold else CriticalWarning(0)
        if self.smart.media_errors:
            warning |= CriticalWarning.RELIABILITY_DEGRADED
        return int(warning)

    def report_critical_warnings(self, bits: int) -> None:
        """Raise a SMART / Health Status event for each warning of ``bits`` that holds now and
        that Asynchronous Event Configuration enables (bits 7:0 match the Critical Warning bits,
        §5.21.1.11); the event's log page is SMART / Health, and AsyncEvents masks the type
        until the host reads it (§5.2)."""
        enabled = self.critical_warning() & bits & self.features.async_event_configuration
        for warning, info in _WARNING_EVENTS.items():
            if enabled & warning:
                self.async_events.enqueue(AsyncEventType.SMART_HEALTH_STATUS, info, LogPageId.SMART_HEALTH)

    def count_media_error(self) -> None:
        """A command met a media error (SMART Media and Data Integrity Errors, §5.14.1.2). The
        first one degrades reliability: a SMART / Health event, info NVM subsystem reliability
        (§5.2), if enabled. Not an Error status event: those are for errors not tied to a command
        (invalid doorbells, internal errors, §5.2), and the command's completion and Error
        Information entry already report this one (§5.14.1.1)."""
        self.smart.media_errors += 1
        if self.smart.media_errors == 1:
            self.report_critical_warnings(CriticalWarning.RELIABILITY_DEGRADED)

    @property
    def aqa(self) -> int:
        return self.registers.value(Reg.AQA)

    @property
    def asq(self) -> int:
        return self.registers.value(Reg.ASQ)

    @property
    def acq(self) -> int:
        return self.registers.value(Reg.ACQ)

    @property
    def intms(self) -> int:
        """INTMS / INTMC as the host reads them."""
        return self.interrupts.intms

    @property
    def enabled(self) -> bool:
        return bool(CC.EN.get(self.cc))

    @property
    def fatal(self) -> bool:
        return self._fatal

    @property
    def doorbell_end(self) -> int:
        """BAR0 offset just past the last doorbell register."""
        return self._doorbell_end

    @property
    def completions(self) -> int:
        """Completions posted so far (cheap: an edge checks it after every pass for progress)."""
        return self._completions

    @property
    def enable_count(self) -> int:
        """How many times CC.EN went 0 -> 1 (an edge learns of resets it did not see)."""
        return self._enable_count

    # Section: registers

    def _write_csts(self, value: int) -> None:
        # CSTS.NSSRO is RW1C (§3.1.6); every other CSTS bit is read-only.
        if CSTS.NSSRO.get(value):
            self.csts = CSTS.NSSRO.put(self.csts, 0)

    def _write_nssr(self, value: int) -> None:
        if value == regs.NSSR_MAGIC and self.config.nssr_supported:
            self._fire(Event.SUBSYSTEM_RESET)

    def _write_cc(self, value: int) -> None:
        old = self.cc
        self.cc = value
        for event, args in cc_events(old, value):
            self._fire(event, *args)

    def _fire(self, event: Event, *args: int | str) -> None:
        """Make ``event``'s transition (controller/state.py's table)."""
        transition = TRANSITIONS[event]
        if transition.announce and self.tracing:
            self.trace(transition.announce)
        if transition.via is not None:
            self._fire(transition.via)
        step = transition.step
        failure = None if step is None else self._steps[step](*args)
        if failure is not None:
            if transition.failure_trace and self.tracing:
                self.trace(transition.failure_trace, failure)
            self._fire(Event.FATAL, transition.failure + failure)
            return
        csts = 0 if transition.clear else self.csts
        for bits, value in transition.csts:
            csts = bits.put(csts, value)
        self.csts = csts
        if transition.clear:
            self.cc = 0
        if transition.registers:
            self.registers.reset()
        if transition.trace and self.tracing:
            self.trace(transition.trace, *args)
        if transition.report:
            self._effects.append(ControllerFatal(str(args[0])))

    def _start(self) -> str | None:
        """Step START: validate CC and the admin queue registers, create the admin queues."""
        self._enable_count += 1
        aqa, asq, acq = self.aqa, self.asq, self.acq
        reason = enable_refusal(self.cc, self.cap, aqa, asq, acq)
        if reason is not None:
            return reason
        asqs, acqs = AQA.ASQS.get(aqa) + 1, AQA.ACQS.get(aqa) + 1
        try:
            self._sync_memory()
            cq_view, cq_remote = self.memory.window(acq, acqs * CQE_SIZE, write=True)
            sq_view, sq_remote = self.memory.window(asq, asqs * SQE_SIZE)
        except GuestMemoryError as exc:
            return f"admin queue memory: {exc}"
        self.page_size = regs.page_size(CC.MPS.get(self.cc))
        cq = CompletionQueue(0, acqs, acq, cq_view, cq_slot(0, self.dstrd), ien=True, vector=0)
        sq = SubmissionQueue(0, cq, asqs, asq, sq_view, sq_slot(0, self.dstrd))
        cq.remote, sq.remote = cq_remote, sq_remote
        cq.sqs[0] = sq
        self.cqs[0], self.sqs[0] = cq, sq
        return None

    def _forget(self) -> None:
        """Step FORGET (a controller reset, §7.3.2): every queue, shadow doorbell buffers,
        features, deadlines and held completions go."""
        self._drop_queues()
        self._deadlines.clear()
        self._held_irqs.clear()
        self.delayed.clear()
        self.interrupts.reset()
        self.features.reset()
        self.async_events.reset()
        self._fatal = False
        self.sq_policy.reset()

    def _flush(self, shn: int) -> str | None:
        """Step FLUSH (CC.SHN set): make all written data durable."""
        try:
            for ns in self.namespaces.values():
                ns.backend.flush()
        except OSError as exc:
            return str(exc)
        return None

    def _halt(self, reason: str) -> None:
        """Step HALT (controller fatal status): nothing more is processed or posted until a
        reset, so held completions go now (their deadlines would be due forever)."""
        self._fatal = True
        self._pending.clear()
        self._held_irqs.clear()
        self.delayed.clear()

    def _ready(self) -> bool:
        return bool(self.csts & 1) and not self._fatal

    # Section: helpers

    def _set_fatal(self, reason: str) -> None:
        self._fire(Event.FATAL, reason)

    def trace(self, name: str, *args: int | str) -> None:
        """Emit trace event ``name`` if it is on (callers test ``tracing`` first)."""
        if name in self._trace_set:
            self._effects.append(TraceEvent(name, args))

    def _take_effects(self) -> list[Effect]:
        # One list for the controller's life: the interrupts append to it too.
        effects = self._effects
        if not effects:
            return []
        taken = effects[:]
        effects.clear()
        return taken

    def trace_event_known(self, name: str) -> bool:
        return name in TRACE_EVENTS
