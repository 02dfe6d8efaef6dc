"""CQE dword 3 (CID, status, phase tag) must reach host memory in one store.

struct.pack_into zero-fills its destination before writing the value, so packing dword 3 with it
briefly shows the host a zero: phase tag 0, CID 0. A host polling the phase tag from another CPU
took that for a completion of CID 0 (split-CPU `vnvme bench` runs). The controller stores dword 3
through a native dword view instead; this test pins that path down.
"""

from __future__ import annotations

import sys

import pytest

from host import make_rig
from vnvme.controller import processing


class RecordingDwords:
    """Stands in for CompletionQueue.dwords: records every store into the ring."""

    def __init__(self, real: memoryview) -> None:
        self.real = real
        self.stores: list[tuple[int, int]] = []

    def __setitem__(self, index: int, value: int) -> None:
        self.stores.append((index, value))
        self.real[index] = value

    def release(self) -> None:
        self.real.release()


@pytest.mark.skipif(sys.byteorder != "little", reason="the single-store path is for little-endian hosts")
def test_dword3_is_one_store_of_the_final_value(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: object) -> None:
        raise AssertionError("dword 3 packed with struct.pack_into (zero-fills first)")

    monkeypatch.setattr(processing, "_CQE_TAIL_PACK", forbidden)
    r = make_rig()
    try:
        cq = r.controller.cqs[1]
        assert cq is not None and cq.dwords is not None
        recorder = RecordingDwords(cq.dwords)
        cq.dwords = recorder  # type: ignore[assignment]
        qp = r.driver.queue(1)
        for lba in range(5):
            r.driver.write(1, lba, bytes([lba]) * 512)
        assert len(recorder.stores) == 5
        for n, (index, value) in enumerate(recorder.stores):
            assert index == n * 4 + 3  # dword 3 of CQE n, nothing else
            assert value >> 16 & 1 == 1  # phase tag of the first lap, never a transient 0
        assert qp.outstanding == 0
    finally:
        r.close()
