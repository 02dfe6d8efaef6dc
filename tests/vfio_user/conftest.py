"""Fixtures for the vfio-user protocol tests: a raw peer, before and after VERSION."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from vfio_user.peer import Peer


@pytest.fixture
def peer() -> Iterator[Peer]:
    """Connected, nothing sent yet."""
    p = Peer()
    try:
        yield p
    finally:
        p.close()


@pytest.fixture
def ready(peer: Peer) -> Peer:
    """VERSION done (every other command is accepted), BARs decoded, bus mastering on."""
    peer.version()
    peer.enable_decoding()
    return peer
