"""grpc semantics beyond the interop cases, through two daemons: flow control (a slow
reader pauses a streaming server; memory stays bounded; order kept), token-stream
throughput, server-side deadlines and cancellation callbacks, server interceptors, and
the sans-I/O flow-control accounting."""
from __future__ import annotations

import json
import time

import pytest

import mrpcd
from mrpcd import flow, wire
from mrpcd.marshal import records as R


def _vm_hwm_kb(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_recv_window_grants_in_batches_and_send_credit_blocks():
    recv = flow.RecvWindow(1000)
    grants = [recv.consume(100) for _ in range(10)]
    assert grants == [0, 0, 0, 0, 500, 0, 0, 0, 0, 500]
    send = flow.SendCredit(100)
    assert send.available()
    send.spend(150)  # overdraw by at most one message
    assert not send.available()
    assert send.grant(30) is False and not send.available()
    assert send.grant(100) is True and send.available()
    rec = R.parse_record(flow.window_record(3, 7, 4096))
    assert (rec.kind, rec.handle, rec.call_id, rec.method_id) == (R.WINDOW, 3, 7, 4096)
    with pytest.raises(ValueError, match="window grant"):
        flow.window_record(3, 7, 0)


def test_message_limit_options():
    assert wire.message_limits(None, 16 << 20) == (16 << 20, 4 << 20)
    assert wire.message_limits([("grpc.max_send_message_length", 10), ("grpc.max_receive_message_length", -1)], 1 << 20) == (10, 1 << 20)
    with pytest.raises(ValueError, match="must be an int"):
        wire.message_limits([("grpc.max_send_message_length", "10")], 100)
    err = wire.too_large("Received", 11, 10)
    assert err.code() is mrpcd.StatusCode.RESOURCE_EXHAUSTED and err.details() == "Received message larger than max (11 vs. 10)"


@pytest.fixture
def flow_server(two_daemons, app_factory, gen_dir, tmp_path):
    a, b = two_daemons
    progress, log = tmp_path / "progress", tmp_path / "log"
    srv = app_factory("interop_flow_server.py", b, "--progress", str(progress), "--log", str(log), gen=gen_dir)
    return a, b, srv.readline(), progress, log


def test_slow_reader_pauses_the_server_with_bounded_memory(flow_server, app_factory, gen_dir):
    a, b, target, progress, _log = flow_server
    client = app_factory("interop_flow_client.py", a, "--target", target, "--progress", str(progress), "--count", "40000", gen=gen_dir)
    rc, out, err = client.wait(60)
    assert rc == 0, err
    res = json.loads(out.strip().splitlines()[-1])
    print("flow:", res, "daemon A VmHWM kB", _vm_hwm_kb(a.pid), "daemon B VmHWM kB", _vm_hwm_kb(b.pid))
    assert res["received"] == 40_000 and res["in_order"] and res["code"] == "OK"
    # while the client slept, the server got at most one window (+1 message) ahead of it
    ahead = res["server_yielded_during_pause"] - res["read_before_pause"]
    assert 0 < ahead <= flow.INITIAL_WINDOW // R.HEADER_SIZE + 1, res
    assert res["server_yielded_during_pause"] < 40_000
    assert res["client_max_rss_kb"] < 150_000
    assert _vm_hwm_kb(a.pid) < 150_000 and _vm_hwm_kb(b.pid) < 150_000


def test_deadline_reaches_the_handler_and_expires_on_both_sides(flow_server, gen_dir):
    a, _b, target, _progress, log = flow_server
    import hello_mrpc

    app = mrpcd.connect(a.socket)
    try:
        stub = hello_mrpc.GreeterStub(mrpcd.Channel(target, app))
        t0 = time.monotonic()
        with pytest.raises(mrpcd.RpcError) as info:
            stub.SayHello(hello_mrpc.HelloRequest(name="sleep:5"), timeout=0.3)
        assert info.value.code() is mrpcd.StatusCode.DEADLINE_EXCEEDED
        assert info.value.details() == "Deadline Exceeded"
        assert time.monotonic() - t0 < 2
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not {"cancelled", "callback"} <= set(log.read_text().split()):
            time.sleep(0.02)
        lines = log.read_text().split()
        assert "cancelled" in lines and "callback" in lines
        remaining = float(lines[lines.index("remaining") + 1])
        assert 0 < remaining <= 0.3
        # client cancel of a future reaches the handler too
        fut = stub.SayHello.future(hello_mrpc.HelloRequest(name="sleep:5"))
        time.sleep(0.2)
        assert fut.cancel() and fut.cancelled() and fut.code() is mrpcd.StatusCode.CANCELLED
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and log.read_text().split().count("cancelled") < 2:
            time.sleep(0.02)
        assert log.read_text().split().count("cancelled") == 2
    finally:
        app.close()


def test_interceptors_client_and_server(flow_server, gen_dir):
    a, _b, target, _progress, _log = flow_server
    import hello_mrpc

    seen = []

    class AddMeta(mrpcd.UnaryUnaryClientInterceptor, mrpcd.UnaryStreamClientInterceptor):
        def __init__(self, name):
            self.name = name

        def intercept_unary_unary(self, continuation, details, request):
            seen.append((self.name, details.method))
            meta = list(details.metadata or ()) + [("x-deny", "1")] if request.name == "deny" else details.metadata
            return continuation(details._replace(metadata=meta), request)

        def intercept_unary_stream(self, continuation, details, request):
            seen.append((self.name, details.method))
            return continuation(details, request)

    app = mrpcd.connect(a.socket)
    try:
        channel = mrpcd.intercept_channel(mrpcd.Channel(target, app), AddMeta("outer"), AddMeta("inner"))
        stub = hello_mrpc.GreeterStub(channel)
        reply, call = stub.SayHello.with_call(hello_mrpc.HelloRequest(name="ok"), timeout=5)
        assert reply.message == "Hello, ok!" and call.code() is mrpcd.StatusCode.OK
        assert seen == [("outer", "/helloworld.Greeter/SayHello"), ("inner", "/helloworld.Greeter/SayHello")]
        with pytest.raises(mrpcd.RpcError) as info:
            stub.SayHello(hello_mrpc.HelloRequest(name="deny"), timeout=5)
        assert info.value.code() is mrpcd.StatusCode.PERMISSION_DENIED and info.value.details() == "denied by interceptor"
        assert [r.message for r in stub.SayHelloStream(hello_mrpc.HelloRequest(count=3), timeout=5)] == ["0", "1", "2"]
    finally:
        app.close()


def test_receive_limit_is_resource_exhausted(flow_server, gen_dir):
    a, _b, target, _progress, _log = flow_server
    import hello_mrpc

    app = mrpcd.connect(a.socket)
    try:
        stub = hello_mrpc.GreeterStub(mrpcd.Channel(target, app, options=[("grpc.max_receive_message_length", 10)]))
        with pytest.raises(mrpcd.RpcError) as info:
            stub.SayHello(hello_mrpc.HelloRequest(name="a long enough name"), timeout=5)
        assert info.value.code() is mrpcd.StatusCode.RESOURCE_EXHAUSTED
        assert info.value.details().startswith("Received message larger than max (")
        small = hello_mrpc.GreeterStub(mrpcd.Channel(target, app, options=[("grpc.max_send_message_length", 5)]))
        with pytest.raises(mrpcd.RpcError) as info:
            small.SayHello(hello_mrpc.HelloRequest(name="too long"), timeout=5)
        assert info.value.code() is mrpcd.StatusCode.RESOURCE_EXHAUSTED
        assert info.value.details().startswith("Sent message larger than max (")
    finally:
        app.close()
