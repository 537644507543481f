"""A peer that stops reading must not grow the daemons' memory without bound.

Why: the daemon is shared by every app on the host. When a server app hangs (here: SIGSTOP),
its daemon stops reading the socket once the records waiting for the app's ring pass
`max_pending_records` or `max_pending_bytes`, and the client daemon's socket buffer fills.
Before these limits, the client daemon kept taking the app's small requests out of its ring
into the socket's write buffer (and the server daemon kept up to 65,536 records of any size
in memory), so a client that kept calling a hung backend — each call timing out, the next
one sent — grew the daemons by every request it ever made. Now a new call to a peer with
more than `max_peer_backlog` bytes already queued fails at once with UNAVAILABLE; when the
peer reads again, calls succeed again. On the serving side, a calling peer that does not
read its answers is not read from either, past the same limit, until it takes them.
"""
from __future__ import annotations

import functools
import json
import types
import signal
import time

KIB = 1024


def private_kib(pid: int) -> int:
    """Private resident memory (VmRSS - RssShmem): heap, Python objects, buffers."""
    vals = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "RssShmem"):
                vals[key] = int(rest.split()[0])
    return vals["VmRSS"] - vals["RssShmem"]


def test_calls_to_a_hung_server_fail_fast_and_the_daemons_stay_bounded(daemon_factory, app_factory, gen_dir):
    a = daemon_factory("a", "max_peer_backlog: 4194304\n")
    b = daemon_factory("b", "max_pending_bytes: 4194304\n")
    server = app_factory("hello_server.py", b, gen=gen_dir)
    target = server.readline()
    first = app_factory("hello_client.py", a, target, "unary", "1", gen=gen_dir)
    assert first.wait()[0] == 0  # the service works, and the connection A -> B is up
    base_a, base_b = private_kib(a.pid), private_kib(b.pid)

    server.proc.send_signal(signal.SIGSTOP)  # hung: reads nothing, answers nothing
    try:
        # 6,000 calls × 32 KiB = 188 MiB asked of a peer that reads nothing
        flood = app_factory("hello_client.py", a, target, "flood", "6000", str(32 * KIB), "256", gen=gen_dir)
        code, out, err = flood.wait(120)
        assert code == 0, err
        seen = json.loads(out.strip().splitlines()[-1])
        grown_a, grown_b = private_kib(a.pid) - base_a, private_kib(b.pid) - base_b
        # the limits (4 MiB each, plus socket and ring buffers) keep both daemons far below it
        assert grown_a < 64 * KIB and grown_b < 64 * KIB, (grown_a, grown_b, seen)
        assert set(seen) <= {"UNAVAILABLE", "DEADLINE_EXCEEDED"}, seen
        assert seen.get("UNAVAILABLE", [0])[0] > 0 and "max_peer_backlog" in seen["UNAVAILABLE"][1], seen
    finally:
        server.proc.send_signal(signal.SIGCONT)
    # the server reads again: what was queued drains, and new calls succeed
    deadline = time.monotonic() + 60
    while True:
        again = app_factory("hello_client.py", a, target, "status", "back", gen=gen_dir)
        code, out, err = again.wait(60)
        if out.strip() == "OK" or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert out.strip() == "OK", (out, err)
    assert a.alive() and b.alive()


class _Conn:
    def __init__(self, backlog: int) -> None:
        self.backlog = backlog

    def write_backlog(self) -> int:
        return self.backlog


class _Session:
    """What AppSession._check_backlog uses of its session."""

    def __init__(self, limit: int) -> None:
        self.config = types.SimpleNamespace(max_peer_backlog=limit)
        self.stats = {"peer_backlog_refused": 0}
        self.name = "t"
        self.delivered: list = []
        self.datapath = types.SimpleNamespace(inbound=self.delivered.extend)

    def log_fields(self, **more):
        return more

    def _deliver_in(self, batch):
        self.delivered.extend(batch)


def test_backlog_refusal_drops_the_rest_of_a_refused_stream_and_passes_calls_already_going():
    from test_policies_support import cancel, half_close, msg, start, unary

    from mrpcd.daemon.session import AppSession, Route
    from mrpcd.marshal import records as R

    sess, conn = _Session(limit=100), _Conn(backlog=50)
    route = Route(1, conn, "client", "peer:1", frozenset(), None)
    check = functools.partial(AppSession._check_backlog, sess)
    # under the limit: everything goes
    assert [r.call_id for r in check(route, [start(1), unary(2)])] == [1, 2]
    conn.backlog = 100  # the peer stopped reading
    out = check(route, [msg(1), start(3), unary(4), msg(3), cancel(5)])
    assert [(r.call_id, r.kind) for r in out] == [(1, R.REQUEST), (5, R.CANCEL)]  # call 1 was going
    assert [(r.call_id, r.status) for r in sess.delivered] == [(3, 14), (4, 14)]  # UNAVAILABLE
    assert sess.stats["peer_backlog_refused"] == 2 and list(route.refused) == [3]
    conn.backlog = 0  # reading again: new calls go, refused stream 3 stays dropped until it ends
    out = check(route, [msg(3), half_close(3), start(6)])
    assert [r.call_id for r in out] == [6] and not route.refused


async def _greedy_peer(port: int, calls: int, size: int, b_pid: int) -> tuple[int, int]:
    """A peer daemon that sends `calls` calls and does not read their answers for 3 s, then
    reads them all. Returns (growth of B's private memory while we did not read, answers)."""
    import asyncio

    from mrpcd.marshal import records as R
    from mrpcd.marshal.schema import method_id
    from mrpcd.transports import tcp

    import hello_mrpc

    conn = await tcp.connect("127.0.0.1", port, {})
    answers: list = []
    conn.set_handlers(lambda recs: answers.extend(r for r in recs if r.kind == R.RESPONSE and r.flags & R.F_END),
                      lambda exc: None)
    conn.pause_reading()
    base = private_kib(b_pid)
    mid = method_id("/helloworld.Greeter/SayHello")
    payload = hello_mrpc.HelloRequest(name="x" * size).SerializeToString()
    for i in range(calls):
        conn.send(R.encode_record(R.REQUEST, R.F_START | R.F_END, 0, 0, i + 1, mid, 0, b"", payload))
        if i % 64 == 63:
            await asyncio.sleep(0)  # let the loop write what it can
    await asyncio.sleep(3)
    grown = private_kib(b_pid) - base
    conn.resume_reading()
    for _ in range(600):  # up to 60 s for every answer
        if len(answers) >= calls:
            break
        await asyncio.sleep(0.1)
    ok = sum(1 for r in answers if r.status == 0)
    conn.close()
    return grown, ok


def test_a_peer_that_does_not_read_its_answers_is_not_read_either(daemon_factory, app_factory, gen_dir):
    """Server side: a calling peer that never takes its answers (they echo its 32 KiB
    requests) would grow the server's daemon by every answer; past max_peer_backlog it stops
    reading that peer's calls instead, and once the peer reads again every call is answered."""
    import asyncio

    b = daemon_factory("b", "max_peer_backlog: 1048576\nmax_pending_bytes: 1048576\n")
    server = app_factory("hello_server.py", b, gen=gen_dir)
    port = int(server.readline().rpartition(":")[2])
    calls = 3000  # × 32 KiB = 94 MiB of answers
    grown, ok = asyncio.run(_greedy_peer(port, calls, 32 * KIB, b.pid))
    assert grown < 48 * KIB, grown
    assert ok == calls  # nothing lost: every call answered once the peer read
    assert "does not read its answers" in b.log()
    assert b.alive()


def test_a_peer_that_stops_reading_lent_answers_is_cut_and_the_app_goes_on(daemon_factory, app_factory, gen_dir):
    """Big answers go to the socket straight from the server app's tx ring, whose space is
    freed in order: a calling peer that stops reading them would hold up every answer the
    app sends, to anyone. After `peer_stall_timeout` without taking a byte its connection is
    closed (its leases come back) and the other peer's calls are answered."""
    import asyncio

    from mrpcd.ctl import Control
    from test_in_place import _peer, _wait_for, reply_text, say_hello

    b = daemon_factory("b", "peer_stall_timeout: 1\n")
    server = app_factory("hello_server.py", b, gen=gen_dir)
    port = int(server.readline().rpartition(":")[2])
    big = "s" * (200 << 10)  # answers of ~200 KiB: lent from the ring

    async def main() -> None:
        stalled, _ = await _peer(port)
        stalled.transport.pause_reading()  # takes nothing from now on (nor sees its close)
        for call_id in range(1, 121):  # 24 MiB of answers: more than the sockets and the ring hold
            stalled.send(say_hello(call_id, big))
        await asyncio.sleep(0.5)
        healthy, answers = await _peer(port)
        for call_id in range(1, 6):
            healthy.send(say_hello(call_id, "h" * (100 << 10)))
        await _wait_for(answers, range(1, 6), 20)
        assert sorted(answers) == [1, 2, 3, 4, 5]
        assert all(reply_text(answers[i]) == "Hello, " + "h" * (100 << 10) + "!" for i in answers)
        healthy.close()
        stalled.close()

    asyncio.run(main())
    [stats] = Control(b.socket).call("stats")["apps"].values()
    assert stats["peer_stalled"] == 1
    assert "has taken none of the" in b.log() and b.alive()


def test_the_stall_check_cuts_only_a_peer_that_takes_nothing():
    """_check_lent_stall, on a fake session and clock: of two connections holding the oldest
    lent take, the one whose peer keeps taking bytes (slowly) stays; the one that takes
    none for peer_stall_timeout is closed; nothing is closed with the timeout at 0."""
    from mrpcd.daemon.session import STALL_CHECK_S, AppSession, Route

    class Conn:
        def __init__(self) -> None:
            self.closed, self.taken, self.backlog = False, 0, 1 << 20

        def bytes_taken(self) -> int:
            return self.taken

        def write_backlog(self) -> int:
            return self.backlog

        def abort(self) -> None:
            self.closed = True

    for timeout in (2.0, 0.0):
        now = [100.0]
        slow, stuck = Conn(), Conn()
        sess = types.SimpleNamespace(
            closed=False, name="app", stats={"peer_stalled": 0}, config=types.SimpleNamespace(peer_stall_timeout=timeout),
            loop=types.SimpleNamespace(time=lambda: now[0], call_later=lambda d, f: None),
            routes={1: Route(1, slow, "server", "slow:1", frozenset(), None),
                    2: Route(2, stuck, "server", "stuck:1", frozenset(), None)},
            log_fields=lambda **kw: kw)
        sess._lent = __import__("collections").deque([[1 << 20, 2, now[0], {1, 2}]])
        check = sess._check_lent_stall = functools.partial(AppSession._check_lent_stall, sess)
        for _ in range(int(5 / STALL_CHECK_S)):  # five seconds of checks
            now[0] += STALL_CHECK_S
            slow.taken += 1000  # a slow reader: some bytes every time
            check()
        assert not slow.closed
        assert stuck.closed is (timeout > 0) and sess.stats["peer_stalled"] == (1 if timeout else 0)


def test_a_pump_that_fails_is_retried_then_the_app_dropped(caplog):
    """An unexpected error while moving an app's records (a bug, not its ring) left its
    pump unscheduled: the app's sends stalled for good. Now it is retried at once, and
    after PUMP_FAILURES_MAX failures in a row the app is dropped (its calls fail loudly)."""
    from mrpcd.daemon.session import PUMP_FAILURES_MAX, AppSession

    for fails in (1, PUMP_FAILURES_MAX):
        left = [fails]
        dropped: list = []

        def drain_tx() -> bool:
            if left[0]:
                left[0] -= 1
                raise RuntimeError("a bug")
            return True

        sess = types.SimpleNamespace(closed=False, name="app", pid=1, pending=None, _pump_scheduled=False,
                                     _pump_failures=0, _drain_tx=drain_tx, log_fields=lambda **kw: kw,
                                     poller=types.SimpleNamespace(hold=lambda s: True),
                                     daemon=types.SimpleNamespace(drop_session=lambda s, why: dropped.append(why)))
        scheduled = []
        sess._schedule_pump = lambda: scheduled.append(1)
        pump = functools.partial(AppSession._pump, sess)
        for _ in range(fails + 1):
            if dropped:
                break
            pump()
        if fails < PUMP_FAILURES_MAX:
            assert not dropped and len(scheduled) == fails and sess._pump_failures == 0  # recovered
        else:
            assert dropped and "internal error" in dropped[0] and len(scheduled) == fails - 1
    assert "moving its records failed" in caplog.text
