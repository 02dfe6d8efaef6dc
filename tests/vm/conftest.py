"""What the VM tests print while pytest captures output: provisioning the guest cache and each
guest boot take minutes, and a suite that sits silent at 96 % looks hung."""

from __future__ import annotations

import sys
from collections.abc import Callable

import pytest


@pytest.fixture(scope="session")
def vm_say(pytestconfig: pytest.Config) -> Callable[[str], None]:
    """A line on the terminal now, past pytest's capture (as ``capsys.disabled()`` does)."""
    reporter = pytestconfig.pluginmanager.get_plugin("terminalreporter")
    capture = pytestconfig.pluginmanager.get_plugin("capturemanager")

    def say(line: str) -> None:
        if reporter is None or capture is None:  # -p no:terminal: stderr is all there is
            print(line, file=sys.__stderr__, flush=True)
            return
        with capture.global_and_fixture_disabled():
            reporter.ensure_newline()
            reporter.write_line(line)

    return say
