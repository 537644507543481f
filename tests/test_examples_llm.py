"""examples/llm end to end (--quick): VTC gives the light clients a larger share of the
model than first-come-first-served, the per-client rate limit holds the heavy client, and
a client cancel / an expired deadline at the gateway stops the model server's generation.

Measured on the 2-vCPU dev VM (4 s runs, the test's): light clients' share of the weighted
service 5.5-7% without a policy, 72% with vtc + ratelimit (heavy/light service ratio
27-34 -> 0.8). With vtc alone the quick run lands in one of two modes, as VTC's lift
decides: the light clients stay backlogged (share 30%, ratio 3.1-4.5), or each of their
calls arrives to an empty queue of theirs and is lifted to the heavy client's counter,
losing ties to its older queued calls (share 12-15%, ratio 11.2-14.5; 7 of 10 runs). The
assertions hold for both modes with a margin: the share must grow by 1.4x and the ratio
shrink by 1.5x (no policy against vtc: 1.75x and 1.86x at the worst seen).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / "examples" / "llm" / "run.py"


@pytest.mark.timeout(150)
def test_llm_quick(tmp_path):
    r = subprocess.run([sys.executable, str(RUN), "--quick", "--duration", "4", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=140)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "light clients' share" in r.stdout
    doc = json.loads((tmp_path / "llm.json").read_text())
    runs = {run["run"]: run for run in doc["runs"]}
    none, vtc, limited = runs["none"], runs["vtc"], runs["vtc+ratelimit"]
    for run in runs.values():
        for name, c in run["clients"].items():
            assert c["output_tokens"] > 0, (run["run"], name, c)
            assert c["errors"] == {}, (run["run"], name, c)
    # VTC: the light clients' share grows, the heavy/light gap shrinks
    assert vtc["light_share"] > 1.4 * none["light_share"], (none["light_share"], vtc["light_share"])
    assert vtc["heavy_to_light_ratio"] < none["heavy_to_light_ratio"] / 1.5, (none["heavy_to_light_ratio"], vtc["heavy_to_light_ratio"])
    # the policy's own counters are reported, per client
    assert set(vtc["vtc"]) >= {"heavy", "light-1", "light-2"}
    assert all(v["admitted"] > 0 for v in vtc["vtc"].values())
    assert none["vtc"] == {}
    # the rate limit holds the heavy client to its quota (1 generation/s, burst 1): the model
    # server's VTC saw at most that many of its generations (its 12 open calls wait in the policy)
    rate = doc["ratelimit_config"]["rate"]
    assert limited["vtc"]["heavy"]["admitted"] <= doc["duration_s"] * rate + 2, limited["vtc"]["heavy"]
    assert limited["clients"]["heavy"]["output_tokens_per_s"] < vtc["clients"]["heavy"]["output_tokens_per_s"]
    # cancellation reached the model server and it stopped generating
    cc, dl = doc["cancellation"]["client_cancel"], doc["cancellation"]["deadline"]
    assert cc["tokens_received"] == 5 and cc["model"]["cancelled"] == 1, cc
    assert cc["model"]["tokens"] < 400 and cc["model"]["tokens_not_generated"] > 0, cc
    assert dl["code"] == "DEADLINE_EXCEEDED" and dl["model"]["cancelled"] == 1, dl
    assert dl["model"]["tokens"] < 400, dl
