"""Built-in policies on real daemons: fault injection, metrics, QoS across apps, admission."""
from __future__ import annotations

import json

import mrpcd
from mrpcd.ctl import Control

from test_policy_ops import ctl, load_counts, policies_of


def _stub(app, address):
    import hello_mrpc

    return hello_mrpc, hello_mrpc.GreeterStub(mrpcd.insecure_channel(address, app=app))


def test_fault_injection_aborts_and_metrics_count_per_code(served_policy_env):
    a, address = served_policy_env
    app = mrpcd.connect(a.socket, name="faulty")
    try:
        pb, stub = _stub(app, address)
        assert stub.SayHello(pb.HelloRequest(name="x"), timeout=10).message == "Hello, x!"
        assert ctl(a, "policy", "attach", "faulty", "metrics").returncode == 0
        cfg = json.dumps({"abort": {"probability": 1.0, "code": "UNAVAILABLE", "details": "injected"}, "seed": 7})
        r = ctl(a, "policy", "attach", "faulty", "fault", "--config", cfg, "--position", "0")
        assert r.returncode == 0, r.stderr
        for _ in range(5):
            try:
                stub.SayHello(pb.HelloRequest(name="y"), timeout=10)
                raise AssertionError("the fault policy let a call through")
            except mrpcd.RpcError as exc:
                assert exc.code() is mrpcd.StatusCode.UNAVAILABLE and exc.details() == "injected"
        assert ctl(a, "policy", "detach", "fault").returncode == 0
        for _ in range(3):
            assert stub.SayHello(pb.HelloRequest(name="z"), timeout=10).message == "Hello, z!"
        metrics = next(p for p in policies_of(a, "faulty") if p["instance"] == "metrics")["metrics"]
        text = json.dumps(metrics)
        assert "SayHello" in text
        # 3 OK calls after detach; the 5 aborted ones never passed metrics (fault stood before it)
        handled = metrics.get("handled") or metrics
        assert "OK" in json.dumps(handled)
    finally:
        app.close()


def test_qos_scheduler_is_shared_across_apps(served_policy_env):
    a, address = served_policy_env
    hi, lo = mrpcd.connect(a.socket, name="interactive"), mrpcd.connect(a.socket, name="batch")
    try:
        for app in (hi, lo):
            _stub(app, address)[1]  # registers the schema
        assert ctl(a, "policy", "attach", "interactive", "qos", "--config", "{priority: 10, per_tick: 50, tick_s: 0.01}").returncode == 0
        r = ctl(a, "policy", "attach", "batch", "qos", "--config", "{priority: 0}")
        assert r.returncode == 0, r.stderr
        for app in (hi, lo):
            pb, stub = _stub(app, address)
            for i in range(20):
                assert stub.SayHello(pb.HelloRequest(name=f"q{i}"), timeout=10).message == f"Hello, q{i}!"
        pols = {x["name"]: x["policies"] for x in Control(a.socket).call("policies")["apps"]}
        assert pols["interactive"][0]["name"] == "qos" and pols["batch"][0]["name"] == "qos"
        # one scheduler, both apps its members
        assert json.dumps(pols["interactive"][0]).count("default") >= 1
    finally:
        hi.close()
        lo.close()


def test_admission_control_attaches_and_passes_healthy_traffic(served_policy_env, app_factory, gen_dir, tmp_path):
    a, address = served_policy_env
    load = app_factory("hello_client.py", a, address, "load", "3", "2", gen=gen_dir)
    assert load.readline() == "started"
    r = ctl(a, "policy", "attach", "hello_client.py", "admission", "--config", "{sr_threshold: 0.9, min_requests: 10}")
    assert r.returncode == 0, r.stderr
    code, out, err = load.wait(60)
    attempted, completed, failed = load_counts(out)
    assert failed == 0 and attempted == completed > 0, out
