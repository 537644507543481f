"""Sans-I/O tests of the daemon-to-daemon handshake (transports/handshake.py): no sockets."""
import msgpack
import pytest

from mrpcd.marshal.records import GOAWAY, HELLO, REQUEST, encode_record, parse_record
from mrpcd.transports.handshake import (
    DONE,
    FAILED,
    PROTOCOL_VERSION,
    WAITING,
    Handshake,
    HandshakeError,
    check_hello,
    make_goaway,
    make_hello,
    parse_goaway,
)

FP_A = "ab12" + "0" * 28
FP_B = "cd34" + "1" * 28
GREETER = "helloworld.Greeter"


def rec(data: bytes):
    return parse_record(data)


def hello_with(payload) -> object:
    raw = payload if isinstance(payload, bytes) else msgpack.packb(payload, use_bin_type=True)
    return rec(encode_record(HELLO, 0, 0, 0, 0, 0, 0, b"", raw))


def test_protocol_version():
    assert PROTOCOL_VERSION == 1


def test_make_hello_payload():
    r = rec(make_hello("client", {GREETER: FP_A}))
    assert r.kind == HELLO
    assert msgpack.unpackb(r.payload) == {"version": 1, "role": "client", "services": {GREETER: FP_A}}
    with pytest.raises(ValueError):
        make_hello("peer", {})


def test_check_hello_ok_and_disjoint_services():
    got = check_hello({GREETER: FP_A, "x.Other": FP_B}, rec(make_hello("server", {GREETER: FP_A, "y.Third": FP_B})))
    assert got == {"version": 1, "role": "server", "services": {GREETER: FP_A, "y.Third": FP_B}}
    # no service in common is fine: nothing to compare
    assert check_hello({}, rec(make_hello("client", {GREETER: FP_A})))["role"] == "client"


def test_check_hello_version_mismatch():
    with pytest.raises(HandshakeError) as ei:
        check_hello({}, rec(make_hello("client", {}, version=2)))
    assert str(ei.value) == "protocol version 2 from peer, this daemon speaks 1"
    assert not ei.value.remote


def test_check_hello_fingerprint_mismatch():
    with pytest.raises(HandshakeError) as ei:
        check_hello({GREETER: FP_A, "a.Same": FP_B}, rec(make_hello("client", {GREETER: FP_B, "a.Same": FP_B})))
    assert str(ei.value) == (
        "schema mismatch for service helloworld.Greeter: local fingerprint ab1200000000…, "
        "peer cd3411111111…; regenerate stubs from the same .proto"
    )


def test_check_hello_short_fingerprints_shown_whole():
    with pytest.raises(HandshakeError, match="local fingerprint aa, peer bb;"):
        check_hello({GREETER: "aa"}, rec(make_hello("client", {GREETER: "bb"})))


def test_check_hello_not_hello():
    r = rec(encode_record(REQUEST, 1, 0, 0, 7, 1, 0, b"", b"\x90"))
    with pytest.raises(HandshakeError, match="expected a HELLO record to start the connection, got a record of kind 1"):
        check_hello({}, r)


def test_check_hello_goaway_is_remote_refusal():
    with pytest.raises(HandshakeError) as ei:
        check_hello({}, rec(make_goaway("go away")))
    assert str(ei.value) == "go away" and ei.value.remote


@pytest.mark.parametrize(
    "payload, text",
    [
        (b"\xc1", "not valid msgpack"),
        (b"\x92\x01", "not valid msgpack"),  # truncated array
        (b"\x01\x02", "not valid msgpack"),  # trailing data
        ([1, "client", {}], "expected a map, got list"),
        ({"role": "client", "services": {}}, "'version' must be an int"),
        ({"version": "1", "role": "client", "services": {}}, "'version' must be an int"),
        ({"version": True, "role": "client", "services": {}}, "'version' must be an int"),
        ({"version": 1, "role": "boss", "services": {}}, "'role' must be 'client' or 'server'"),
        ({"version": 1, "role": "client"}, "'services' must be a map"),
        ({"version": 1, "role": "client", "services": [GREETER]}, "'services' must be a map"),
        ({"version": 1, "role": "client", "services": {GREETER: 5}}, "is not a (name, fingerprint) string pair"),
        ({"version": 1, "role": "client", "services": {GREETER: "x" * 1000}}, "string pair"),
    ],
)
def test_check_hello_malformed(payload, text):
    with pytest.raises(HandshakeError) as ei:
        check_hello({GREETER: FP_A}, hello_with(payload))
    assert text in str(ei.value)
    assert str(ei.value).startswith("malformed HELLO payload")


def test_check_hello_expect_role():
    with pytest.raises(HandshakeError, match="peer says it is a client, expected a server"):
        check_hello({}, rec(make_hello("client", {})), expect_role="server")


def test_goaway_roundtrip():
    r = rec(make_goaway("schema mismatch for service x"))
    assert r.kind == GOAWAY and r.payload == b""
    assert parse_goaway(r) == "schema mismatch for service x"
    assert parse_goaway(rec(make_goaway())) == ""
    assert parse_goaway(rec(make_goaway(None))) == ""
    assert parse_goaway(rec(make_goaway("ü" * 10))) == "ü" * 10


def test_goaway_with_malformed_meta_does_not_raise():
    r = rec(encode_record(GOAWAY, 0, 0, 0, 0, 0, 0, b"\x91\xc1", b""))
    assert "malformed" in parse_goaway(r)


def _pair(client_services, server_services, *, client_version=None, server_version=None):
    c = Handshake("client", client_services, version=client_version)
    s = Handshake("server", server_services, version=server_version)
    assert c.state == s.state == WAITING
    return c, s


def test_state_machine_success():
    c, s = _pair({GREETER: FP_A}, {GREETER: FP_A, "x.Y": FP_B})
    assert s.start() == []
    (hello,) = c.start()
    assert c.start() == []  # only once
    (reply,) = s.receive(rec(hello))
    assert s.state == DONE and s.peer_hello["role"] == "client" and s.peer_hello["services"] == {GREETER: FP_A}
    assert rec(reply).kind == HELLO
    assert c.receive(rec(reply)) == []
    assert c.state == DONE and c.peer_hello["services"] == {GREETER: FP_A, "x.Y": FP_B}
    assert c.error is None and s.error is None
    with pytest.raises(RuntimeError):
        c.receive(rec(reply))


def _refused(c, s):
    (hello,) = c.start()
    (goaway,) = s.receive(rec(hello))
    assert s.state == FAILED and s.goaway_sent and rec(goaway).kind == GOAWAY
    assert parse_goaway(rec(goaway)) == str(s.error)
    assert c.receive(rec(goaway)) == []  # nothing to answer a refusal with
    assert c.state == FAILED and not c.goaway_sent
    assert c.error.remote and str(c.error) == str(s.error)
    return str(s.error)


def test_state_machine_version_mismatch_both_sides():
    c, s = _pair({}, {}, client_version=2)
    assert _refused(c, s) == "protocol version 2 from peer, this daemon speaks 1"


def test_state_machine_fingerprint_mismatch_both_sides():
    c, s = _pair({GREETER: FP_B}, {GREETER: FP_A})
    text = _refused(c, s)
    assert text.startswith("schema mismatch for service helloworld.Greeter: local fingerprint ab12")
    assert "peer cd34" in text and text.endswith("regenerate stubs from the same .proto")


def test_state_machine_client_checks_server_too():
    # a server that (wrongly) accepts: the client still refuses, and says why
    c = Handshake("client", {GREETER: FP_A})
    c.start()
    (goaway,) = c.receive(rec(make_hello("server", {GREETER: FP_B})))
    assert c.state == FAILED and c.goaway_sent and not c.error.remote
    assert "local fingerprint ab12" in str(c.error)
    assert parse_goaway(rec(goaway)) == str(c.error)


def test_state_machine_client_rejects_newer_server():
    c = Handshake("client", {})
    c.start()
    (goaway,) = c.receive(rec(make_hello("server", {}, version=2)))
    assert str(c.error) == "protocol version 2 from peer, this daemon speaks 1"
    assert parse_goaway(rec(goaway)) == str(c.error)


def test_state_machine_wrong_roles():
    s = Handshake("server", {})
    (goaway,) = s.receive(rec(make_hello("server", {})))
    assert s.state == FAILED and "expected a client" in parse_goaway(rec(goaway))


def test_state_machine_non_hello_first():
    s = Handshake("server", {})
    (goaway,) = s.receive(rec(encode_record(REQUEST, 1, 0, 0, 1, 1, 0, b"", b"")))
    assert s.state == FAILED and "expected a HELLO record" in parse_goaway(rec(goaway))


def test_state_machine_fail_from_outside():
    s = Handshake("server", {})
    (goaway,) = s.fail("no handshake within 10 s")
    assert s.state == FAILED and str(s.error) == "no handshake within 10 s"
    assert parse_goaway(rec(goaway)) == "no handshake within 10 s"
    assert s.fail("again") == []


def test_client_must_start_first():
    c = Handshake("client", {})
    with pytest.raises(RuntimeError):
        c.receive(rec(make_hello("server", {})))
    with pytest.raises(ValueError):
        Handshake("peer", {})


# -- schema evolution: closures in HELLO (marshal/evolve.py) ----------------------------------
def _greeter(req_fields, methods=(("SayHello", "helloworld.HelloRequest", "helloworld.HelloReply", False, False),)):
    from mrpcd.marshal.schema import Schema

    return Schema.from_dict({
        "messages": [["helloworld.HelloRequest", req_fields],
                     ["helloworld.HelloReply", [["message", 1, ["string", None], "single", None, None]]]],
        "services": [[GREETER, [list(m) for m in methods]]],
    })


V1_REQ = [["name", 1, ["string", None], "single", None, None]]
V2_REQ = [["who", 1, ["string", None], "single", None, None], ["age", 2, ["int32", None], "single", None, None]]
BAD_REQ = [["name", 1, ["int32", None], "single", None, None]]  # (bytes would be compatible)


def test_compatible_closures_accept_and_report_peer_closure():
    from mrpcd.transports.handshake import service_set

    v1, v2 = service_set(_greeter(V1_REQ)), service_set(_greeter(V2_REQ))
    assert v1[GREETER] != v2[GREETER]
    raw = msgpack.unpackb(rec(make_hello("client", v1)).payload)
    assert raw["closures"][GREETER]["service"][0] == GREETER
    got = check_hello(v2, rec(make_hello("client", v1)))
    assert got["closures"] == {GREETER: msgpack.unpackb(msgpack.packb(v1.closures[GREETER]))}
    # equal fingerprints: nothing to transcode, no closures in the result
    assert "closures" not in check_hello(v1, rec(make_hello("client", v1)))


def test_incompatible_closure_names_the_field():
    from mrpcd.transports.handshake import service_set

    with pytest.raises(HandshakeError) as ei:
        check_hello(service_set(_greeter(V1_REQ)), rec(make_hello("client", service_set(_greeter(BAD_REQ)))))
    text = str(ei.value)
    assert "schema mismatch for service helloworld.Greeter: incompatible changes" in text
    assert "helloworld.HelloRequest field 1: peer has 'int32 name', this side has 'string name'" in text


def test_peer_without_closures_is_checked_by_fingerprint():
    from mrpcd.transports.handshake import service_set

    v2 = service_set(_greeter(V2_REQ))
    v1 = service_set(_greeter(V1_REQ))
    with pytest.raises(HandshakeError, match="local fingerprint"):
        check_hello(v2, rec(make_hello("client", dict(v1))))  # an old peer: fingerprints only
    with pytest.raises(HandshakeError, match="local fingerprint"):
        check_hello(dict(v2), rec(make_hello("client", v1)))  # we have no closure to compare


@pytest.mark.parametrize("closures, text", [
    ([1], "'closures' must be a map"),
    ({GREETER: {"service": 3}}, "the closure of service"),
    ({GREETER: {"service": [GREETER, []], "messages": [], "enums": []}}, "does not match the fingerprint"),
])
def test_malformed_closures(closures, text):
    with pytest.raises(HandshakeError, match=text):
        check_hello({GREETER: FP_A}, hello_with({"version": 1, "role": "client", "services": {GREETER: FP_B},
                                                 "closures": closures}),
                    local_closures={GREETER: _greeter(V1_REQ).closure(GREETER)})


def test_handshake_state_machine_evolves():
    from mrpcd.transports.handshake import service_set

    v1, v2 = service_set(_greeter(V1_REQ)), service_set(_greeter(V2_REQ))
    client, server = Handshake("client", v1), Handshake("server", v2)
    (reply,) = server.receive(rec(client.start()[0]))
    assert server.state == DONE and GREETER in server.peer_hello["closures"]
    assert client.receive(rec(reply)) == [] and client.state == DONE
    assert GREETER in client.peer_hello["closures"]
    bad = Handshake("server", service_set(_greeter(BAD_REQ)))
    (goaway,) = bad.receive(rec(Handshake("client", v1).start()[0]))
    assert bad.state == FAILED and "field 1" in parse_goaway(rec(goaway))
