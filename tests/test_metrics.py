"""Observability: the call observer, the Prometheus endpoint (gRPC names), mrpcctl stats, JSON logs.

The endpoint's text is parsed with prometheus_client's own parser, so a format slip fails here.
"""
from __future__ import annotations

import json
import signal
import socket
import time
import urllib.error
import urllib.request
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

import mrpcd
from mrpcd.ctl import Control
from mrpcd.marshal import records as R
from mrpcd.marshal.schema import method_id
from mrpcd.daemon.metrics import render
from mrpcd.daemon.observe import CallStats, Observer
from mrpcd.daemon.session import PendingRecords

SAY = "/helloworld.Greeter/SayHello"
LABELS = ("unary", "helloworld.Greeter", "SayHello")


def rec(kind: int, flags: int, call_id: int, handle: int = 1, status: int = 0, mid: int = 0) -> R.Record:
    return R.parse_record(R.encode_record(kind, flags, status, handle, call_id, mid, 0, b"", b""))


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def observer(gen_dir):
    import hello_mrpc

    clock = Clock()
    return Observer(CallStats(), lambda: hello_mrpc.SCHEMA, max_calls=4, clock=clock), clock


# -- the observer, without a daemon --------------------------------------------------------
def test_client_and_server_calls_are_paired_by_handle_and_call_id(observer):
    obs, clock = observer
    st = obs.stats
    obs.from_app([rec(R.REQUEST, R.F_START | R.F_END, 1, mid=method_id(SAY))])  # client call out
    obs.to_app([rec(R.REQUEST, R.F_START | R.F_END, 7, handle=2, mid=method_id(SAY))])  # server call in
    assert obs.in_flight == 2 and st.started == {("client", LABELS): 1, ("server", LABELS): 1}
    clock.t += 0.03
    obs.to_app([rec(R.RESPONSE, R.F_START | R.F_END, 1, status=0)])
    obs.from_app([rec(R.RESPONSE, R.F_START | R.F_END, 7, handle=2, status=7)])
    assert obs.in_flight == 0
    assert st.handled == {("client", LABELS, 0): 1, ("server", LABELS, 7): 1}
    counts, total, n = st.hist[("client", LABELS)]
    assert n == 1 and abs(total - 0.03) < 1e-9 and counts[st.buckets.index(0.05)] == 1
    # a response nobody asked for, or a non-final one, counts nothing
    obs.to_app([rec(R.RESPONSE, R.F_START, 1), rec(R.RESPONSE, R.F_END, 99)])
    assert sum(st.handled.values()) == 2


def test_cancel_goaway_unknown_methods_and_the_bound(observer):
    obs, clock = observer
    st = obs.stats
    obs.from_app([rec(R.REQUEST, R.F_START, i, mid=method_id(SAY)) for i in (1, 2)])
    obs.from_app([rec(R.CANCEL, 0, 1)])
    assert st.handled[("client", LABELS, 1)] == 1
    obs.to_app([rec(R.GOAWAY, 0, 0, status=14)])  # handle 1 lost: call 2 fails UNAVAILABLE
    assert st.handled[("client", LABELS, 14)] == 1 and obs.in_flight == 0
    obs.from_app([rec(R.REQUEST, R.F_START, 5, mid=12345)])
    assert st.started[("client", ("unknown", "unknown", "unknown"))] == 1
    obs.from_app([rec(R.REQUEST, R.F_START, 10 + i, mid=method_id(SAY)) for i in range(6)])
    assert obs.in_flight == 4 and st.evicted == 3  # bounded: the oldest are forgotten, and counted


def test_render_is_valid_prometheus_text(observer):
    obs, clock = observer
    obs.from_app([rec(R.REQUEST, R.F_START, 1, mid=method_id(SAY))])
    clock.t += 2
    obs.to_app([rec(R.RESPONSE, R.F_START | R.F_END, 1, status=5)])

    class Weird:  # engines whose describe() is odd or broken must not break a scrape
        instance_name = 'we"ird\npolicy'

        def describe(self):
            return {"counters": {"a-b": 2, "flag": True, "a_b": 5, 'say"hi': 1}, "held": {"outbound": 1, "inbound": 0}}

    class Broken:
        def describe(self):
            raise RuntimeError("boom")

    pending = PendingRecords()
    pending.append(SimpleNamespace(size=48))
    session = SimpleNamespace(app_id=3, name="app\\one", stats={"records_out": 4, "malformed": 1}, pending=pending,
                              observer=obs, datapath=SimpleNamespace(engines=[Weird(), Broken()]))
    daemon = SimpleNamespace(version="9.9", uptime=lambda: 1.5, sessions={3: session}, counters={"apps_connected": 1},
                             call_stats=obs.stats, draining=False,
                             poller=SimpleNamespace(stats=lambda: {"poll_ticks": 7, "poll_hits": 3, "poll_window_us": 150.0}))
    fams = {f.name: f for f in text_string_to_metric_families(render(daemon))}
    handled = fams["mrpcd_client_handled"]
    assert handled.type == "counter"
    (s,) = handled.samples
    assert s.labels == {"grpc_type": "unary", "grpc_service": "helloworld.Greeter", "grpc_method": "SayHello", "grpc_code": "NotFound"}
    hist = {(x.name, x.labels.get("le")): x.value for x in fams["mrpcd_client_handling_seconds"].samples}
    assert hist[("mrpcd_client_handling_seconds_bucket", "1.0")] == 0 and hist[("mrpcd_client_handling_seconds_bucket", "2.5")] == 1
    assert hist[("mrpcd_client_handling_seconds_bucket", "+Inf")] == 1 and hist[("mrpcd_client_handling_seconds_sum", None)] == 2
    app = fams["mrpcd_app_records_out"].samples[0]
    assert app.labels == {"app_id": "3", "app": "app\\one"} and app.value == 4
    pol, pol2 = fams["mrpcd_policy_a_b"].samples  # a-b and a_b: one name, told apart by key
    assert pol.labels["policy"] == 'we"ird\npolicy' and pol.value == 2
    assert pol2.labels == dict(pol.labels, key="a_b") and pol2.value == 5
    assert fams["mrpcd_policy_say_hi"].documentation == 'Policy counter say"hi.'  # HELP escapes no quote
    assert "mrpcd_policy_flag" not in fams  # booleans are not counters
    assert {x.labels["direction"]: x.value for x in fams["mrpcd_policy_held_records"].samples} == {"outbound": 1, "inbound": 0}
    assert fams["mrpcd_apps"].samples[0].value == 1 and fams["mrpcd_uptime_seconds"].samples[0].value == 1.5
    assert fams["mrpcd_poll_ticks"].type == "counter" and fams["mrpcd_poll_ticks"].samples[0].value == 7
    assert fams["mrpcd_poll_hits"].samples[0].value == 3
    assert fams["mrpcd_poll_window_seconds"].samples[0].value == 150e-6
    assert fams["mrpcd_app_pending_records"].samples[0].value == 1
    assert fams["mrpcd_app_pending_bytes"].samples[0].value == 48


# -- a running daemon ------------------------------------------------------------------------
def scrape(address: str, path: str = "/metrics") -> dict:
    with urllib.request.urlopen(f"http://{address}{path}", timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return {f.name: f for f in text_string_to_metric_families(r.read().decode())}


def sample(fams: dict, name: str, **labels: str) -> float:
    for f in fams.values():
        for s in f.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    raise AssertionError(f"no sample {name}{labels}")


METRICS_ON = 'metrics:\n  address: "127.0.0.1:0"\n'


def test_endpoint_counts_calls_on_both_sides_and_policies(daemon_factory, app_factory, gen_dir):
    import hello_mrpc

    a = daemon_factory("a", config=METRICS_ON)
    b = daemon_factory("b", config=METRICS_ON + "log_format: json\n")
    address = app_factory("hello_server.py", b, gen=gen_dir).readline()
    addr_a = Control(a.socket).call("stats")["daemon"]["metrics_address"]
    addr_b = Control(b.socket).call("stats")["daemon"]["metrics_address"]
    app = mrpcd.connect(a.socket, name="caller")
    try:
        stub = hello_mrpc.GreeterStub(mrpcd.insecure_channel(address, app=app))
        for i in range(3):
            assert stub.SayHello(hello_mrpc.HelloRequest(name=f"n{i}"), timeout=10).message == f"Hello, n{i}!"
        with pytest.raises(mrpcd.RpcError):
            stub.SayHello(hello_mrpc.HelloRequest(name="abort"), timeout=10)
        Control(a.socket).call("policy_attach", app="caller", policy="ratelimit", config={"rate": 0.001, "burst": 1, "mode": "drop"})
        stub.SayHello(hello_mrpc.HelloRequest(name="ok"), timeout=10)
        with pytest.raises(mrpcd.RpcError):
            stub.SayHello(hello_mrpc.HelloRequest(name="limited"), timeout=10)

        m = {"grpc_service": "helloworld.Greeter", "grpc_method": "SayHello", "grpc_type": "unary"}
        fa, fb = scrape(addr_a), scrape(addr_b)
        assert sample(fa, "mrpcd_client_started_total", **m) == 6
        assert sample(fa, "mrpcd_client_handled_total", grpc_code="OK", **m) == 4
        assert sample(fa, "mrpcd_client_handled_total", grpc_code="PermissionDenied", **m) == 1
        assert sample(fa, "mrpcd_client_handled_total", grpc_code="ResourceExhausted", **m) == 1  # the policy answered
        assert sample(fa, "mrpcd_client_handling_seconds_count", **m) == 6
        assert sample(fb, "mrpcd_server_started_total", **m) == 5  # the refused call never left host a
        assert sample(fb, "mrpcd_server_handled_total", grpc_code="OK", **m) == 4
        assert sample(fb, "mrpcd_server_handling_seconds_bucket", le="+Inf", **m) == 5
        assert sample(fa, "mrpcd_app_records_out_total", app="caller") >= 6
        assert sample(fa, "mrpcd_policy_passed_total", app="caller", policy="ratelimit") == 1
        assert sample(fa, "mrpcd_policy_rejected_total", app="caller", policy="ratelimit") == 1
        assert sample(fa, "mrpcd_apps") == 1 and sample(fa, "mrpcd_calls_in_flight") == 0

        stats = Control(a.socket).call("stats")  # mrpcctl stats: the same numbers
        (row,) = stats["calls"]["client"]
        assert row["method"] == "SayHello" and row["started"] == 6 and row["handled"]["OK"] == 4
        assert any(p["policy"] == "ratelimit" and p["counters"]["rejected"] == 1 for p in stats["policies"])
    finally:
        app.close()
    # JSON logs carry the event's fields
    events = [json.loads(line) for line in b.log().splitlines() if line.startswith("{")]
    connected = [e for e in events if "connected: app_id" in e["msg"]]
    assert connected and {"app_id", "pid", "app"} <= set(connected[0])


def test_http_errors_and_live_metrics_address(daemon_factory):
    d = daemon_factory("m", config="log_level: info\n")
    assert Control(d.socket).call("stats")["daemon"]["metrics_address"] is None  # off by default
    cfg = d.socket.rsplit(".", 1)[0] + ".yaml"
    with open(cfg, "w") as f:
        f.write(METRICS_ON)
    d.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while (addr := Control(d.socket).call("stats")["daemon"]["metrics_address"]) is None:
        assert time.monotonic() < deadline, d.log()
        time.sleep(0.02)
    assert "mrpcd_build_info" in scrape(addr)
    for path, code in (("/nope", 404),):
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"http://{addr}{path}", timeout=10)
        assert err.value.code == code
    req = urllib.request.Request(f"http://{addr}/metrics", method="POST", data=b"x")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=10)
    assert err.value.code == 405
    host, port = addr.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as s:  # garbage gets a 400, not a crash
        s.sendall(b"HELLO\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 400")
    with socket.create_connection((host, int(port)), timeout=10) as s:  # an endless head is cut off
        s.sendall(b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 20000)
        assert s.recv(100).startswith(b"HTTP/1.1 431")
    # metrics off again
    with open(cfg, "w") as f:
        f.write("metrics: {address: null}\n")
    d.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while Control(d.socket).call("stats")["daemon"]["metrics_address"] is not None:
        assert time.monotonic() < deadline, d.log()
        time.sleep(0.02)
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://{addr}/metrics", timeout=5)
    assert Control(d.socket).call("ping")["pid"] == d.pid


def test_a_request_with_bare_lf_line_ends_is_answered(daemon_factory):
    """`printf 'GET /metrics HTTP/1.0\\n\\n' | nc host port` gets the metrics (RFC 9112 2.2 allows bare LF)."""
    d = daemon_factory("lf", config=METRICS_ON)
    addr = Control(d.socket).call("stats")["daemon"]["metrics_address"]
    host, port = addr.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"GET /metrics HTTP/1.0\nAccept: */*\n\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 200") and b"mrpcd_build_info" in data
