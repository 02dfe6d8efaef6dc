"""vfio-user checks: the protocol itself (QEMU docs/interop/vfio-user.rst, version 0.1)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import select
import time
from collections.abc import Mapping

from vnvme.check.registry import Fail, Outcome, Skip, check, failed, info, passed, verdict
from vnvme.check.target import Context
from vnvme.driver.driver import NvmeDriver, NvmeTimeout, QueuePair
from vnvme.driver.vfio_user import (
    MSIX_ENABLE,
    PCI_BAR0,
    PCI_CAP_ID_MSIX,
    PCI_CAPABILITY_LIST,
    PCI_COMMAND,
    PCI_COMMAND_MASTER,
    PCI_COMMAND_MEMORY,
    VfioUserTransport,
)
from vnvme.spec.commands import AdminOpcode, Cns, Sqe
from vnvme.spec.registers import CC, CSTS, Reg
from vnvme.vfio_user import protocol as vu
from vnvme.vfio_user.client import VfioUserClient, VfioUserError
from vnvme.vfio_user.protocol import Command

SPEC = "vfio-user"
# Somewhere no test mapping lives (the transports map host memory at 4 GiB).
SPARE_DMA_ADDRESS = 0x80_0000_0000


def refusal(client: VfioUserClient, command: int, payload: bytes = b"", fds: list[int] | None = None) -> str:
    """Send a request that must be refused; describe what came back: "errno NAME" for an error
    reply, "closed" if the server hung up, "accepted" for a success reply."""
    try:
        reply = client.request(command, payload, fds)
    except VfioUserError as exc:
        return f"errno {errno.errorcode.get(exc.errno or 0, exc.errno)}"
    except (vu.Disconnected, ConnectionResetError, BrokenPipeError):
        return "closed"
    reply.close_fds()
    return "accepted"


def still_answers(client: VfioUserClient) -> bool:
    try:
        client.device_info()
    except (OSError, vu.Disconnected, vu.ProtocolError, TimeoutError):
        return False
    return True


def version_payload(major: int, minor: int, caps: Mapping[str, object]) -> bytes:
    return (
        major.to_bytes(2, "little")
        + minor.to_bytes(2, "little")
        + json.dumps({"capabilities": caps}).encode()
        + b"\0"
    )


def config_read(client: VfioUserClient, offset: int, size: int) -> int:
    return int.from_bytes(client.region_read(vu.PciRegion.CONFIG, offset, size), "little")


def msix_control_offset(client: VfioUserClient) -> int | None:
    cap = config_read(client, PCI_CAPABILITY_LIST, 1) & ~3
    for _ in range(48):
        if not cap:
            return None
        if config_read(client, cap, 1) == PCI_CAP_ID_MSIX:
            return cap + 2
        cap = config_read(client, cap + 1, 1) & ~3
    return None


@check("vfio-user.version", f"{SPEC}: VFIO_USER_VERSION")
def version(ctx: Context) -> Outcome:
    """VERSION 0.1 is answered with major 0, a minor <= 1 and capabilities as JSON"""
    client = ctx.client()
    caps = {"max_msg_fds": 16, "max_data_xfer_size": 1 << 20}
    reply = client.request(Command.VERSION, version_payload(vu.VERSION_MAJOR, vu.VERSION_MINOR, caps))
    if len(reply.payload) < 4:
        return failed(f"reply of {len(reply.payload)} bytes: no version")
    major = int.from_bytes(reply.payload[0:2], "little")
    minor = int.from_bytes(reply.payload[2:4], "little")
    text = reply.payload[4:].split(b"\0", 1)[0]
    try:
        data = json.loads(text) if text else {}
    except ValueError:
        return failed(f"version {major}.{minor}, capabilities not JSON: {text[:80]!r}")
    got = data.get("capabilities", {}) if isinstance(data, dict) else None
    if not isinstance(got, dict):
        return failed(f"version {major}.{minor}, capabilities not an object: {text[:80]!r}")
    evidence = f"version {major}.{minor}, capabilities {json.dumps(got, sort_keys=True)}"
    return verdict(major == vu.VERSION_MAJOR and minor <= vu.VERSION_MINOR, evidence)


@check("vfio-user.version-major", f"{SPEC}: VFIO_USER_VERSION (major must match)")
def version_major(ctx: Context) -> Outcome:
    """A proposed major version the server cannot support is refused, not accepted"""
    client = ctx.client()
    try:
        reply = client.request(Command.VERSION, version_payload(vu.VERSION_MAJOR + 1, 0, {}))
    except VfioUserError as exc:
        return passed(f"proposed {vu.VERSION_MAJOR + 1}.0: error reply errno {exc.errno}")
    except (vu.Disconnected, ConnectionResetError, BrokenPipeError):
        return passed(f"proposed {vu.VERSION_MAJOR + 1}.0: the server closed the connection")
    major = int.from_bytes(reply.payload[0:2], "little") if len(reply.payload) >= 2 else -1
    if major != vu.VERSION_MAJOR + 1:
        return failed(f"proposed {vu.VERSION_MAJOR + 1}.0: accepted with major {major}")
    return info(f"proposed {vu.VERSION_MAJOR + 1}.0: accepted (the server claims major {major})")


@check("vfio-user.device-info", f"{SPEC}: VFIO_USER_DEVICE_GET_INFO")
def device_info(ctx: Context) -> Outcome:
    """DEVICE_GET_INFO says PCI, with at least the 9 PCI regions and the MSI-X interrupt index"""
    client = ctx.client()
    client.negotiate()
    flags, regions, irqs = client.device_info()
    evidence = f"flags {flags:#x}, {regions} regions, {irqs} IRQ types"
    ok = bool(flags & vu.DeviceFlags.PCI) and regions >= vu.PCI_NUM_REGIONS and irqs > vu.PciIrq.MSIX
    return verdict(ok, evidence)


@check("vfio-user.region-info", f"{SPEC}: VFIO_USER_DEVICE_GET_REGION_INFO")
def region_info(ctx: Context) -> Outcome:
    """Config space and BAR0 are readable and writable regions, BAR0 large enough for doorbells"""
    client = ctx.client()
    client.negotiate()
    config = client.region_info(vu.PciRegion.CONFIG)
    bar0 = client.region_info(vu.PciRegion.BAR0)
    for info_ in (config, bar0):
        if info_.fd >= 0:
            os.close(info_.fd)
    rw = vu.RegionFlags.READ | vu.RegionFlags.WRITE
    bad_index = refusal(
        client, Command.DEVICE_GET_REGION_INFO, vu.REGION_INFO.pack(vu.REGION_INFO.size, 0, 0xFFFF, 0, 0, 0)
    )
    evidence = (
        f"config: flags {config.flags:#x} size {config.size:#x}; BAR0: flags {bar0.flags:#x} "
        f"size {bar0.size:#x} sparse {bar0.sparse}; region 65535: {bad_index}"
    )
    ok = (
        config.flags & rw == rw
        and config.size >= 256
        and bar0.flags & rw == rw
        and bar0.size >= 0x1000 + 8  # registers, then the admin queue's two doorbells
        and bad_index != "accepted"
    )
    return verdict(ok, evidence)


@check("vfio-user.irq-info", f"{SPEC}: VFIO_USER_DEVICE_GET_IRQ_INFO")
def irq_info(ctx: Context) -> Outcome:
    """MSI-X has vectors signalled through eventfds"""
    client = ctx.client()
    client.negotiate()
    parts = []
    for index in (vu.PciIrq.INTX, vu.PciIrq.MSI, vu.PciIrq.MSIX):
        flags, count = client.irq_info(index)
        parts.append(f"{index.name} count {count} flags {flags:#x}")
        if index == vu.PciIrq.MSIX:
            msix_flags, msix_count = flags, count
    return verdict(msix_count >= 1 and bool(msix_flags & vu.IrqInfoFlags.EVENTFD), "; ".join(parts))


def _identify_works(driver: NvmeDriver) -> str:
    """Identify Controller through the mapped memory; raises Fail if the data did not arrive."""
    data = driver.identify(Cns.CONTROLLER)
    if not any(data):
        raise Fail("Identify Controller completed but its 4096 bytes read all zero")
    return (
        f"VID {int.from_bytes(data[0:2], 'little'):#06x}, MN {data[24:64].decode(errors='replace').strip()!r}"
    )


@check("vfio-user.dma-map-fd", f"{SPEC}: VFIO_USER_DMA_MAP (file descriptor)")
def dma_map_fd(ctx: Context) -> Outcome:
    """Memory mapped with a file descriptor carries queues and data (Identify)"""
    driver = ctx.driver(ctx.transport(share_memory=True))
    return passed(f"probe and Identify through a memfd mapping: {_identify_works(driver)}")


@check("vfio-user.dma-map-nofd", f"{SPEC}: VFIO_USER_DMA_MAP (no fd), VFIO_USER_DMA_READ/WRITE")
def dma_map_nofd(ctx: Context) -> Outcome:
    """Memory mapped without a file descriptor is reached with DMA_READ / DMA_WRITE messages"""
    transport = ctx.transport(share_memory=False)
    try:
        evidence = _identify_works(ctx.driver(transport))
    except (NvmeTimeout, Fail) as exc:
        served = transport.client.dma_requests_served
        return failed(f"DMA_MAP without a descriptor accepted; {served} DMA requests came, then: {exc}")
    served = transport.client.dma_requests_served
    return verdict(served > 0, f"probe and Identify: {evidence}; {served} DMA requests served")


@check("vfio-user.dma-map-overlap", f"{SPEC}: VFIO_USER_DMA_MAP (overlap: EEXIST)")
def dma_map_overlap(ctx: Context) -> Outcome:
    """A mapping over an existing one fails with EEXIST"""
    client = ctx.client()
    client.negotiate()
    fd = os.memfd_create("vnvme-check", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, 1 << 16)
        client.dma_map(SPARE_DMA_ADDRESS, 1 << 16, fd)
        flags = vu.DmaFlags.READ | vu.DmaFlags.WRITE
        overlap = vu.DMA_MAP.pack(vu.DMA_MAP.size, flags, 0, SPARE_DMA_ADDRESS + 0x1000, 0x1000)
        got = refusal(client, Command.DMA_MAP, overlap, [fd])
        # The same request where nothing is mapped: it is the overlap that was refused.
        apart = SPARE_DMA_ADDRESS + (1 << 20)
        control = refusal(
            client, Command.DMA_MAP, vu.DMA_MAP.pack(vu.DMA_MAP.size, flags, 0, apart, 0x1000), [fd]
        )
    finally:
        os.close(fd)
    evidence = (
        f"map [{SPARE_DMA_ADDRESS + 0x1000:#x}, +0x1000) inside a mapping: {got}; "
        f"the same at {apart:#x}, overlapping nothing: {control}"
    )
    return verdict(got == "errno EEXIST" and control == "accepted", evidence)


@check("vfio-user.dma-unmap", f"{SPEC}: VFIO_USER_DMA_UNMAP")
def dma_unmap(ctx: Context) -> Outcome:
    """Unmap replies with the request's entry, for a mapping with a file descriptor and one
    without; part of a mapping, or one already unmapped, is refused"""
    client = ctx.client()
    client.negotiate()
    size = 1 << 16
    nofd_address = SPARE_DMA_ADDRESS + (1 << 21)
    fd = os.memfd_create("vnvme-check", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        client.dma_map(SPARE_DMA_ADDRESS, size, fd)
    finally:
        os.close(fd)
    client.dma_map(nofd_address, size, None)
    partial = refusal(
        client, Command.DMA_UNMAP, vu.DMA_UNMAP.pack(vu.DMA_UNMAP.size, 0, SPARE_DMA_ADDRESS, 0x1000)
    )
    parts = [f"part of a mapping: {partial}"]
    ok = partial != "accepted"
    for what, address in (("with fd", SPARE_DMA_ADDRESS), ("without fd", nofd_address)):
        request = vu.DMA_UNMAP.pack(vu.DMA_UNMAP.size, 0, address, size)
        reply = client.request(Command.DMA_UNMAP, request)
        echoed = reply.payload[: len(request)] == request
        again = refusal(client, Command.DMA_UNMAP, request)
        parts.append(
            f"mapping {what}: reply {'echoes the request' if echoed else reply.payload.hex() or 'empty'}, "
            f"again: {again}"
        )
        ok = ok and echoed and again != "accepted"
    return verdict(ok, "; ".join(parts))


@check("vfio-user.set-irqs", f"{SPEC}: VFIO_USER_DEVICE_SET_IRQS")
def set_irqs(ctx: Context) -> Outcome:
    """An eventfd given to MSI-X vector 0 is signalled for an admin completion, and no longer
    once disabled; a vector range beyond the count is refused"""
    transport = ctx.transport()
    driver = ctx.driver(transport)
    admin = driver.admin
    assert admin is not None
    fd = transport.eventfds[0]
    _drain(fd)
    buf = transport.memory.alloc(4096)
    try:
        admin.submit(_identify_sqe(buf.addr))
        admin.ring_sq()
        signalled = bool(select.select([fd], [], [], ctx.options.timeout)[0])
        _reap_one(admin, ctx.options.timeout)
        _drain(fd)
        # VFIO's "disable every vector of this index": ACTION_TRIGGER, DATA_NONE, count 0.
        flags = vu.IrqSetFlags.DATA_NONE | vu.IrqSetFlags.ACTION_TRIGGER
        client = transport.client
        client.request(Command.DEVICE_SET_IRQS, vu.IRQ_SET.pack(vu.IRQ_SET.size, flags, vu.PciIrq.MSIX, 0, 0))
        admin.submit(_identify_sqe(buf.addr))
        admin.ring_sq()
        _reap_one(admin, ctx.options.timeout)
        after_disable = bool(select.select([fd], [], [], 0.2)[0])
    finally:
        transport.memory.free(buf)
    _flags, count = client.irq_info(vu.PciIrq.MSIX)
    beyond = refusal(
        client,
        Command.DEVICE_SET_IRQS,
        vu.IRQ_SET.pack(vu.IRQ_SET.size, flags, vu.PciIrq.MSIX, count, 1),
    )
    evidence = (
        f"vector 0 signalled for Identify: {signalled}; after DATA_NONE count 0: "
        f"{'signalled' if after_disable else 'silent'}; vectors [{count}, +1) of {count}: {beyond}"
    )
    return verdict(signalled and not after_disable and beyond != "accepted", evidence)


def _drain(fd: int) -> None:
    with contextlib.suppress(BlockingIOError):
        os.eventfd_read(fd)


def _identify_sqe(addr: int) -> Sqe:
    return Sqe(AdminOpcode.IDENTIFY, 0, 0, 0, 0, 0, 0, addr, 0, Cns.CONTROLLER, 0, 0, 0, 0, 0)


def _reap_one(queue: QueuePair, timeout: float) -> None:
    """Poll a queue pair for a completion (no interrupt needed); Fail if none comes."""
    deadline = time.monotonic() + timeout
    while not queue.reap():
        if time.monotonic() > deadline:
            raise Fail(f"no completion on queue {queue.qid} within {timeout} s")
        time.sleep(0.001)


@check("vfio-user.region-bounds", f"{SPEC}: VFIO_USER_REGION_READ/WRITE")
def region_bounds(ctx: Context) -> Outcome:
    """Accesses past a region's end, to a region that does not exist or longer than
    max_data_xfer_size get error replies, and the connection carries on"""
    client = ctx.client()
    caps = client.negotiate()
    bar0 = client.region_info(vu.PciRegion.BAR0)
    config = client.region_info(vu.PciRegion.CONFIG)
    for info_ in (bar0, config):
        if info_.fd >= 0:
            os.close(info_.fd)
    max_xfer = caps.get("max_data_xfer_size", vu.DEFAULT_MAX_DATA_XFER_SIZE)
    max_xfer = max_xfer if isinstance(max_xfer, int) else vu.DEFAULT_MAX_DATA_XFER_SIZE
    read = Command.REGION_READ
    cases = {
        "BAR0 read across its end": (read, vu.REGION_ACCESS.pack(bar0.size - 2, 0, 4)),
        "BAR0 read at its end": (read, vu.REGION_ACCESS.pack(bar0.size, 0, 4)),
        "config read past its end": (read, vu.REGION_ACCESS.pack(config.size, vu.PciRegion.CONFIG, 4)),
        "config write past its end": (
            Command.REGION_WRITE,
            vu.REGION_ACCESS.pack(config.size, vu.PciRegion.CONFIG, 4) + b"\0" * 4,
        ),
        "read of region 200": (read, vu.REGION_ACCESS.pack(0, 200, 4)),
        f"read of {max_xfer + 4096} bytes": (
            read,
            vu.REGION_ACCESS.pack(0, vu.PciRegion.CONFIG, max_xfer + 4096),
        ),
    }
    results = {}
    for name, (command, payload) in cases.items():
        results[name] = refusal(client, command, payload)
        if results[name] == "closed":
            break
    alive = results and list(results.values())[-1] != "closed" and still_answers(client)
    evidence = (
        "; ".join(f"{k}: {v}" for k, v in results.items()) + f"; connection {'alive' if alive else 'lost'}"
    )
    ok = bool(alive) and all(v.startswith("errno") for v in results.values())
    return verdict(ok, evidence)


def _config_summary(client: VfioUserClient) -> str:
    command = config_read(client, PCI_COMMAND, 2)
    bar0 = config_read(client, PCI_BAR0, 4)
    msix = msix_control_offset(client)
    control = config_read(client, msix, 2) if msix is not None else None
    parts = [
        f"command {command:#06x} (memory {'on' if command & PCI_COMMAND_MEMORY else 'off'}, "
        f"bus master {'on' if command & PCI_COMMAND_MASTER else 'off'})",
        f"BAR0 {bar0:#010x}",
    ]
    if control is not None:
        parts.append(f"MSI-X {'enabled' if control & MSIX_ENABLE else 'disabled'}")
    return ", ".join(parts)


def _reset_device(ctx: Context) -> tuple[VfioUserTransport, NvmeDriver, str, str]:
    transport = ctx.transport()
    flags, _regions, _irqs = transport.client.device_info()
    if not flags & vu.DeviceFlags.RESET:
        raise Skip("DEVICE_GET_INFO does not offer VFIO_DEVICE_FLAGS_RESET")
    driver = ctx.driver(transport)
    before = _config_summary(transport.client)
    transport.client.reset()
    after = _config_summary(transport.client)
    return transport, driver, before, after


@check("vfio-user.device-reset", f"{SPEC}: VFIO_USER_DEVICE_RESET; NVMe 1.3 §7.3.2 (function level reset)")
def device_reset(ctx: Context) -> Outcome:
    """DEVICE_RESET resets the NVMe controller: CC.EN and CSTS.RDY read 0 afterwards"""
    transport, driver, _before, _after = _reset_device(ctx)
    # Whatever the reset did to config space, decode BAR0 again to look at the registers.
    transport._configure_function()
    cc = driver.read_reg(Reg.CC)
    csts = driver.read_reg(Reg.CSTS)
    evidence = f"after DEVICE_RESET: CC {cc:#x}, CSTS {csts:#x}"
    return verdict(CC.EN.get(cc) == 0 and CSTS.RDY.get(csts) == 0, evidence)


@check("vfio-user.device-reset-config", f"{SPEC}: VFIO_USER_DEVICE_RESET (config space: left open)")
def device_reset_config(ctx: Context) -> Outcome:
    """What DEVICE_RESET does to config space (the protocol does not say): reported"""
    _transport, _driver, before, after = _reset_device(ctx)
    return info(f"before: {before}; after: {after}")


@check("vfio-user.second-client", f"{SPEC}: Socket (a server serves one or more clients)")
def second_client(ctx: Context) -> Outcome:
    """A second client connecting does not disturb the first one's device"""
    driver = ctx.driver()
    try:
        second = VfioUserClient(ctx.target.again(), timeout=1.0)
    except OSError as exc:
        seen = f"connect refused ({exc.strerror})"
    else:
        try:
            second.negotiate()
            seen = "served (VERSION answered)"
        except TimeoutError:
            seen = "connected, VERSION not answered within 1 s"
        except (vu.Disconnected, ConnectionResetError, BrokenPipeError):
            seen = "connection closed by the server"
        except VfioUserError as exc:
            seen = f"VERSION refused (errno {exc.errno})"
        finally:
            second.close()
    try:
        _identify_works(driver)
        csts = driver.read_reg(Reg.CSTS)
    except Exception as exc:  # whatever broke, it broke for the first client: that is the finding
        return failed(f"second client: {seen}; then the first client failed: {exc}")
    ok = CSTS.RDY.get(csts) == 1
    return verdict(ok, f"second client: {seen}; first client: Identify works, CSTS {csts:#x}")


@check("vfio-user.reconnect", f"{SPEC}: Client Disconnection")
def reconnect(ctx: Context) -> Outcome:
    """After a client hangs up, a new client connects and drives the device again"""
    transport = ctx.transport()
    ctx.driver(transport)
    ctx.close()  # hang up
    ctx.target.settle_after_hangup()
    allowed = "the protocol lets a server exit when its client disconnects"
    try:
        transport = ctx.transport()  # the same server: never a new one within a check
    except (Skip, OSError, vu.Disconnected, vu.ProtocolError) as exc:
        ctx.target.settle_after_hangup(expect_exit=True)
        if ctx.target.server is not None and not ctx.target.server_alive():
            status = ctx.target.server.proc.returncode
            raise Skip(f"the server exited (status {status}) after its client hung up ({allowed})") from None
        if isinstance(exc, Skip) and ctx.target.server_cmd is None:
            raise Skip(f"{exc} ({allowed})") from None
        return failed(f"the server still runs, but a new client failed: {type(exc).__name__}: {exc}")
    cc = int.from_bytes(transport.client.region_read(vu.PciRegion.BAR0, Reg.CC, 4), "little")
    driver = ctx.driver(transport)
    return passed(
        f"reconnected; CC {cc:#x} on arrival ({'kept' if CC.EN.get(cc) else 'controller reset'}); "
        f"probe and Identify: {_identify_works(driver)}"
    )
