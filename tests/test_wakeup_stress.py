"""Wake-ups under an unrelated CPU hog: no RPC may stall.

A reviewer once saw what looked like a lost wake-up (an RPC stalled while a process spun
on both cores; not reproduced in 8 reruns). Apps and daemons signal each other's eventfds
only when the other side said it sleeps (native/ring.py: the consumer_sleeping /
producer_waiting flags, each raised, fenced and re-checked before sleeping; the daemon's
poller holds sessions with their flag down and puts them back to sleep with the same
re-check). A lost wake-up there would stall a call until something else moved records
for that app (the daemon) or until a safety-net timeout (the app's rx thread, 0.5 s).

Here: two processes spin (`while True: pass`) on the two cores while a sync client
(threads) and an asyncio client (tasks) make small calls through two daemons, to a sync and
an asyncio server, each call with a deadline that turns a stall into a failure. With the
daemons' adaptive polling (poll_us default) and without it (poll_us: 0, every wake-up
through the eventfds). The deadline is generous (the hogs take half of each core): a call
is "stalled" when it takes seconds, not milliseconds.

`test_no_stall_under_cpu_hogs` runs a few seconds per variant in the default suite;
`test_no_stall_under_cpu_hogs_soak` (marker `soak`, MRPCD_SOAK=1) repeats them for
MRPCD_SOAK_SECONDS (default 180).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from test_fairness import stubs  # noqa: F401  (the module fixture: the Streamer stubs)

DEADLINE_S = 3.0


class Hogs:
    """`n` processes spinning in pure Python (killed on exit)."""

    def __init__(self, n: int = 2) -> None:
        self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]

    def __enter__(self) -> "Hogs":
        return self

    def __exit__(self, *exc) -> None:
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.wait(5)


def run_round(daemon_factory, app_factory, gen, poll_us: int, seconds: float) -> list[dict]:
    config = f"poll_us: {poll_us}\n"
    a, b = daemon_factory("a", config), daemon_factory("b", config)
    sync_srv = app_factory("fair_app.py", b, "serve", gen=gen)
    aio_srv = app_factory("fair_app.py", b, "serve", "--async", gen=gen)
    targets = sync_srv.readline(), aio_srv.readline()
    with Hogs(2):
        # closed-loop callers keep the daemons polling; paced ones (a pause of up to 2 ms
        # after each call) let every side go to sleep between calls: each call then
        # crosses the flag / re-check / eventfd path at every hop
        clients = [app_factory("fair_app.py", a, "hammer", targets[i % 2], str(seconds), conc, kind, str(DEADLINE_S), pause, gen=gen)
                   for i, (kind, conc, pause) in enumerate([("sync", "8", "0"), ("async", "16", "0"), ("async", "4", "2"),
                                                            ("sync", "1", "0"), ("sync", "4", "2"), ("async", "1", "1")])]
        results = []
        for c in clients:
            code, out, err = c.wait(seconds + 60)
            assert code == 0, err
            results.append(json.loads(out.strip().splitlines()[-1]))
    for d in (a, b):
        assert d.alive()
    return results


def check(results: list[dict], label: str) -> None:
    for r in results:
        assert r["calls"] > 0 and r["codes"] == {"OK": r["calls"]}, (label, results)
    print(f"\n{label}: calls {[r['calls'] for r in results]}, slowest {[r['max_s'] for r in results]} s")


@pytest.mark.parametrize("poll_us", [300, 0])
def test_no_stall_under_cpu_hogs(daemon_factory, app_factory, stubs, poll_us):  # noqa: F811
    pb, gen = stubs
    check(run_round(daemon_factory, app_factory, gen, poll_us, 4.0), f"poll_us {poll_us}")


SOAK_S = float(os.environ.get("MRPCD_SOAK_SECONDS", "180"))


@pytest.mark.soak
@pytest.mark.timeout(SOAK_S + 300)
@pytest.mark.skipif(os.environ.get("MRPCD_SOAK") != "1", reason="the long run is `make soak` (MRPCD_SOAK=1)")
def test_no_stall_under_cpu_hogs_soak(daemon_factory, app_factory, stubs):  # noqa: F811
    pb, gen = stubs
    end = time.monotonic() + SOAK_S
    rounds = 0
    while time.monotonic() < end:
        for poll_us in (300, 0):
            check(run_round(daemon_factory, app_factory, gen, poll_us, 10.0), f"round {rounds} poll_us {poll_us}")
        rounds += 1
