"""RDMA verbs shell. Device tests carry the `rdma` marker and skip, with the reason, where
pyverbs or a device is missing (this development machine has neither an RDMA device nor
InfiniBand support in its kernel)."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest

from mrpcd.marshal.records import REQUEST, F_START, encode_record
from mrpcd.transports import rdma

OK, REASON = rdma.available()
try:
    from mrpcd.transports.rdma import verbs as _verbs
    _verbs.load_pyverbs()
    PYVERBS = ""
except ImportError as exc:
    PYVERBS = str(exc)


def test_package_imports_without_pyverbs():
    code = "import sys, mrpcd.transports.rdma, mrpcd.transports.rdma.verbs; print('pyverbs' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_available_gives_a_reason():
    if not OK:
        assert REASON.startswith(("pyverbs not importable", "no RDMA device"))
        if PYVERBS:
            assert REASON.startswith("pyverbs not importable")
    else:
        assert REASON


@pytest.mark.skipif(bool(PYVERBS), reason=f"pyverbs not importable: {PYVERBS}")
def test_pyverbs_objects_as_the_shell_builds_them():
    """Without a device: the pyverbs constructors and enums verbs.py relies on exist."""
    pv = _verbs.load_pyverbs()
    e = pv.e
    sg = [pv.wr.SGE(0x1000, 64, 1), pv.wr.SGE(0x2000, 8, 1)]
    wr = pv.wr.SendWR(wr_id=_verbs.SEND_WR_BASE + 3, opcode=e.IBV_WR_SEND, num_sge=2, sg=sg,
                      send_flags=e.IBV_SEND_SIGNALED | e.IBV_SEND_INLINE)
    assert wr.num_sge == 2 and wr.wr_id == _verbs.SEND_WR_BASE + 3
    assert pv.wr.RecvWR(wr_id=5, num_sge=1, sg=sg[:1]).wr_id == 5
    gid = "fe80:0000:0000:0000:0202:c9ff:fe00:0001"
    gr = pv.addr.GlobalRoute(dgid=pv.addr.GID(_verbs.gid_to_str(_verbs.gid_to_bytes(gid))), sgid_index=0)
    attr = pv.qp.QPAttr(qp_state=e.IBV_QPS_RTR)
    attr.ah_attr = pv.addr.AHAttr(gr=gr, is_global=1, dlid=0, port_num=1)
    attr.path_mtu = _verbs.MTU_ENUM[1024]
    assert attr.path_mtu == e.IBV_MTU_1024 and _verbs.MTU_ENUM[4096] == e.IBV_MTU_4096
    pv.qp.QPCap(max_send_wr=8, max_recv_wr=8, max_send_sge=4, max_recv_sge=1, max_inline_data=64)
    assert (e.IBV_ACCESS_REMOTE_WRITE, e.IBV_ACCESS_REMOTE_READ) == (2, 4)


@pytest.mark.rdma
@pytest.mark.skipif(not OK, reason=REASON)
def test_loopback_rc_connection():
    """Two RdmaPeerConnections over the local device (SoftRoCE on lo works)."""
    cfg = _verbs.RdmaConfig(device=os.environ.get("MRPCD_RDMA_DEVICE"), recv_buffers=8, buf_size=4096, send_slots=8)
    fp = {"t.S": "f" * 32}
    recs = [encode_record(REQUEST, F_START, 0, 0, i, 1, 0, b"", bytes([i]) * n)
            for i, n in enumerate([0, 10, 4000, 100_000, 5, 70_000])]

    async def main():
        got_s, got_c, closed = [], [], asyncio.get_running_loop().create_future()
        conns = []

        def on_conn(conn):
            conns.append(conn)
            conn.set_handlers(lambda rs: (got_s.extend(rs), conn.send_batch([r.encode() for r in rs])),
                              lambda exc: None)

        server = await _verbs.serve("127.0.0.1", 0, lambda: fp, on_conn, config=cfg)
        port = server.sockets[0].getsockname()[1]
        c = await _verbs.connect("127.0.0.1", port, fp, config=cfg)
        c.set_handlers(got_c.extend, lambda exc: closed.set_result(exc))
        c.send_batch(recs)
        for _ in range(500):
            if len(got_c) == len(recs):
                break
            await asyncio.sleep(0.01)
        c.close("done")
        assert await asyncio.wait_for(closed, 5) is None
        server.close()
        return got_s, got_c

    got_s, got_c = asyncio.run(main())
    assert [r.encode() for r in got_s] == recs and [r.encode() for r in got_c] == recs
