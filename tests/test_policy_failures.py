"""Policies that misbehave fail the calls they touch with a clear status; the datapath goes on."""
from __future__ import annotations

import subprocess
import time
import sys

import pytest

import mrpcd

from test_policies_support import SCHEMA


RAISING = '''
from mrpcd.policies.base import Policy


class Boom(Policy):
    name = "boom"
    version = "1"

    def outbound(self, batch):
        raise RuntimeError("boom in outbound")

    def inbound(self, batch):
        raise RuntimeError("boom in inbound")


POLICY = Boom
'''


def ctl(daemon, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mrpcd.ctl", "--socket", daemon.socket, *args],
                          capture_output=True, text=True, timeout=30)


@pytest.fixture
def served(two_daemons, app_factory, gen_dir):
    a, b = two_daemons
    server = app_factory("hello_server.py", b, gen=gen_dir)
    return a, b, server.readline()


def test_a_policy_that_raises_fails_the_calls_with_internal_and_the_datapath_goes_on(served, tmp_path):
    """A policy module whose hooks raise: the calls of that batch end with INTERNAL naming
    the policy (client side and server side), the daemon keeps running, and once it is
    detached calls flow again. Before: the batch vanished and the calls hung to their deadline."""
    a, b, address = served
    import hello_mrpc

    mod = tmp_path / "boom.py"
    mod.write_text(RAISING)
    app = mrpcd.connect(a.socket, name="victim")
    try:
        stub = hello_mrpc.GreeterStub(mrpcd.insecure_channel(address, app=app))
        assert stub.SayHello(hello_mrpc.HelloRequest(name="x"), timeout=10).message == "Hello, x!"
        for daemon, target in ((a, "victim"), (b, "hello_server.py")):
            r = ctl(daemon, "policy", "attach", target, str(mod))
            assert r.returncode == 0, r.stderr
            for _ in range(3):
                with pytest.raises(mrpcd.RpcError) as err:
                    stub.SayHello(hello_mrpc.HelloRequest(name="y"), timeout=10)
                assert err.value.code() is mrpcd.StatusCode.INTERNAL, err.value
                assert "policy boom failed" in err.value.details() and "RuntimeError" in err.value.details()
            r = ctl(daemon, "policy", "detach", "boom")
            assert r.returncode == 0, r.stderr
            assert stub.SayHello(hello_mrpc.HelloRequest(name="z"), timeout=10).message == "Hello, z!"
            assert daemon.alive()
    finally:
        app.close()


def test_vtc_frees_the_slots_of_calls_whose_peer_went_away(streamer):
    """VTC on a server app, max_inflight 1: a client whose connection is lost mid-stream
    (its app closes) must not keep the slot; the next client's call is admitted.
    Before: the server app's calls were cancelled by the GOAWAY, no final RESPONSE ever
    crossed the policy, and the slot stayed taken: every later call queued forever."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    a, b, pb = streamer
    started = threading.Event()

    class Slow(pb.StreamerServicer):
        def ServerStream(self, request, context):
            started.set()
            while context.is_active():
                yield pb.Chunk(seq=1)
                time.sleep(0.05)

        def Unary(self, request, context):
            return pb.Summary(total=7)

    srv_app = mrpcd.connect(b.socket, name="vtc-server")
    server = mrpcd.server(ThreadPoolExecutor(8), app=srv_app)
    pb.add_StreamerServicer_to_server(Slow(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        r = ctl(b, "policy", "attach", "vtc-server", "vtc", "--config", "{max_inflight: 1}")
        assert r.returncode == 0, r.stderr
        for _ in range(3):
            gone = mrpcd.connect(a.socket, name="vtc-leaver")
            stream = pb.StreamerStub(mrpcd.insecure_channel(f"127.0.0.1:{port}", app=gone)).ServerStream(pb.Chunk(), timeout=10)
            assert next(stream).seq == 1
            gone.close()  # its connection to the server goes away mid-stream
        stayer = mrpcd.connect(a.socket, name="vtc-stayer")
        try:
            stub = pb.StreamerStub(mrpcd.insecure_channel(f"127.0.0.1:{port}", app=stayer))
            assert stub.Unary(pb.Chunk(), timeout=10).total == 7
        finally:
            stayer.close()
    finally:
        server.stop(None)
        srv_app.close()


FORGETFUL = '''
from mrpcd.policies.base import Policy


class Forgetful(Policy):
    """Claims to be the next ratelimit but takes over none of its queued calls."""
    name = "ratelimit"
    version = "9.9"


POLICY = Forgetful
'''


def test_an_upgrade_that_would_drop_held_calls_is_refused(served, tmp_path):
    """ratelimit holds a queued call; the new module's from_state ignores the queue. Before:
    the upgrade went through, the old version was closed with handed_over=True and the
    queued call vanished (the client waited for its deadline). Now the upgrade is refused,
    the old version keeps the call and releases it."""
    import threading

    a, _b, address = served
    import hello_mrpc

    mod = tmp_path / "forgetful.py"
    mod.write_text(FORGETFUL)
    app = mrpcd.connect(a.socket, name="queued")
    try:
        stub = hello_mrpc.GreeterStub(mrpcd.insecure_channel(address, app=app))
        assert stub.SayHello(hello_mrpc.HelloRequest(name="x"), timeout=10).message == "Hello, x!"
        r = ctl(a, "policy", "attach", "queued", "ratelimit", "--config", "{rate: 0.01, burst: 1, mode: queue}")
        assert r.returncode == 0, r.stderr
        assert stub.SayHello(hello_mrpc.HelloRequest(name="first"), timeout=10).message == "Hello, first!"
        result: list = []
        t = threading.Thread(target=lambda: result.append(stub.SayHello(hello_mrpc.HelloRequest(name="held"), timeout=20)))
        t.start()
        from conftest import wait_until
        from mrpcd.ctl import Control

        def held() -> int:
            return Control(a.socket).call("policies", app="queued")["apps"][0]["policies"][0]["held"]["outbound"]

        assert wait_until(lambda: held() == 1, 10)
        r = ctl(a, "policy", "upgrade", "ratelimit", "--module", str(mod), "--config", "{}")
        assert r.returncode == 1 and "held" in r.stderr, (r.returncode, r.stderr)
        assert held() == 1
        r = ctl(a, "policy", "detach", "ratelimit")  # what it held goes on
        assert r.returncode == 0, r.stderr
        t.join(15)
        assert result and result[0].message == "Hello, held!"
    finally:
        app.close()


VTC_V2 = '''
from mrpcd.policies.vtc import Vtc


class VtcV2(Vtc):
    version = "2.0-test"


POLICY = VtcV2
'''


def test_upgrade_without_config_keeps_the_operators_config(served, tmp_path):
    """`policy upgrade` without --config reuses the running config. Before: it passed the
    policy's *normalised* config (method ids, Method objects, derived keys) to the new
    version's validation, which refused it: vtc (and ratelimit with per_method) could not
    be upgraded without restating the config."""
    a, b, address = served
    mod = tmp_path / "vtc_v2.py"
    mod.write_text(VTC_V2)
    r = ctl(b, "policy", "attach", "hello_server.py", "vtc", "--config",
            "{max_inflight: 3, methods: [/helloworld.Greeter/SayHello], client_id: {field: name}}")
    assert r.returncode == 0, r.stderr
    r = ctl(b, "policy", "upgrade", "vtc", "--module", str(mod))
    assert r.returncode == 0, r.stderr
    from mrpcd.ctl import Control

    pol = Control(b.socket).call("policies", app="hello_server.py")["apps"][0]["policies"][0]
    assert pol["version"] == "2.0-test"
    assert pol["config"] == {"max_inflight": 3, "methods": ["/helloworld.Greeter/SayHello"], "client_id": {"field": "name"}}
    r = ctl(b, "policy", "attach", "hello_server.py", "ratelimit", "--config",
            "{rate: 1000, per_method: {/helloworld.Greeter/SayHello: {rate: 500}}, direction: inbound}")
    assert r.returncode == 0, r.stderr
    r = ctl(b, "policy", "upgrade", "ratelimit", "--module", "ratelimit")
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("name, config, switch", [
    ("ratelimit", {"rate": 1, "burst": 1}, {"direction": "inbound"}),
    ("fault", {"delay": {"probability": 1, "ms": 1000}}, {"direction": "inbound"}),
    ("vtc", {"side": "client", "max_inflight": 1}, {"side": "server"}),
])
def test_switching_direction_while_calls_are_held_is_refused(name, config, switch):
    """A policy holding an app's outbound calls, reconfigured to gate inbound requests.
    Before: the change was applied and the held requests were later released inbound,
    i.e. delivered back to the app that sent them. Now the change is refused (old config
    kept) while calls are held, and accepted once they are gone."""
    from mrpcd.policies.base import PolicyConfigError, load_policy_module
    from mrpcd.policies.testing import FakeClock, FakeContext

    from test_policies_support import response, unary

    clock = FakeClock()
    ctx = FakeContext(SCHEMA, clock=clock)
    pol = load_policy_module(name)(ctx, config)
    passed = pol.outbound([unary(1), unary(2)])
    held = pol.held().outbound
    assert held and len(passed) + len(held) == 2
    with pytest.raises(PolicyConfigError, match="held"):
        pol.reconfigure({**config, **switch})
    assert pol.raw_config == config and pol.request_direction() == "outbound"
    clock.advance(5)
    pol.inbound([response(1)])  # vtc: call 1 ends, its slot goes to call 2
    assert ctx.resumed_in == [] and [r.call_id for r in passed + ctx.resumed_out] == [1, 2]
    assert not pol.held().outbound
    pol.reconfigure({**config, **switch})
    assert pol.request_direction() == "inbound"


def test_metrics_memory_stays_bounded_when_an_app_makes_up_method_ids():
    """Method ids are whatever the app writes into its ring. Before: one started/handled/
    histogram series per id, so an app sending STARTs with ever new ids grew the daemon's
    memory (and /metrics) without bound. Now ids outside the app's schema share one series
    beyond MAX_UNKNOWN_METHODS (256); the calls are still all counted."""
    from mrpcd.marshal import records as R
    from mrpcd.policies.metrics import Metrics
    from mrpcd.policies.testing import FakeClock, FakeContext

    from test_policies_support import MAKE, rec, response, unary

    clock = FakeClock()
    pol = Metrics(FakeContext(SCHEMA, clock=clock), {})
    n = 3000
    pol.outbound([unary(1, MAKE)])
    pol.outbound([rec(R.REQUEST, R.F_START | R.F_END, 10 + i, method=1000 + i, payload=b"\x90") for i in range(n)])
    pol.inbound([response(1)] + [response(10 + i, status=12) for i in range(n)])
    assert len(pol.started) <= 300 and len(pol.hist) <= 300 and len(pol.handled) <= 300
    assert sum(pol.started.values()) == n + 1 and sum(pol.handled.values()) == n + 1
    text = pol.prometheus_text()
    assert 'grpc_method="MakeReservation"' in text and 'grpc_method="other"' in text
    pol2 = Metrics.from_state(FakeContext(SCHEMA, clock=clock), {}, pol.export_state())
    pol2.outbound([rec(R.REQUEST, R.F_START | R.F_END, 1, method=999_999, payload=b"\x90")])
    assert len(pol2.started) == len(pol.started)


def test_a_call_another_policy_answers_still_ends_for_the_policies_it_passed(served):
    """Server app with [acl, vtc max_inflight 1]: requests come in through vtc, then acl,
    which denies "mallory". Before: acl's PERMISSION_DENIED went straight to the peer, vtc
    never saw the call end and kept its only slot: every later call queued forever (and
    metrics never counted the call as handled). Now the answer goes back through the
    policies the request passed."""
    a, b, address = served
    import hello_mrpc
    from mrpcd.ctl import Control

    rules = '{direction: inbound, rules: [{method: /helloworld.Greeter/SayHello, field: name, op: eq, value: mallory}]}'
    for args in (("acl", "--config", rules), ("vtc", "--config", "{max_inflight: 1}"), ("metrics",)):
        r = ctl(b, "policy", "attach", "hello_server.py", *args)
        assert r.returncode == 0, r.stderr
    app = mrpcd.connect(a.socket, name="caller")
    try:
        stub = hello_mrpc.GreeterStub(mrpcd.insecure_channel(address, app=app))
        for _ in range(3):
            with pytest.raises(mrpcd.RpcError) as err:
                stub.SayHello(hello_mrpc.HelloRequest(name="mallory"), timeout=10)
            assert err.value.code() is mrpcd.StatusCode.PERMISSION_DENIED
        assert stub.SayHello(hello_mrpc.HelloRequest(name="alice"), timeout=10).message == "Hello, alice!"
        pols = {p["instance"]: p for p in Control(b.socket).call("policies", app="hello_server.py")["apps"][0]["policies"]}
        assert pols["vtc"]["inflight"] == 0
        handled = pols["metrics"]["metrics"]["counters"]["mrpcd_server_handled_total"]
        assert {s["labels"]["grpc_code"]: s["value"] for s in handled} == {"PermissionDenied": 3, "OK": 1}
    finally:
        app.close()


BAD_CLOSE = '''
from mrpcd.policies.base import Policy


class BadClose(Policy):
    name = "badclose"
    version = "1"

    def close(self, handed_over=False):
        raise RuntimeError("cannot close")


POLICY = BadClose
'''


def test_a_policy_whose_close_raises_can_still_be_detached_and_upgraded(served, tmp_path):
    """Before: detach called close(), which raised, and the policy stayed on the chain for
    good (internal error, no way out); an upgrade away from it reported an internal error
    although the swap had been made."""
    a, _b, address = served
    import hello_mrpc

    mod = tmp_path / "badclose.py"
    mod.write_text(BAD_CLOSE)
    app = mrpcd.connect(a.socket, name="stuck")
    try:
        stub = hello_mrpc.GreeterStub(mrpcd.insecure_channel(address, app=app))
        for instance in ("one", "two"):
            r = ctl(a, "policy", "attach", "stuck", str(mod), "--name", instance)
            assert r.returncode == 0, r.stderr
        r = ctl(a, "policy", "detach", "one")
        assert r.returncode == 0, r.stderr
        r = ctl(a, "policy", "upgrade", "two", "--module", str(mod))
        assert r.returncode == 0, r.stderr
        from mrpcd.ctl import Control

        assert [p["instance"] for p in Control(a.socket).call("policies", app="stuck")["apps"][0]["policies"]] == ["two"]
        assert stub.SayHello(hello_mrpc.HelloRequest(name="z"), timeout=10).message == "Hello, z!"
    finally:
        app.close()


BAD_EXPORT = '''
from mrpcd.policies.base import Policy


class BadExport(Policy):
    name = "badexport"
    version = "1"

    def save_state(self):
        raise ValueError("no state for you")


POLICY = BadExport
'''


def test_an_upgrade_from_a_version_whose_export_state_raises_is_refused_clearly(served, tmp_path):
    """Before: 'internal error: no state for you' (code 13, a traceback in the log); now a
    refusal that names the policy and says it keeps running."""
    a, _b, _address = served
    mod = tmp_path / "badexport.py"
    mod.write_text(BAD_EXPORT)
    app = mrpcd.connect(a.socket, name="exporter")
    try:
        assert ctl(a, "policy", "attach", "exporter", str(mod)).returncode == 0
        r = ctl(a, "policy", "upgrade", "badexport", "--module", str(mod))
        assert r.returncode == 1 and "badexport keeps running" in r.stderr and "no state for you" in r.stderr, r.stderr
    finally:
        app.close()
