"""Trace events: declared table, sinks, and free when off."""

from __future__ import annotations

import io
import json
import logging

import pytest

from host import make_rig
from vnvme.effects import TraceEvent
from vnvme.spec import registers as regs
from vnvme.spec.commands import AdminOpcode
from vnvme.trace import TRACE_EVENTS, JsonLinesSink, LogSink, format_event, matching_events


def _busy_rig_events() -> list[TraceEvent]:
    """Drive a controller through bring-up, I/O, errors and a reset with every event enabled."""
    r = make_rig(trace=("*",))
    try:
        d = r.driver
        d.write(1, 0, b"\xa5" * 4096)
        assert d.read(1, 0, 8) == b"\xa5" * 4096
        d.admin_command(0xEE, check=False)  # unknown opcode
        r.transport.mmio_write(regs.DOORBELL_BASE + 8 * 40, 4, 1)  # doorbell of a queue that doesn't exist
        d.reset_controller()
        d.read(1, 0, 1)
        d.shutdown()
        return list(r.trace.events)
    finally:
        r.close()


def test_every_emitted_event_is_declared_and_formats() -> None:
    events = _busy_rig_events()
    names = {e.name for e in events}
    # The bring-up, the shadow machinery and the error paths all left a mark.
    for expected in (
        "pci_nvme_dbbuf_config",
        "pci_nvme_update_sq_tail",
        "pci_nvme_update_sq_eventidx",
        "pci_nvme_mmio_doorbell_sq",
        "pci_nvme_mmio_start_success",
        "pci_nvme_mmio_stopped",
        "pci_nvme_mmio_shutdown_set",
    ):
        assert expected in names, expected
    assert any(n.startswith("pci_nvme_err_") for n in names)
    for event in events:
        assert event.name in TRACE_EVENTS
        line = format_event(event)
        assert line.startswith(event.name + " ")


def test_json_lines_sink_round_trips_arguments() -> None:
    stream = io.StringIO()
    sink = JsonLinesSink(stream)
    events = _busy_rig_events()
    for event in events:
        sink(event)
    lines = stream.getvalue().splitlines()
    assert len(lines) == len(events)
    for line, event in zip(lines, events, strict=True):
        record = json.loads(line)
        assert record["event"] == event.name
        spec = TRACE_EVENTS[event.name]
        assert [record[a] for a in spec.args] == list(event.args)


def test_log_sink_formats_into_logger(caplog: pytest.LogCaptureFixture) -> None:
    sink = LogSink(logging.getLogger("vnvme.test.trace"))
    with caplog.at_level(logging.INFO, logger="vnvme.test.trace"):
        sink(TraceEvent("pci_nvme_dbbuf_config", (0x1000, 0x2000)))
    assert caplog.messages == ["pci_nvme_dbbuf_config dbs_addr 0x1000 eis_addr 0x2000"]


def test_tracing_off_emits_no_trace_effects() -> None:
    r = make_rig(trace=())
    try:
        d = r.driver
        d.write(1, 0, b"\x01" * 512)
        d.read(1, 0, 1)
        d.admin_command(0xEE, check=False)
        d.reset_controller()
        assert r.trace.events == []
        assert r.controller.statistics().completions_posted > 0
    finally:
        r.close()


def test_trace_selection_by_glob() -> None:
    selected = matching_events(["pci_nvme_*dbbuf*"])
    assert "pci_nvme_dbbuf_config" in selected
    assert "pci_nvme_mmio_write" not in selected
    r = make_rig(trace=("pci_nvme_dbbuf_config",))
    try:
        assert [e.name for e in r.trace.events] == ["pci_nvme_dbbuf_config"]
        shadow, eventidx = r.driver.dbbuf_pages or (None, None)
        assert shadow is not None and eventidx is not None
        assert r.trace.events[0].args == (shadow.addr, eventidx.addr)
    finally:
        r.close()


def test_unknown_pattern_is_refused() -> None:
    with pytest.raises(ValueError, match="no trace event"):
        matching_events(["pci_nvme_no_such_event"])


def test_admin_commands_are_traced_by_name() -> None:
    r = make_rig(trace=("pci_nvme_admin_cmd",))
    try:
        ops = [e.args[2] for e in r.trace.named("pci_nvme_admin_cmd")]
        assert AdminOpcode.IDENTIFY in ops
        assert AdminOpcode.DOORBELL_BUFFER_CONFIG in ops
    finally:
        r.close()
