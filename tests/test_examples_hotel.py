"""examples/hotel end to end (--quick): every system answers every path, the operator's ACL
refuses the blocked reservations with PERMISSION_DENIED, numbers are measured and sane."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / "examples" / "hotel" / "run.py"


@pytest.mark.timeout(180)
def test_hotel_quick(tmp_path):
    pytest.importorskip("grpc", reason="the hotel example's grpcio columns need grpcio")
    r = subprocess.run([sys.executable, str(RUN), "--quick", "--duration", "2", "--no-install", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=170)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "p99 ms" in r.stdout
    doc = json.loads((tmp_path / "hotel.json").read_text())
    by = {res["system"]: res for res in doc["results"]}
    assert set(by) == {"mrpcd", "grpc", "grpc+nginx", "grpc+envoy"}
    for system in ("mrpcd", "grpc"):
        res = by[system]
        assert "error" not in res, res
        # every service answered: each probe path crosses them all, and had its expected outcome
        assert all(p["ok"] for p in res["probes"].values()), res["probes"]
        assert res["probes"]["reserve_blocked_customer"]["code"] == "PERMISSION_DENIED"
        assert res["probes"]["reserve_too_many_rooms"]["code"] == "PERMISSION_DENIED"
        assert res["probes"]["reserve"]["code"] == "OK"
        assert res["completed"] > 20 and res["errors"] == {}
        lat = res["latency"]
        assert 0 < lat["p50_us"] <= lat["p90_us"] <= lat["p99_us"] < 10e6
        assert res["throughput_rps"] > 0
    # on mrpcd it is the operator's policy that refused them, not the service
    assert by["mrpcd"]["acl_counters"].get("denied", 0) >= 2, by["mrpcd"]["acl_counters"]
    assert by["mrpcd"]["acl_counters"].get("allowed", 0) >= 1
    # a sidecar column either ran or says why not
    for system in ("grpc+nginx", "grpc+envoy"):
        assert "probes" in by[system] or by[system]["error"], by[system]
        if "probes" in by[system]:
            assert all(p["ok"] for p in by[system]["probes"].values())
    if doc["png"]:
        assert Path(doc["png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert "matplotlib" in doc["png_missing_reason"]
