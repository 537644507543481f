"""Policy engines against a fake context and a fake clock (no daemon, no sockets)."""
from __future__ import annotations

import textwrap

import msgpack
import pytest

from mrpcd.marshal import records as R
from mrpcd.policies import base
from mrpcd.policies.acl import Acl
from mrpcd.policies.base import (
    CallTracker, HeldRecords, Policy, PolicyConfigError, PolicyLoadError, PolicyStateError,
    load_policy_module,
)
from mrpcd.policies.ratelimit import RateLimit
from mrpcd.policies.testing import FakeClock, FakeContext

from test_policies_support import (
    MAKE, MAKE_ID, PING, UPLOAD, SCHEMA, cancel, half_close, ids, msg, reserve, response,
    start, unary,
)

PERMISSION_DENIED, RESOURCE_EXHAUSTED, UNAVAILABLE, INVALID_ARGUMENT = 7, 8, 14, 3


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def ctx(clock):
    return FakeContext(SCHEMA, clock=clock)


def roundtrip(state):
    """What the daemon does with a state: it must survive msgpack."""
    return msgpack.unpackb(msgpack.packb(state, use_bin_type=True), raw=False, strict_map_key=False)


# ---------------------------------------------------------------------------------------------
# base: config errors, tracker, loading


def test_unknown_and_bad_keys_are_named(ctx):
    with pytest.raises(PolicyConfigError, match=r"ratelimit: config key 'rate': is required"):
        RateLimit(ctx, {})
    with pytest.raises(PolicyConfigError, match=r"'rate': must be > 0"):
        RateLimit(ctx, {"rate": 0})
    with pytest.raises(PolicyConfigError, match=r"'rat': unknown key"):
        RateLimit(ctx, {"rate": 1, "rat": 2})
    with pytest.raises(PolicyConfigError, match=r"'mode': must be one of 'queue', 'drop'"):
        RateLimit(ctx, {"rate": 1, "mode": "block"})
    with pytest.raises(PolicyConfigError, match=r"per_method./nope/X.*unknown method"):
        RateLimit(ctx, {"rate": 1, "per_method": {"/nope/X": {"rate": 1}}})
    with pytest.raises(PolicyConfigError, match="config must be a mapping"):
        RateLimit(ctx, ["rate"])


def test_a_typo_d_policy_key_names_what_it_likely_meant(ctx):
    """`--config '{rat: 5}'` said only "'rate': is required", and '{rate: 5, brst: 3}' listed
    every known key: both now name the likely intended key."""
    with pytest.raises(PolicyConfigError, match=r"config key 'rate': is required \(the config has 'rat': a typo\?\)"):
        RateLimit(ctx, {"rat": 5})
    with pytest.raises(PolicyConfigError, match=r"config key 'rate': is required$"):
        RateLimit(ctx, {"mode": "drop"})
    with pytest.raises(PolicyConfigError, match=r"'brst': unknown key, did you mean 'burst'\? \(known keys: "):
        RateLimit(ctx, {"rate": 5, "brst": 3})


def test_reconfigure_bad_config_keeps_old(ctx):
    rl = RateLimit(ctx, {"rate": 5, "burst": 2})
    with pytest.raises(PolicyConfigError, match="burst"):
        rl.reconfigure({"rate": 5, "burst": 0})
    assert rl.config["burst"] == 2 and rl.describe()["config"] == {"rate": 5, "burst": 2}
    rl.reconfigure({"rate": 5, "burst": 3})
    assert rl.config["burst"] == 3


def test_call_tracker_bounded_and_forgets_on_end():
    t = CallTracker(max_calls=2)
    assert t.observe(start(1)) == start(1).method_id
    assert t.observe(msg(1)) == start(1).method_id  # non-START records learn the method
    t.observe(start(2))
    t.observe(start(3))  # evicts call 1
    assert t.observe(msg(1)) is None and t.evicted == 1
    assert t.observe(response(2)) is not None  # final response removes it
    assert t.observe(msg(2)) is None
    assert t.observe(cancel(3)) is not None and len(t) == 0


def test_load_builtins_by_short_name():
    for name in base.BUILTINS:
        cls = load_policy_module(name)
        assert issubclass(cls, Policy) and cls.name == name


def test_load_file_fresh_each_time(tmp_path, ctx):
    p = tmp_path / "mypol.py"
    src = textwrap.dedent('''
        from mrpcd.policies.base import Policy
        class Tag(Policy):
            name = "tag"
            version = "{v}"
        POLICY = Tag
    ''')
    p.write_text(src.format(v="1"))
    a = load_policy_module(str(p))
    p.write_text(src.format(v="2"))
    b = load_policy_module(str(p))
    assert (a.version, b.version) == ("1", "2") and a is not b
    assert a.__module__ != b.__module__


@pytest.mark.parametrize("body,match", [
    ("raise RuntimeError('boom at import')", r"failed to import: RuntimeError: boom at import"),
    ("def f(:\n    pass", r"failed to import: .*SyntaxError"),
    ("import no_such_module_xyz", r"failed to import: ModuleNotFoundError"),
    ("X = 1", r"has no POLICY"),
    ("POLICY = 42", r"POLICY is 42, not a subclass of mrpcd.policies.base.Policy"),
    ("class A: pass\nPOLICY = A", r"not a subclass"),
    ("from mrpcd.policies.base import Policy\nPOLICY = Policy", r"base class itself"),
])
def test_load_errors_are_clear(tmp_path, body, match):
    p = tmp_path / "bad.py"
    p.write_text(body + "\n")
    with pytest.raises(PolicyLoadError, match=match):
        load_policy_module(str(p))


def test_load_missing_and_unknown():
    with pytest.raises(PolicyLoadError, match="no such file"):
        load_policy_module("/nonexistent/pol.py")
    with pytest.raises(PolicyLoadError, match="failed to import.*built-ins: acl, admission"):
        load_policy_module("no_such_policy_module")


# ---------------------------------------------------------------------------------------------
# ratelimit


def test_ratelimit_drop_mode(ctx, clock):
    rl = RateLimit(ctx, {"rate": 10, "burst": 3, "mode": "drop"})
    out = rl.outbound([unary(i) for i in range(5)])
    assert ids(out) == [0, 1, 2]
    assert [(r.call_id, c, d) for r, c, d in ctx.errors] == [
        (3, RESOURCE_EXHAUSTED, "rate limit exceeded"), (4, RESOURCE_EXHAUSTED, "rate limit exceeded")]
    clock.advance(0.1)  # one token back
    assert ids(rl.outbound([unary(5), unary(6)])) == [5]
    clock.advance(10)  # refills to burst only
    assert ids(rl.outbound([unary(i) for i in range(10, 15)])) == [10, 11, 12]
    assert rl.counters["passed"] == 7 and rl.counters["rejected"] == 5


def test_ratelimit_non_start_records_pass_and_rejected_stream_is_dropped(ctx):
    rl = RateLimit(ctx, {"rate": 1, "burst": 1, "mode": "drop"})
    assert ids(rl.outbound([start(1), start(2)])) == [1]
    # call 1's messages pass; call 2 was rejected: its later records are dropped
    out = rl.outbound([msg(1), msg(2), half_close(2), half_close(1), response(9)])
    assert [(r.call_id, r.kind) for r in out] == [(1, R.REQUEST), (1, R.REQUEST), (9, R.RESPONSE)]


def test_ratelimit_queue_mode_releases_in_order_at_rate(ctx, clock):
    rl = RateLimit(ctx, {"rate": 10, "burst": 2, "mode": "queue", "max_queue": 3})
    out = rl.outbound([unary(i) for i in range(7)])
    assert ids(out) == [0, 1]
    assert ctx.error_codes() == [RESOURCE_EXHAUSTED, RESOURCE_EXHAUSTED]  # 5 and 6 overflow
    assert "queue full (3 calls waiting)" in ctx.errors[0][2]
    assert ids(rl.held().outbound) == [2, 3, 4]
    clock.advance(0.099)
    assert ctx.resumed_out == []
    clock.advance(0.002)
    assert ids(ctx.resumed_out) == [2]
    clock.advance(0.2)
    assert ids(ctx.resumed_out) == [2, 3, 4]
    assert clock.pending() == 0  # no timer left when the queue is empty
    # a new call while nothing waits and a token is there passes at once
    clock.advance(1)
    assert ids(rl.outbound([unary(8)])) == [8]


def test_ratelimit_queue_keeps_call_order_and_cancel_leaves_queue(ctx, clock):
    rl = RateLimit(ctx, {"rate": 1, "burst": 1})
    out = rl.outbound([start(1), start(2), msg(2), start(3), msg(1), half_close(2), cancel(3)])
    assert [(r.call_id, r.flags) for r in out] == [(1, R.F_START), (1, 0)]
    assert ids(rl.held().outbound) == [2, 2, 2]  # call 3 was cancelled while waiting: gone
    assert rl.counters["cancelled_queued"] == 1
    clock.advance(1.0)
    assert [(r.call_id, r.flags) for r in ctx.resumed_out] == [
        (2, R.F_START), (2, 0), (2, R.F_END | R.F_NO_MSG)]


def test_ratelimit_per_method_buckets(ctx, clock):
    rl = RateLimit(ctx, {"rate": 100, "burst": 100, "mode": "drop", "per_method": {PING: {"rate": 1, "burst": 1}}})
    out = rl.outbound([unary(1, PING), unary(2, PING), unary(3, MAKE), unary(4, MAKE)])
    assert ids(out) == [1, 3, 4] and ids(r for r, _, _ in ctx.errors) == [2]


def test_ratelimit_state_roundtrip_and_close(ctx, clock):
    rl = RateLimit(ctx, {"rate": 10, "burst": 5})
    rl.outbound([unary(i) for i in range(8)])  # 5 pass, 3 wait
    clock.advance(0.05)  # half a token
    state = roundtrip(rl.export_state())
    assert state["state_version"] == 1 and state["version"] == rl.version
    ctx2 = FakeContext(SCHEMA, clock=clock)
    rl2 = RateLimit.from_state(ctx2, {"rate": 10, "burst": 5}, state)
    assert ids(rl2.held().outbound) == [5, 6, 7]
    assert rl2.counters["passed"] == 5 and rl2.counters["queued"] == 3
    assert rl.close(handed_over=True) == HeldRecords([], [])
    clock.advance(0.051)
    assert ids(ctx.resumed_out) == []  # the old instance's timer is cancelled
    assert ids(ctx2.resumed_out) == [5]  # tokens carried over: 0.5 + 0.51 >= 1
    # detaching returns what is still held, so the daemon re-injects it
    held = rl2.close()
    assert ids(held.outbound) == [6, 7] and held.inbound == []
    clock.advance(5)
    assert ids(ctx2.resumed_out) == [5]


def test_ratelimit_inbound_direction(ctx):
    rl = RateLimit(ctx, {"rate": 1, "burst": 1, "mode": "drop", "direction": "inbound"})
    assert ids(rl.outbound([unary(1), unary(2)])) == [1, 2]
    assert ids(rl.inbound([unary(3), unary(4)])) == [3]


def test_ratelimit_reconfigure_raises_rate_and_releases(ctx, clock):
    rl = RateLimit(ctx, {"rate": 1, "burst": 1})
    rl.outbound([unary(i) for i in range(4)])
    rl.reconfigure({"rate": 100, "burst": 1})
    clock.advance(0.05)
    assert ids(ctx.resumed_out) == [1, 2, 3]


class RateLimitV2(RateLimit):
    """An 'upgraded' module: new version, new state shape, reads version 1 state."""

    version = "2.0"
    state_version = 2

    def save_state(self):
        st = super().save_state()
        st["v2_note"] = "new field"
        return st

    def load_state(self, state, state_version):
        super().load_state(state, state_version)
        self.upgraded_from = state_version


def test_upgrade_to_newer_version_reads_old_state(ctx, clock):
    old = RateLimit(ctx, {"rate": 2, "burst": 2})
    old.outbound([unary(i) for i in range(3)])
    new = RateLimitV2.from_state(ctx, {"rate": 2, "burst": 2}, roundtrip(old.export_state()))
    old.close(handed_over=True)
    assert new.upgraded_from == 1 and ids(new.held().outbound) == [2]
    assert new.buckets["*"].tokens == pytest.approx(0.0)
    # and a downgrade from the newer state is refused clearly
    with pytest.raises(PolicyStateError, match=r"cannot take over state_version 2"):
        RateLimit.from_state(ctx, {"rate": 2}, new.export_state())
    with pytest.raises(PolicyStateError, match=r"exported by policy 'acl'"):
        RateLimit.from_state(ctx, {"rate": 2}, {"policy": "acl", "state_version": 1})


# ---------------------------------------------------------------------------------------------
# acl


def _acl(ctx, *rules, default="allow"):
    return Acl(ctx, {"rules": list(rules), "default": default})


@pytest.mark.parametrize("rule,allowed,denied", [
    ({"field": "customer_name", "op": "eq", "value": "mallory"}, "alice", "mallory"),
    ({"field": "customer_name", "op": "ne", "value": "alice"}, "alice", "bob"),
    ({"field": "customer_name", "op": "in", "value": ["eve", "mallory"]}, "alice", "eve"),
    ({"field": "customer_name", "op": "not_in", "value": ["alice", "bob"]}, "bob", "eve"),
    ({"field": "customer_name", "op": "regex", "value": "m.*y"}, "mallory2", "mallory"),
    ({"field": "customer_name", "op": "prefix", "value": "bad-"}, "good-x", "bad-x"),
])
def test_acl_string_ops(ctx, rule, allowed, denied):
    acl = _acl(ctx, {"method": MAKE, **rule, "details": "no"})
    out = acl.outbound([unary(1, payload=reserve(allowed)), unary(2, payload=reserve(denied))])
    assert ids(out) == [1]
    assert [(r.call_id, c, d) for r, c, d in ctx.errors] == [(2, PERMISSION_DENIED, "no")]


def test_acl_numeric_enum_bool_bytes_nested(ctx):
    acl = _acl(
        ctx,
        {"method": MAKE, "field": "nights", "op": "gt", "value": 14, "details": "too long"},
        {"method": MAKE, "field": "rate", "op": "lt", "value": 10, "details": "too cheap"},
        {"method": MAKE, "field": "tier", "op": "eq", "value": "GOLD", "action": "allow"},
        {"method": MAKE, "field": "guest.age", "op": "lt", "value": 18, "details": "minor"},
        {"method": MAKE, "field": "token", "op": "prefix", "value": "x", "details": "bytes"},
        {"method": MAKE, "field": "vip", "op": "eq", "value": False, "details": "not vip"},
    )
    calls = [
        unary(1, payload=reserve(nights=20)),
        unary(2, payload=reserve(rate=5)),
        unary(3, payload=reserve(tier=1)),                    # gold: allowed before vip check
        unary(4, payload=reserve(vip=True, guest=["kid", 10])),
        unary(5, payload=reserve(vip=True, token=b"xyz")),
        unary(6, payload=reserve(vip=True)),                  # no guest (unset): matches nothing
        unary(7, payload=reserve()),
    ]
    out = acl.outbound(calls)
    assert ids(out) == [3, 6]
    assert [d for _, _, d in ctx.errors] == ["too long", "too cheap", "minor", "bytes", "not vip"]


def test_acl_default_deny_and_method_rules(ctx):
    acl = _acl(ctx, {"method": PING, "action": "allow"}, default="deny")
    out = acl.outbound([unary(1, PING, payload=msgpack.packb([True])), unary(2)])
    assert ids(out) == [1] and ctx.errors[0][1:] == (PERMISSION_DENIED, "denied by ACL default")
    acl2 = Acl(FakeContext(SCHEMA), {"rules": [{"method": "*", "details": "closed"}]})
    assert acl2.outbound([unary(3)]) == []


def test_acl_checks_every_stream_message_and_cancels_downstream(ctx):
    acl = _acl(ctx, {"method": UPLOAD, "field": "customer_name", "op": "eq", "value": "mallory"})
    out = acl.outbound([start(1, no_msg=True), msg(1, reserve("alice")), msg(1, reserve("mallory")),
                        msg(1, reserve("alice")), half_close(1)])
    # START and the first message went on; the bad one turns into a CANCEL; the rest is dropped
    assert [(r.kind, r.flags) for r in out] == [
        (R.REQUEST, R.F_START | R.F_NO_MSG), (R.REQUEST, 0), (R.CANCEL, R.F_END | R.F_NO_MSG)]
    assert ctx.error_codes() == [PERMISSION_DENIED]
    # a stream denied at START drops its later records
    out = acl.outbound([start(2, payload=reserve("mallory")), msg(2), half_close(2), unary(3)])
    assert ids(out) == [3]


def test_acl_malformed_payload_fails_closed(ctx):
    acl = _acl(ctx, {"method": MAKE, "field": "customer_name", "op": "eq", "value": "x"})
    out = acl.outbound([unary(1, payload=b"\x93\x01\x02"), unary(2, payload=msgpack.packb([1, 2]))])
    assert out == [] and ctx.error_codes() == [INVALID_ARGUMENT, INVALID_ARGUMENT]


def test_acl_decides_on_the_private_copy(ctx):
    """The record's payload is bytes (a copy): mutating the buffer it came from changes nothing."""
    acl = _acl(ctx, {"method": MAKE, "field": "customer_name", "op": "eq", "value": "mallory"})
    shared = bytearray(R.encode_record(R.REQUEST, R.F_START | R.F_END, 0, 1, 1, MAKE_ID, 0, b"", reserve("alice")))
    r = R.parse_record(shared)
    shared[-len(reserve("alice")):] = reserve("malor")[: len(reserve("alice"))]  # the app rewrites its ring
    out = acl.outbound([r])
    assert ids(out) == [1] and out[0].payload == reserve("alice")


@pytest.mark.parametrize("rule,match", [
    ({"method": "/hotel.Reservation/Nope"}, r"rules\[0\].method': unknown method '/hotel.Reservation/Nope'"),
    ({"method": MAKE, "field": "nope", "op": "eq", "value": 1}, r"has no field 'nope'"),
    ({"method": MAKE, "field": "guest.nope", "op": "eq", "value": 1}, r"hotel.Guest has no field 'nope'"),
    ({"method": MAKE, "field": "tags", "op": "eq", "value": "a"}, r"repeated field"),
    ({"method": MAKE, "field": "customer_name", "op": "lt", "value": 1}, r"needs a numeric field"),
    ({"method": MAKE, "field": "nights", "op": "regex", "value": "1"}, r"needs a string field"),
    ({"method": MAKE, "field": "nights", "op": "eq", "value": "x"}, r"does not fit field 'nights'"),
    ({"method": MAKE, "field": "tier", "op": "eq", "value": "PLATINUM"}, r"not a value of enum hotel.Tier"),
    ({"method": MAKE, "field": "customer_name", "op": "regex", "value": "("}, r"bad regular expression"),
    ({"method": MAKE, "field": "customer_name", "op": "like", "value": "x"}, r"must be one of"),
    ({"method": MAKE, "field": "customer_name", "op": "in", "value": "x"}, r"needs a list"),
    ({"method": MAKE, "field": "customer_name", "op": "eq", "value": "x", "action": "block"}, r"'rules\[0\].action'"),
    ({"method": "*", "field": "customer_name", "op": "eq", "value": "x"}, r"method '\*' cannot test a field"),
])
def test_acl_rule_validation(ctx, rule, match):
    with pytest.raises(PolicyConfigError, match=match):
        Acl(ctx, {"rules": [rule]})


def test_acl_state_roundtrip_keeps_stream_tracking(ctx):
    acl = _acl(ctx, {"method": UPLOAD, "field": "customer_name", "op": "eq", "value": "mallory"})
    acl.outbound([start(1, no_msg=True)])
    acl2 = Acl.from_state(ctx, acl.raw_config, roundtrip(acl.export_state()))
    out = acl2.outbound([msg(1, reserve("mallory"))])
    assert [r.kind for r in out] == [R.CANCEL] and ctx.error_codes() == [PERMISSION_DENIED]


def test_acl_refuses_new_streams_beyond_max_streams_instead_of_forgetting_old_ones(ctx):
    """A forgotten stream's later messages would go on unchecked: the ACL never evicts one to
    make room. Stream 1 stays checked while streams 3 and 4 are refused, and an ended stream
    frees its place."""
    acl = _acl(ctx, {"method": UPLOAD, "field": "customer_name", "op": "eq", "value": "mallory"})
    acl.reconfigure({**acl.raw_config, "max_streams": 2})
    out = acl.outbound([start(1, no_msg=True), start(2, no_msg=True), start(3, no_msg=True),
                        msg(3, reserve("mallory")), half_close(3), unary(9, payload=reserve("alice"))])
    assert [(r.call_id, r.kind) for r in out] == [(1, R.REQUEST), (2, R.REQUEST), (9, R.REQUEST)]
    assert [(r.call_id, c) for r, c, _ in ctx.errors] == [(3, RESOURCE_EXHAUSTED)]
    assert "max_streams" in ctx.errors[0][2]
    # stream 1 is still checked: its bad message is denied and cancelled downstream
    out = acl.outbound([msg(1, reserve("mallory"))])
    assert [r.kind for r in out] == [R.CANCEL] and ctx.error_codes()[-1] == PERMISSION_DENIED
    # stream 1 ended (denied): its place is free again
    out = acl.outbound([start(4, no_msg=True), msg(4, reserve("alice"))])
    assert [r.call_id for r in out] == [4, 4]
    assert acl.describe()["streams"] == 2
    with pytest.raises(PolicyConfigError, match="max_streams"):
        acl.validate_config({**acl.raw_config, "max_streams": 0})
