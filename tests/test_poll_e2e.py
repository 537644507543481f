"""Adaptive wake-ups on live daemons (mrpcd/daemon/poller.py): calls flow while the daemons
poll their apps' rings, an idle daemon stops polling, `poll_us: 0` and a live reload turn
it off. The window logic itself is tested sans-I/O in test_poller.py."""
from __future__ import annotations

import signal
import time

from mrpcd.ctl import Control

from conftest import wait_until


def daemon_stats(d) -> dict:
    return Control(d.socket).call("stats")["daemon"]


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / 100.0  # utime + stime, in clock ticks of 10 ms


def run_calls(a, b, app_factory, gen_dir, n: int = 300) -> None:
    server = app_factory("hello_server.py", b, gen=gen_dir)
    address = server.readline()
    code, out, err = app_factory("hello_client.py", a, address, "unary", str(n), gen=gen_dir).wait()
    assert code == 0, err
    assert out.strip() == f"ok {n}"


def test_polling_daemons_serve_calls_then_go_quiet(two_daemons, app_factory, gen_dir):
    a, b = two_daemons  # the embedded default: poll_us 300
    run_calls(a, b, app_factory, gen_dir)
    sa, sb = daemon_stats(a), daemon_stats(b)
    assert sa["poll_ticks"] > 0 and sb["poll_ticks"] > 0
    # sequential calls: some record reached a daemon while it polled (no eventfd needed)
    assert sa["poll_hits"] + sb["poll_hits"] > 0, (sa, sb)
    # traffic over: the windows end and nothing ticks any more (no busy loop while idle)
    time.sleep(0.3)
    ticks = [daemon_stats(d)["poll_ticks"] for d in (a, b)]
    cpu = [cpu_seconds(d.pid) for d in (a, b)]
    time.sleep(1.0)
    assert [daemon_stats(d)["poll_ticks"] for d in (a, b)] == ticks
    assert all(cpu_seconds(d.pid) - c < 0.1 for d, c in zip((a, b), cpu))


def test_poll_off_still_serves_and_never_ticks(daemon_factory, app_factory, gen_dir):
    a, b = daemon_factory("a", config="poll_us: 0\n"), daemon_factory("b", config="poll_us: 0\n")
    run_calls(a, b, app_factory, gen_dir, 100)
    for d in (a, b):
        s = daemon_stats(d)
        assert (s["poll_ticks"], s["poll_hits"], s["poll_window_us"]) == (0, 0, 0), s


def test_poll_us_reload_turns_polling_off(daemon_factory, app_factory, gen_dir):
    a, b = daemon_factory("a", config="poll_us: 200\n"), daemon_factory("b", config="poll_us: 200\n")
    assert daemon_stats(a)["poll_window_us"] == 200
    for d in (a, b):
        with open(d.socket.rsplit(".", 1)[0] + ".yaml", "w") as f:
            f.write("poll_us: 0\n")
        d.proc.send_signal(signal.SIGHUP)
    assert wait_until(lambda: all(daemon_stats(d)["poll_window_us"] == 0 for d in (a, b)), 10), a.log()
    ticks = [daemon_stats(d)["poll_ticks"] for d in (a, b)]
    run_calls(a, b, app_factory, gen_dir, 50)
    assert [daemon_stats(d)["poll_ticks"] for d in (a, b)] == ticks


def test_bad_poll_us_is_refused_with_the_line(daemon_factory):
    import pytest

    with pytest.raises(RuntimeError, match=r"poll_us: must be an integer from 0 to 100000"):
        daemon_factory("bad", config="poll_us: -5\n")
