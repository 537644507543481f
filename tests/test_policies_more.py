"""QoS, fault injection, metrics, admission control and VTC against a fake clock."""
from __future__ import annotations

import msgpack
import pytest

from mrpcd.marshal import records as R
from mrpcd.policies.admission import Admission
from mrpcd.policies.base import INVALID_ARGUMENT, PolicyConfigError
from mrpcd.policies.fault import Fault
from mrpcd.policies.metrics import Metrics
from mrpcd.policies.qos import GLOBALS_KEY, QosPolicy
from mrpcd.policies.testing import FakeClock, FakeContext
from mrpcd.policies.vtc import Vtc

from test_policies_support import (
    GEN, MAKE, PING, SCHEMA, cancel, ids, msg, rec, response, start, unary,
)


def roundtrip(state):
    return msgpack.unpackb(msgpack.packb(state, use_bin_type=True), raw=False, strict_map_key=False)


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def ctx(clock):
    return FakeContext(SCHEMA, clock=clock)


# ---------------------------------------------------------------------------------------------
# qos


def _apps(clock, n):
    shared: dict = {}
    return [FakeContext(SCHEMA, clock=clock, app_id=i + 1, app_name=f"app{i + 1}", globals=shared) for i in range(n)]


def test_qos_passes_within_budget_then_priority_first(clock):
    lo_ctx, hi_ctx = _apps(clock, 2)
    lo = QosPolicy(lo_ctx, {"priority": 0, "per_tick": 3, "tick_s": 0.01})
    hi = QosPolicy(hi_ctx, {"priority": 10})
    assert lo.scheduler is hi.scheduler
    assert ids(lo.outbound([unary(i) for i in range(5)])) == [0, 1, 2]  # budget of this tick
    assert hi.outbound([unary(100 + i) for i in range(4)]) == []
    clock.advance(0.01)  # next tick: 3 calls, the high-priority app first
    assert ids(hi_ctx.resumed_out) == [100, 101, 102] and lo_ctx.resumed_out == []
    clock.advance(0.01)
    assert ids(hi_ctx.resumed_out) == [100, 101, 102, 103] and ids(lo_ctx.resumed_out) == [3, 4]
    assert clock.pending() == 0


def test_qos_weights_share_equal_priority(clock):
    a_ctx, b_ctx = _apps(clock, 2)
    a = QosPolicy(a_ctx, {"weight": 3, "per_tick": 4, "tick_s": 1})
    b = QosPolicy(b_ctx, {"weight": 1})
    a.outbound([unary(i) for i in range(4)])  # uses the first tick's budget
    a.outbound([unary(i) for i in range(10, 30)])
    b.outbound([unary(i) for i in range(100, 120)])
    clock.advance(1)
    assert len(a_ctx.resumed_out) == 3 and len(b_ctx.resumed_out) == 1
    clock.advance(2)
    assert len(a_ctx.resumed_out) == 9 and len(b_ctx.resumed_out) == 3


def test_qos_keeps_app_order_and_close_returns_queue(clock):
    a_ctx, b_ctx = _apps(clock, 2)
    a = QosPolicy(a_ctx, {"per_tick": 1, "tick_s": 1})
    b = QosPolicy(b_ctx, {})
    assert ids(a.outbound([start(1), start(2), msg(1), msg(2)])) == [1]
    assert ids(a.held().outbound) == [2, 1, 2]  # msg(1) may not overtake the waiting call 2
    held = a.close()
    assert ids(held.outbound) == [2, 1, 2]
    assert a_ctx.globals[GLOBALS_KEY]["default"].members == {2: b}
    # the remaining member drives the scheduler alone (this tick's budget went to call 1)
    assert b.outbound([unary(7), unary(8)]) == []
    clock.advance(1)
    assert ids(b_ctx.resumed_out) == [7]
    clock.advance(1)
    assert ids(b_ctx.resumed_out) == [7, 8] and clock.pending() == 0


def test_qos_upgrade_keeps_shared_queue(clock):
    (a_ctx,) = _apps(clock, 1)
    a = QosPolicy(a_ctx, {"per_tick": 1, "tick_s": 1})
    a.outbound([unary(1), unary(2), unary(3)])
    a2 = QosPolicy.from_state(a_ctx, {"per_tick": 1, "tick_s": 1}, roundtrip(a.export_state()))
    a.close(handed_over=True)
    assert ids(a2.held().outbound) == [2, 3]
    clock.advance(2)
    assert ids(a_ctx.resumed_out) == [2, 3]


# ---------------------------------------------------------------------------------------------
# fault


def test_fault_abort_with_seed_is_deterministic(clock):
    def run():
        c = FakeContext(SCHEMA, clock=clock)
        f = Fault(c, {"abort": {"probability": 0.5, "code": "UNAVAILABLE", "details": "chaos"}, "seed": 7})
        out = f.outbound([unary(i) for i in range(40)])
        return ids(out), [r.call_id for r, _, _ in c.errors], c
    out1, err1, c = run()
    out2, err2, _ = run()
    assert out1 == out2 and err1 == err2
    assert 8 < len(err1) < 32 and sorted(out1 + err1) == list(range(40))
    assert {code for _, code, _ in c.errors} == {14} and c.errors[0][2] == "chaos"


def test_fault_delay_holds_and_releases(ctx, clock):
    f = Fault(ctx, {"delay": {"probability": 1.0, "ms": 50}, "methods": [MAKE]})
    out = f.outbound([unary(1), unary(2, PING, payload=msgpack.packb([True])), start(3, MAKE), msg(3)])
    assert ids(out) == [2]
    clock.advance(0.049)
    assert ctx.resumed_out == []
    clock.advance(0.001)
    assert [(r.call_id, r.flags) for r in ctx.resumed_out] == [(1, R.F_START | R.F_END), (3, R.F_START), (3, 0)]


def test_fault_delay_then_abort_and_cancel_while_delayed(ctx, clock):
    f = Fault(ctx, {"delay": {"probability": 1, "ms": 10}, "abort": {"probability": 1, "code": 13}})
    f.outbound([unary(1), start(2), cancel(2)])
    clock.advance(0.01)
    assert ctx.resumed_out == [] and [(r.call_id, c) for r, c, _ in ctx.errors] == [(1, 13)]
    assert f.counters["cancelled_delayed"] == 1


def test_fault_state_and_close(ctx, clock):
    f = Fault(ctx, {"delay": {"probability": 1, "ms": 100}})
    f.outbound([unary(1), unary(2)])
    clock.advance(0.05)
    f2 = Fault.from_state(ctx, {"delay": {"probability": 1, "ms": 100}}, roundtrip(f.export_state()))
    f.close(handed_over=True)
    clock.advance(0.049)  # the remaining delay is kept
    assert ids(ctx.resumed_out) == []
    clock.advance(0.002)
    assert ids(ctx.resumed_out) == [1, 2]
    f2.outbound([unary(3)])
    assert ids(f2.close().outbound) == [3]
    with pytest.raises(PolicyConfigError, match="at least one of 'delay' and 'abort'"):
        Fault(ctx, {})
    with pytest.raises(PolicyConfigError, match=r"'abort.probability': must be <= 1"):
        Fault(ctx, {"abort": {"probability": 2}})
    with pytest.raises(PolicyConfigError, match=r"'abort.code': must be a grpc status code"):
        Fault(ctx, {"abort": {"probability": 1, "code": "SOMETIMES"}})


# ---------------------------------------------------------------------------------------------
# metrics


def test_metrics_counts_and_histogram(ctx, clock):
    m = Metrics(ctx, {"buckets": [0.01, 0.1, 1], "log_calls": True})
    m.outbound([unary(1), unary(2), unary(3), start(4, MAKE)])
    clock.advance(0.005)
    m.inbound([response(1)])
    clock.advance(0.045)
    m.inbound([response(2, status=5)])
    clock.advance(2)
    m.inbound([response(3)])
    m.outbound([cancel(4)])
    # a server-side call: START inbound, response outbound
    m.inbound([unary(9, PING, payload=msgpack.packb([True]))])
    m.outbound([response(9)])
    snap = m.snapshot()
    lab = {"grpc_type": "unary", "grpc_service": "hotel.Reservation", "grpc_method": "MakeReservation"}
    assert snap["counters"]["mrpcd_client_started_total"] == [{"labels": lab, "value": 4}]
    handled = {s["labels"]["grpc_code"]: s["value"] for s in snap["counters"]["mrpcd_client_handled_total"]}
    assert handled == {"OK": 2, "NotFound": 1, "Canceled": 1}
    (h,) = snap["histograms"]["mrpcd_client_handling_seconds"]
    assert h["buckets"] == [[0.01, 1], [0.1, 2], [1.0, 2], ["+Inf", 4]] and h["count"] == 4
    assert h["sum"] == pytest.approx(0.005 + 0.05 + 2.05 + 2.05)
    (srv,) = snap["counters"]["mrpcd_server_handled_total"]
    assert srv["labels"]["grpc_method"] == "Ping" and srv["labels"]["grpc_code"] == "OK"
    assert snap["in_flight"] == 0
    assert len([x for x in ctx.logs if x[1] == "rpc completed"]) == 5
    text = m.prometheus_text({"app": "app"})
    assert 'mrpcd_client_handled_total{app="app",grpc_type="unary",grpc_service="hotel.Reservation",grpc_method="MakeReservation",grpc_code="OK"} 2' in text
    assert 'le="+Inf"} 4' in text
    m2 = Metrics.from_state(ctx, {"buckets": [0.01, 0.1, 1]}, roundtrip(m.export_state()))
    assert m2.snapshot() == snap


def test_metrics_streaming_call_is_timed_to_its_final_response(ctx, clock):
    m = Metrics(ctx, {})
    m.outbound([unary(1, GEN, payload=msgpack.packb(["u", "p", 3]))])
    m.inbound([response(1, end=False)])
    clock.advance(0.3)
    m.inbound([response(1, end=False, first=False), response(1, first=False)])
    (h,) = m.snapshot()["histograms"]["mrpcd_client_handling_seconds"]
    assert h["labels"]["grpc_type"] == "server_stream" and h["sum"] == pytest.approx(0.3)


# ---------------------------------------------------------------------------------------------
# admission


def _outcomes(pol, start_id, n, status):
    calls = [unary(i) for i in range(start_id, start_id + n)]
    out = pol.outbound(calls)
    pol.inbound([response(r.call_id, status=status) for r in out])
    return len(out)


def test_admission_rejects_when_success_rate_drops_and_recovers(ctx, clock):
    adm = Admission(ctx, {"window_s": 10, "sr_threshold": 0.9, "min_requests": 20, "seed": 1,
                          "max_rejection_probability": 0.9})
    assert _outcomes(adm, 0, 50, 0) == 50  # all good
    assert _outcomes(adm, 100, 100, 14) == 100  # failures do not reject yet while mixed in
    p, sr = adm.rejection_probability()
    assert sr == pytest.approx(1 / 3) and p > 0.5
    ctx.errors.clear()
    passed = _outcomes(adm, 1000, 100, 14)
    assert passed < 60 and len(ctx.errors) == 100 - passed
    assert ctx.errors[0][1] == 14 and ctx.errors[0][2].startswith("admission control: success rate ")
    assert "below 90.0%" in ctx.errors[0][2]
    # the failures age out of the window and successes return
    clock.advance(11)
    assert adm.rejection_probability()[0] == 0.0
    assert _outcomes(adm, 5000, 50, 0) == 50


def test_admission_min_requests_and_non_failure_codes(ctx):
    adm = Admission(ctx, {"min_requests": 10, "seed": 1})
    _outcomes(adm, 0, 9, 14)
    assert adm.rejection_probability()[0] == 0.0  # too few to judge
    adm2 = Admission(FakeContext(SCHEMA), {"min_requests": 1})
    _outcomes(adm2, 0, 30, 5)  # NOT_FOUND is an answer, not a failure
    assert adm2.rejection_probability() == (0.0, 1.0)
    st = roundtrip(adm.export_state())
    adm3 = Admission.from_state(ctx, {"min_requests": 10}, st)
    assert adm3.window() == (9, 0)


# ---------------------------------------------------------------------------------------------
# vtc


def gen(call_id, client, tokens, *, handle=1):
    return unary(call_id, GEN, payload=msgpack.packb([client, "p" * tokens, tokens]), handle=handle,
                 meta=[("x-client-id", client)])


def chunk(call_id, *, end=False, first=False, n=1, handle=1):
    return rec(R.RESPONSE, (R.F_START if first else 0) | (R.F_END if end else 0), call_id, handle=handle,
               payload=msgpack.packb(["t" * n, n]))


VTC_CFG = {"methods": [GEN], "max_inflight": 2, "input_tokens": {"field": "prompt_tokens"}, "w_in": 1, "w_out": 2}


def test_vtc_admits_smallest_counter_first(ctx):
    v = Vtc(ctx, VTC_CFG)
    out = v.inbound([gen(1, "a", 10), gen(2, "a", 10), gen(3, "a", 10), gen(4, "b", 10)])
    assert ids(out) == [1, 2]  # capacity 2
    assert v.service()["a"]["counter"] == 20 and v.service()["b"]["counter"] == 20  # b lifted to a's... min backlog
    v.outbound([chunk(1, first=True), chunk(1, end=True)])  # a's call 1 done: 2 output tokens
    # b (counter 20) beats a (counter 24)
    assert ids(ctx.resumed_in) == [4]
    v.outbound([chunk(4, first=True, end=True)])
    assert ids(ctx.resumed_in) == [4, 3]


def test_vtc_fairness_two_clients_one_flooding(ctx):
    """Client A floods (5x the requests of B); while both are backlogged the service they
    receive over any interval differs by at most a bound set by the size of the requests in
    flight, not by their rates (the paper's fairness property)."""
    max_inflight, in_tok, out_tok = 4, 20, 5
    v = Vtc(ctx, {"methods": [GEN], "max_inflight": max_inflight, "input_tokens": {"field": "prompt_tokens"},
                  "w_in": 1, "w_out": 2})
    next_id = [0]
    inflight: list[int] = []

    def submit(client, n):
        recs = []
        for _ in range(n):
            next_id[0] += 1
            recs.append(gen(next_id[0], client, in_tok))
        inflight.extend(ids(v.inbound(recs)))

    submit("a", 300)
    submit("b", 150)
    s0 = v.service()
    max_gap = 0.0
    for step in range(250):
        inflight.extend(ids(ctx.resumed_in))
        ctx.resumed_in.clear()
        if step % 5 == 0:
            submit("a", 5)
            submit("b", 1)
        cid = inflight.pop(0)  # the oldest call generates out_tok tokens and ends
        v.outbound([chunk(cid, first=True)] + [chunk(cid) for _ in range(out_tok - 2)] + [chunk(cid, end=True)])
        s = v.service()
        assert s["a"]["queued"] and s["b"]["queued"]  # both backlogged throughout
        gap = abs((s["a"]["service"] - s0["a"]["service"]) - (s["b"]["service"] - s0["b"]["service"]))
        max_gap = max(max_gap, gap)
    per_request = 1 * in_tok + 2 * out_tok
    assert max_gap <= 2 * max_inflight * per_request
    s = v.service()
    assert abs(s["a"]["admitted"] - s["b"]["admitted"]) <= max_inflight + 1
    # a plain FIFO would have served A about 2x as often as B over this run (300 queued ahead)
    assert s["b"]["finished"] >= 120


def test_vtc_light_client_is_not_starved(ctx):
    v = Vtc(ctx, {"methods": [GEN], "max_inflight": 1, "input_tokens": {"field": "prompt_tokens"}})
    out = v.inbound([gen(i, "heavy", 50) for i in range(1, 51)])
    assert ids(out) == [1]
    v.outbound([chunk(1, first=True, end=True)])
    v.inbound([gen(100, "light", 5)])  # lifted to heavy's level, but the smallest: next
    v.outbound([chunk(2, first=True, end=True)])
    assert ids(ctx.resumed_in) == [2, 100]


def test_vtc_new_client_counter_lifted(ctx):
    v = Vtc(ctx, {"methods": [GEN], "max_inflight": 1, "input_tokens": {"field": "prompt_tokens"}})
    v.inbound([gen(i, "a", 100) for i in range(1, 6)])  # a: 100 charged, 4 waiting
    for i in range(1, 4):
        v.outbound([chunk(i, first=True, end=True, n=1)])
    a = v.service()["a"]
    assert a["counter"] == 4 * 100 + 3 * 2
    v.inbound([gen(50, "newbie", 1)])
    # the newcomer starts at the smallest backlogged counter, not at 0
    assert v.service()["newbie"]["counter"] == a["counter"]
    assert v.counters["lifted"] >= 1
    # when nobody is backlogged, a returning client is lifted to the last one that left
    v2 = Vtc(FakeContext(SCHEMA), {"methods": [GEN], "max_inflight": 10, "input_tokens": {"field": "prompt_tokens"}})
    v2.inbound([gen(1, "x", 70)])
    v2.inbound([gen(2, "y", 1)])
    assert v2.service()["y"]["counter"] == 70 + 1  # lifted to 70, then charged its 1 input token


def test_vtc_output_field_client_field_and_cancel(ctx):
    v = Vtc(ctx, {"methods": [GEN], "max_inflight": 1, "client_id": {"field": "user"}, "output_tokens": {"field": "n_tokens"},
                  "w_out": 1})
    v.inbound([gen(1, "u1", 3), gen(2, "u2", 3), gen(3, "u2", 3)])
    v.inbound([cancel(3)])  # cancelled while queued: gone
    v.outbound([chunk(1, first=True, n=7), chunk(1, end=True, n=3)])
    assert v.service()["u1"]["output_tokens"] == 10 and v.service()["u1"]["service"] == 10
    assert ids(ctx.resumed_in) == [2]
    v.inbound([cancel(2)])  # the client cancels an admitted call: the slot frees
    assert v.service()["u2"]["inflight"] == 0 and v.describe()["inflight"] == 0


def test_vtc_a_call_id_reused_while_its_call_is_queued_or_in_flight_is_refused(ctx):
    """A peer that sends a second START under a call id still queued (or in flight) must not
    split VTC's books: the first START would stay queued for good, and a later admission -
    for another peer's calls - raised KeyError (failing that batch's calls with INTERNAL)."""
    v = Vtc(ctx, VTC_CFG)
    assert ids(v.inbound([gen(1, "a", 10), gen(2, "a", 10)])) == [1, 2]  # capacity 2
    assert v.inbound([gen(3, "a", 10)]) == []  # queued
    assert v.inbound([gen(3, "b", 1)]) == []  # the same call id again, another client: refused
    assert v.inbound([gen(2, "b", 1)]) == []  # the id of a call in flight: refused too
    assert [(r.call_id, code) for r, code, _ in ctx.errors] == [(3, INVALID_ARGUMENT), (2, INVALID_ARGUMENT)]
    assert v.describe()["queued"] == 1 and v.describe()["counters"]["duplicate_call_id"] == 2
    v.outbound([chunk(1, first=True, end=True)])
    assert ids(ctx.resumed_in) == [3]  # the first call 3 goes on
    assert v.inbound([gen(4, "c", 10, handle=2)]) == [] and v.inbound([gen(5, "c", 10, handle=2)]) == []
    v.outbound([chunk(2, first=True, end=True)])  # another peer's calls are admitted as before
    v.outbound([chunk(3, first=True, end=True)])
    assert ids(ctx.resumed_in) == [3, 4, 5]
    assert v.describe()["queued"] == 0 and all(c["queued"] == 0 for c in v.service().values())


def test_vtc_state_roundtrip_and_close(ctx):
    v = Vtc(ctx, VTC_CFG)
    v.inbound([gen(i, "a" if i % 2 else "b", 10) for i in range(1, 7)])
    v2 = Vtc.from_state(ctx, VTC_CFG, roundtrip(v.export_state()))
    assert v2.service() == v.service()
    assert v.close(handed_over=True) == ([], [])
    v2.outbound([chunk(1, first=True, end=True)])
    assert len(ctx.resumed_in) == 1
    held = v2.close()
    assert held.outbound == [] and len(held.inbound) == 3


def test_vtc_config_errors(ctx):
    with pytest.raises(PolicyConfigError, match=r"'input_tokens.field': message llm.GenRequest has no field 'nope'"):
        Vtc(ctx, {"methods": [GEN], "input_tokens": {"field": "nope"}})
    with pytest.raises(PolicyConfigError, match=r"'client_id': give exactly one"):
        Vtc(ctx, {"methods": [GEN], "client_id": {}})
    with pytest.raises(PolicyConfigError, match=r"'side': must be one of"):
        Vtc(ctx, {"methods": [GEN], "side": "middle"})


# ---------------------------------------------------------------------------------------------
# calls lost with their connection (handle_closed): no final record of them crosses the chain


def test_calls_lost_with_their_connection_are_counted_and_forgotten(ctx):
    from mrpcd.policies.acl import Acl

    # admission: the app's own calls lost count as UNAVAILABLE outcomes; other handles stay
    adm = Admission(ctx, {"min_requests": 1, "seed": 1})
    adm.outbound([unary(1, handle=1), unary(2, handle=1), unary(3, handle=2)])
    adm.handle_closed(1)
    assert adm.window() == (2, 0) and len(adm.calls) == 1
    assert adm.counters["lost_with_connection"] == 2
    adm.inbound([response(3, handle=2)])
    assert adm.window() == (3, 1)
    inbound = Admission(FakeContext(SCHEMA), {"direction": "inbound", "min_requests": 1})
    inbound.inbound([unary(1)])
    inbound.handle_closed(1)  # a caller that left is not the server's failure
    assert inbound.window() == (0, 0) and len(inbound.calls) == 0

    # metrics: the app's calls end UNAVAILABLE, the calls it served CANCELLED
    m = Metrics(ctx, {})
    m.outbound([unary(1), start(2, MAKE)])
    m.inbound([unary(9, PING, payload=msgpack.packb([True]))])
    m.handle_closed(1)
    snap = m.snapshot()
    client = {s["labels"]["grpc_code"]: s["value"] for s in snap["counters"]["mrpcd_client_handled_total"]}
    server = {s["labels"]["grpc_code"]: s["value"] for s in snap["counters"]["mrpcd_server_handled_total"]}
    assert client == {"Unavailable": 2} and server == {"Canceled": 1} and snap["in_flight"] == 0

    # acl: its stream tracking never evicts, so a closed handle's streams must go (else
    # enough lost streams would refuse every new one); refused calls are forgotten too
    acl = Acl(FakeContext(SCHEMA), {"rules": [{"method": "*", "action": "allow"}], "max_streams": 2})
    acl.outbound([start(1, handle=1), start(2, handle=1)])
    acl.refused.add((1, 7))
    acl.handle_closed(1)
    assert len(acl.calls) == 0 and (1, 7) not in acl.refused
    assert [r.call_id for r in acl.outbound([start(3, handle=2), start(4, handle=2)])] == [3, 4]


def test_rate_limit_and_qos_drop_what_they_hold_for_a_closed_connection(clock):
    from mrpcd.policies.ratelimit import RateLimit

    ctx = FakeContext(SCHEMA, clock=clock)
    rl = RateLimit(ctx, {"rate": 1, "burst": 1})
    assert ids(rl.outbound([unary(1, handle=1), unary(2, handle=1), unary(3, handle=2)])) == [1]
    rl.handle_closed(1)  # call 2 waited for a channel that is gone
    assert ids(rl.held().outbound) == [3] and rl.counters["dropped_handle_closed"] == 1
    clock.advance(2)
    assert ids(ctx.resumed_out) == [3]

    q_ctx, = _apps(clock, 1)
    q = QosPolicy(q_ctx, {"per_tick": 1, "tick_s": 0.01})
    assert ids(q.outbound([unary(10, handle=1), unary(11, handle=1), unary(12, handle=2)])) == [10]
    q.handle_closed(1)
    assert ids(q.held().outbound) == [12] and q.counters["dropped_handle_closed"] == 1
    clock.advance(0.05)
    assert ids(q_ctx.resumed_out) == [12]
