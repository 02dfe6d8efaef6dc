"""Many queues: fewer MSI-X vectors than queues."""

from __future__ import annotations

from host import make_rig
from vnvme.controller.config import ControllerConfig
from vnvme.controller.namespace import Namespace, RamBackend


def test_fewer_vectors_than_queues_the_queues_share_them() -> None:
    """4 MSI-X vectors, 9 I/O queues: the CQs take vectors 1-3 in turn (0 is the admin queue's)
    and every queue completes I/O by its interrupt."""
    r = make_rig(
        namespaces=[Namespace(1, RamBackend(1 << 20), 512)],
        config=ControllerConfig(interrupt_vectors=4),
        io_queues=9,
        io_queue_depth=8,
        trace=(),
    )
    try:
        assert [qp.vector for qp in r.driver.io] == [1, 2, 3] * 3
        for qp in r.driver.io:
            r.driver.write(1, qp.qid, bytes([qp.qid]) * 512, qid=qp.qid)
        for qp in r.driver.io:
            assert r.driver.read(1, qp.qid, 1, qid=(qp.qid % 9) + 1) == bytes([qp.qid]) * 512
        assert set(r.transport.fired) <= {0, 1, 2, 3}
    finally:
        r.close()
    one = make_rig(config=ControllerConfig(interrupt_vectors=1), io_queues=3, io_queue_depth=8, trace=())
    try:
        assert [qp.vector for qp in one.driver.io] == [0, 0, 0]  # one vector: everyone's
        assert one.driver.read(1, 0, 1, qid=3) == bytes(512)
    finally:
        one.close()
