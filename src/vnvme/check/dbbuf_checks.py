"""Shadow doorbell checks (NVMe 1.3 Doorbell Buffer Config, admin opcode 7Ch): every one SKIPs on a
controller that does not advertise the command (Identify Controller OACS bit 8)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vnvme.bench.engine import JobSpec, run_job
from vnvme.bench.runner import placements
from vnvme.check.registry import Fail, Outcome, Skip, check, passed, verdict
from vnvme.check.target import Context
from vnvme.driver.driver import NvmeDriver, NvmeTimeout
from vnvme.driver.transport import PAGE_SIZE
from vnvme.driver.vfio_user import VfioUserTransport
from vnvme.spec.commands import AdminOpcode, Cns
from vnvme.spec.identify import Oacs
from vnvme.spec.status import Status
from vnvme.vfio_user import protocol as vu

from .nvme_checks import StatusCases, first_namespace

DBBUF = "NVMe 1.3 Doorbell Buffer Config"
DEPTHS = (1, 2, 4, 8)
#: What the reset check leaves in both pages: no tail, head or EventIdx a controller would write.
POISON = 0xA5


def require_dbbuf(driver: NvmeDriver) -> None:
    if not driver.controller_info["oacs"] & Oacs.DOORBELL_BUFFER_CONFIG:
        raise Skip(
            f"OACS {driver.controller_info['oacs']:#x}: bit 8 clear, Doorbell Buffer Config not offered"
        )


def shadow_driver(ctx: Context, transport: VfioUserTransport | None = None, **options: Any) -> NvmeDriver:
    """A driver probed with shadow doorbells on (Linux's order: config, then I/O queues)."""
    driver = ctx.driver(transport, shadow_doorbells=True, **options)
    require_dbbuf(driver)
    if not driver.dbbuf_enabled:
        raise Fail("OACS bit 8 set, but Doorbell Buffer Config with two aligned pages failed")
    return driver


def reads(driver: NvmeDriver, ios: int, depths: tuple[int, ...] = DEPTHS, qid: int = 1) -> str:
    """Closed-loop random reads at each depth; Fail naming the depth if a command never completes."""
    ns = first_namespace(driver)
    block = max(4096, ns.lba_size)
    done = 0
    for depth in depths:
        try:
            spec = JobSpec(
                bs=block, iodepth=depth, number_ios=ios, nsid=ns.nsid, iodepth_batch_submit=0, qid=qid
            )
            result = run_job(driver, spec)
        except NvmeTimeout as exc:
            raise Fail(
                f"queue {qid}, depth {depth}: {exc} ({done} reads completed at lower depths)"
            ) from None
        done += result.ios
    return (
        f"{done} reads on queue {qid} at depth{'s' if len(depths) > 1 else ''} {','.join(map(str, depths))}"
    )


@check("dbbuf.config-args", f"{DBBUF} (PRP1 / PRP2 page aligned)")
def config_args(ctx: Context) -> Outcome:
    """A shadow or EventIdx page that is not page aligned is Invalid Field; aligned pages succeed"""
    driver = ctx.driver(shadow_doorbells=False)
    require_dbbuf(driver)
    memory = driver.transport.memory
    shadow, eventidx = memory.alloc(2 * PAGE_SIZE), memory.alloc(2 * PAGE_SIZE)
    cases = StatusCases()
    try:
        for what, prp1, prp2, status in (
            ("PRP1 + 0x100", shadow.addr + 0x100, eventidx.addr, Status.INVALID_FIELD),
            ("PRP2 + 0x100", shadow.addr, eventidx.addr + 0x100, Status.INVALID_FIELD),
            ("both aligned", shadow.addr, eventidx.addr, Status.SUCCESS),
        ):
            cqe = driver.admin_command(AdminOpcode.DOORBELL_BUFFER_CONFIG, prp1=prp1, prp2=prp2, check=False)
            cases.expect(what, status, cqe)
        # The controller now shadows queues this driver rings by MMIO only: reset before the
        # pages go back to the allocator.
        driver.disable()
    finally:
        memory.free(shadow)
        memory.free(eventidx)
    return cases.outcome()


def _need_event(posted: bool, placement_name: str) -> None:
    writes = "posted" if posted else "nonposted"
    name = f"dbbuf.need-event.{writes}.{placement_name}-cpu"

    def run(ctx: Context) -> Outcome:
        try:
            (placement,) = placements([placement_name])
        except ValueError as exc:
            raise Skip(str(exc)) from None
        with ctx.placement(placement):
            driver = shadow_driver(ctx, transport=ctx.transport(posted_writes=posted))
            done = reads(driver, ctx.options.ios_per_depth)
        stats = driver.stats
        return passed(
            f"{done}, {placement.describe()}, {writes} doorbell writes: all completed; the host rang "
            f"{stats.sq_doorbell_mmio} SQ + {stats.cq_doorbell_mmio} CQ doorbells, "
            f"skipped {stats.doorbells_skipped} as need_event allowed"
        )

    run.__doc__ = (
        f"A host that rings only when need_event says so completes every read ({writes} writes, "
        f"server and client on {'one CPU' if placement_name == 'same' else 'two CPUs'})"
    )
    check(name, f"{DBBUF} (the host's need_event rule)")(run)


for _posted in (False, True):
    for _placement in ("same", "split"):
        _need_event(_posted, _placement)


@check("dbbuf.admin-queue", f"{DBBUF} (every queue, the admin queue included)")
def admin_queue(ctx: Context) -> Outcome:
    """A host that keeps the admin queue's shadow slots too (the spec allows it) gets every
    admin command completed"""
    driver = shadow_driver(ctx, admin_shadow=True)
    admin = driver.admin
    assert admin is not None
    for _ in range(64):
        driver.identify(Cns.CONTROLLER)
    stats = driver.stats
    return passed(
        f"64 Identify commands on the admin queue through its shadow slots: all completed; "
        f"{stats.admin_sq_doorbell_mmio} SQ + {stats.admin_cq_doorbell_mmio} CQ admin doorbells rung"
    )


@check("dbbuf.queues-after-config", f"{DBBUF} (queues created later use their slots)")
def queues_after_config(ctx: Context) -> Outcome:
    """I/O queues created after Doorbell Buffer Config, after I/O, and re-created work with
    their shadow slots (zeroed by the host on creation, as Linux does)"""
    driver = shadow_driver(ctx, io_queues=2)
    ios = max(50, ctx.options.ios_per_depth // 4)
    steps = [reads(driver, ios, (4,), qid=1)]
    depth = driver.io[0].depth
    if len(driver.io) >= 2:
        driver.delete_io_queue_pair(driver.queue(2))
        steps.append(reads(driver, ios, (4,), qid=1))
        driver.create_io_queue_pair(2, depth)
        steps.append("queue 2 created after that I/O: " + reads(driver, ios, (4,), qid=2))
    driver.delete_io_queue_pair(driver.queue(1))
    driver.create_io_queue_pair(1, depth)
    steps.append("queue 1 re-created: " + reads(driver, ios, (1, 4), qid=1))
    return passed("; ".join(steps))


def forgets_after(ctx: Context, reset: Callable[[VfioUserTransport, NvmeDriver], None], what: str) -> Outcome:
    """Shadow doorbells in use, then ``reset``; the old pages filled with garbage, the controller
    brought up again on MMIO doorbells only: it must neither read nor write those pages."""
    transport = ctx.transport()
    driver = shadow_driver(ctx, transport)
    before = reads(driver, 100, (1, 4))
    assert driver.dbbuf_pages is not None
    pages = driver.dbbuf_pages
    reset(transport, driver)
    for page in pages:
        page.view[:] = bytes([POISON]) * PAGE_SIZE
    driver.want_shadow = False
    driver.probe()
    after = reads(driver, 100, (1, 4))
    touched = [
        name
        for name, page in zip(("shadow", "EventIdx"), pages, strict=True)
        if bytes(page.view) != bytes([POISON]) * PAGE_SIZE
    ]
    evidence = (
        f"before {what}: {before} with shadow doorbells; after it, pages filled with {POISON:#x} "
        f"and no new config: {after}; {'pages written: ' + ', '.join(touched) if touched else 'both pages untouched'}"
    )
    return verdict(not touched, evidence)


@check("dbbuf.reset-forgets", f"{DBBUF}; NVMe 1.3 §7.3.2 (controller reset)")
def reset_forgets(ctx: Context) -> Outcome:
    """After a controller reset (CC.EN = 0) without a new Doorbell Buffer Config, the controller
    neither reads nor writes the old pages: garbage there changes nothing and stays untouched"""
    return forgets_after(ctx, lambda _transport, driver: driver.disable(), "the controller reset")


@check("dbbuf.device-reset-forgets", f"{DBBUF}; vfio-user: VFIO_USER_DEVICE_RESET")
def device_reset_forgets(ctx: Context) -> Outcome:
    """After VFIO_USER_DEVICE_RESET (a reboot's reset) the controller neither reads nor writes
    the old pages (OpenVMM's PR 4080: pages kept across a reset, then written into reused memory)"""

    def reset(transport: VfioUserTransport, driver: NvmeDriver) -> None:
        flags, _regions, _irqs = transport.client.device_info()
        if not flags & vu.DeviceFlags.RESET:
            raise Skip("DEVICE_GET_INFO does not offer VFIO_DEVICE_FLAGS_RESET")
        transport.client.reset()
        transport._configure_function()  # config space may have been reset with the function
        driver.disable()

    return forgets_after(ctx, reset, "DEVICE_RESET")
