"""RDMA connection setup over the TCP side channel (sans-I/O)."""
from __future__ import annotations

import msgpack
import pytest

from mrpcd.marshal.records import HELLO, FrameDecoder, encode_record
from mrpcd.transports.handshake import DONE, FAILED, HandshakeError, make_goaway
from mrpcd.transports.rdma.setup import (
    PARAMS_METHOD, ConnParams, RdmaSetup, SetupError, decode_params, encode_params,
)

FP = {"helloworld.Greeter": "a" * 32}


def params(qpn=0x123, **kw):
    d = dict(qpn=qpn, psn=0x456, gid=bytes(range(16)), lid=0, mtu=1024, recv_buffers=64, buf_size=8192, max_msg=1 << 30)
    d.update(kw)
    return ConnParams(**d)


def recs(datas):
    dec = FrameDecoder()
    return [r for d in datas for r in dec.feed(d)]


def test_params_round_trip_and_validation():
    p = params()
    assert decode_params(recs([encode_params(p)])[0]) == p
    for kw, msg in [({"qpn": 1 << 24}, "qpn"), ({"gid": b"x"}, "gid"), ({"mtu": 1000}, "mtu"),
                    ({"recv_buffers": 2}, "recv_buffers"), ({"buf_size": 10}, "buf_size"), ({"lid": -1}, "lid")]:
        with pytest.raises(SetupError, match=msg):
            decode_params(recs([encode_params(params(**kw))])[0])
    bad = encode_record(HELLO, 0, 0, 0, 0, PARAMS_METHOD, 0, b"", msgpack.packb({"qpn": 1}))
    with pytest.raises(SetupError, match="expected keys"):
        decode_params(recs([bad])[0])
    with pytest.raises(SetupError, match="transport: rdma"):
        decode_params(recs([make_goaway("x")])[0])


def run(client_fp=FP, server_fp=FP):
    c, s = RdmaSetup("client", client_fp), RdmaSetup("server", server_fp)
    to_s = recs(c.start(params(1)))
    assert s.start() == []
    to_c = []
    for r in to_s:
        to_c += s.receive(r)
        if s.state == FAILED:
            break
    if s.state == FAILED:
        for r in recs(to_c):
            c.receive(r)
        return c, s
    assert s.need_local and s.peer_params.qpn == 1
    to_c += s.local_ready(params(2))
    for r in recs(to_c):
        c.receive(r)
    assert c.peer_params.qpn == 2 and c.peer_hello["role"] == "server"
    for r in recs(c.client_rts()):
        s.receive(r)
    return c, s


def test_full_exchange():
    c, s = run()
    assert c.state == s.state == DONE
    assert s.peer_hello["services"] == FP


def test_schema_mismatch_is_reported_to_both():
    c, s = run(server_fp={"helloworld.Greeter": "b" * 32})
    assert s.state == FAILED and "schema mismatch" in str(s.error)
    assert c.state == FAILED and c.error.remote and "schema mismatch" in str(c.error)


def test_peer_without_rdma_is_refused_with_reason():
    s = RdmaSetup("server", FP)
    s.start()
    from mrpcd.transports.handshake import make_hello
    s.receive(recs([make_hello("client", FP)])[0])
    out = s.receive(recs([make_hello("client", FP)])[0])   # a TCP-only peer sends data next
    assert s.state == FAILED and "transport: rdma" in str(s.error)
    assert recs(out)[0].kind == 17  # GOAWAY with the reason


def test_wrong_order_and_misuse():
    s = RdmaSetup("server", FP)
    with pytest.raises(RuntimeError):
        s.local_ready(params())
    c = RdmaSetup("client", FP)
    with pytest.raises(ValueError):
        c.start()
    with pytest.raises(RuntimeError):
        c.client_rts()
    assert isinstance(SetupError("x"), HandshakeError)


def test_evolved_versions_carry_their_closures_and_get_plans():
    """An RDMA connection between two compatible versions of a service is accepted, and each
    side's peer_hello keeps the other's closure (the session builds its plans from it)."""
    from test_evolve import SVC, V1, V2, schema

    from mrpcd.marshal.evolve import plan_services
    from mrpcd.transports.handshake import service_set

    a, b = schema(V1), schema(V2)
    c, s = run(service_set(a), service_set(b))
    assert c.state == s.state == DONE
    assert set(s.peer_hello["closures"]) == set(c.peer_hello["closures"]) == {SVC}
    assert plan_services(s.peer_hello["closures"], b) and plan_services(c.peer_hello["closures"], a)
    bad = {k: list(v) for k, v in V1.items()}
    bad["t.Inner"] = [("x", 1, "string", None, "single", None, None)]
    c, s = run(service_set(a), service_set(schema(bad)))
    assert s.state == FAILED and "incompatible changes" in str(s.error) and c.error.remote
