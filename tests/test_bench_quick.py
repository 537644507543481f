"""`examples/bench/run.py --quick` end to end: the harness runs and writes valid JSON.

A smoke test of the benchmark harness, not of speed: no timing is asserted. mrpcd and grpcio
always run; the sidecar pairs run when nginx / envoy are installed here, else their test is
skipped with the reason the harness found (CI does not install them: `make bench` does).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "examples" / "bench"
sys.path.insert(0, str(BENCH))

pytest.importorskip("grpc", reason="grpcio is not installed (it comes with grpcio-tools)")


def run_quick(tmp_path: Path, systems: str) -> dict:
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(BENCH / "run.py"), "--quick", "--no-install", "--no-plot",
                        "--systems", systems, "--out", str(out)],
                       capture_output=True, text=True, timeout=110, cwd=ROOT)
    assert (out / "bench.json").exists(), f"no bench.json; rc={r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    report = json.loads((out / "bench.json").read_text())
    assert report["errors"] == [], report["errors"]
    assert r.returncode == 0, r.stderr[-3000:]
    return report


def check_points(report: dict, system: str, flavors: list[str]) -> None:
    for flavor in flavors:
        got = {(x["kind"], x["size"], x["concurrency"]) for x in report["results"]
               if x["system"] == system and x["flavor"] == flavor}
        assert ("latency", 64, 1) in got, (system, flavor, got)
        for x in report["results"]:
            if x["system"] == system and x["flavor"] == flavor:
                assert x["calls"] > 0 and x["errors"] == 0, x
                if x["kind"] == "latency":
                    assert len(x["latency_us"]) == x["calls"] and x["p50_us"] <= x["p99_us"]


def test_quick_mrpcd_grpc_policy(tmp_path: Path) -> None:
    report = run_quick(tmp_path, "mrpcd,mrpcd+policy,grpc")
    assert report["mode"] == "quick"
    check_points(report, "mrpcd", ["sync", "aio"])
    check_points(report, "grpc", ["sync", "aio"])
    # The policy chain either ran (attached with mrpcctl) or says why not: never a made-up number.
    if "mrpcd+policy" in report["unavailable"]:
        assert report["policy_chain"].startswith("policy chain:")
        assert not [x for x in report["results"] if x["system"] == "mrpcd+policy"]
    else:
        assert [p["policy"] for p in report["policy_chain"]] == ["metrics", "acl", "ratelimit"]
        check_points(report, "mrpcd+policy", ["aio"])
    assert report["baselines"]["socket_stream"]["goodput_Bps"] > 0
    # the 1 MiB target's reference: the median of the socket measured right after each mrpcd
    # flavor ran and at the end of the run
    socks = [report["baselines"][k]["goodput_Bps"] for k in
             ("socket_stream_after_mrpcd_sync", "socket_stream_after_mrpcd_aio", "socket_stream")]
    assert min(socks) > 0 and report["baselines"]["socket_reference"]["goodput_Bps"] == sorted(socks)[1]
    targets = {t["target"]: t for t in report["targets"]}
    for flavor in ("sync", "aio"):
        assert targets[f"1MiB goodput c=32 mrpcd-{flavor} vs plain socket"]["peer"] == sorted(socks)[1]
    floor = report["baselines"]["design_floor"]
    assert floor["messages"] > 0 and floor["bytes"] == floor["messages"] * (1 << 20)
    assert {c["what"] for c in report["context"]} >= {"1MiB design floor vs plain socket"}
    idle = report["baselines"]["idle_cpu"]
    assert idle["window_s"] > 0 and idle["daemon_A"]["cpu_pct"] >= 0
    ratios = {(r["kind"], r["size"], r["mrpcd"], r["peer"]) for r in report["ratios"]}
    assert ("latency", 64, "mrpcd/sync", "grpc/sync") in ratios
    assert {t["target"] for t in report["targets"]} >= {"64B p50 mrpcd-sync vs grpc-sync", "daemon idle CPU"}


def test_quick_sidecars(tmp_path: Path) -> None:
    import sidecars

    available = []
    reasons = []
    for name, find in (("grpc+nginx", sidecars.find_nginx), ("grpc+envoy", sidecars.find_envoy)):
        path, why = find(False)
        (available.append(name) if path else reasons.append(f"{name}: {why}"))
    if not available:
        pytest.skip("no sidecar proxy installed here (`make bench` installs them): " + "; ".join(reasons))
    report = run_quick(tmp_path, ",".join(available))
    for name in available:
        check_points(report, name, ["sync"])


def test_bad_system_is_refused() -> None:
    r = subprocess.run([sys.executable, str(BENCH / "run.py"), "--quick", "--systems", "mrpcd,nope"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "unknown system" in r.stderr


def test_loadgen_rejects_bad_jobs() -> None:
    import loadgen

    with pytest.raises(ValueError, match="kind"):
        loadgen.check_job({"id": "x", "kind": "nap", "size": 1, "concurrency": 1, "warmup_s": 0, "duration_s": 1,
                           "max_calls": 1})
    with pytest.raises(ValueError, match="concurrency"):
        loadgen.check_job({"id": "x", "kind": "latency", "size": 1, "concurrency": 0, "warmup_s": 0,
                           "duration_s": 1, "max_calls": 1})
