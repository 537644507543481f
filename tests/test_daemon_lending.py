"""The daemon's zero-copy send: big payloads go from an app's tx ring to the socket as
Leases, and the ring space comes back, in order, only when the socket layer let go.

What must hold: the bytes a peer gets are the bytes the app sent (big and small records
mixed, many calls at once, sockets full so leases stay out); ring space is never reused
while a socket may still read it (a finished lease refuses new readers); an app that dies
with payloads still lent is reclaimed without crashing the daemon.
"""
from __future__ import annotations

import collections
import mmap
import signal
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mrpcd.ctl import Control
from mrpcd.marshal import records as R
from mrpcd.native.ring import CONTROL_SIZE, Ring

from conftest import wait_until


def new_ring(capacity: int) -> Ring:
    return Ring(mmap.mmap(-1, CONTROL_SIZE + capacity), 0, capacity, init=True)


def rec(call_id: int, payload: bytes, meta: bytes = b"") -> bytes:
    return R.encode_record(R.REQUEST, R.F_START | R.F_END, 0, 1, call_id, 5, 0, meta, payload)


# -- Lease ----------------------------------------------------------------------------------

def take(ring: Ring, big_min: int = 4096):
    return R.ring_take_records(ring, 64, 1 << 20, 1 << 24, big_min)


def test_big_payloads_are_leases_and_the_wire_bytes_are_unchanged():
    r = new_ring(1 << 16)
    meta = R.encode_metadata([("k", "v")])
    sent = [rec(1, b"s" * 10), rec(2, b"B" * 20000, meta), rec(3, b"t" * 30)]
    r.push_many(sent)
    recs, bad, extent, leases = take(r)
    assert not bad and len(recs) == 3 and len(leases) == 1
    assert type(recs[1].payload) is R.Lease and len(recs[1].payload) == 20000
    assert recs[1].meta == meta  # header and metadata are private copies
    bufs, nbytes = R.wire_buffers(recs)
    assert b"".join(bufs) == b"".join(sent) and nbytes == sum(map(len, sent))
    assert r.used_bytes() == extent  # nothing freed before the caller says so
    R.ring_release_bytes(r, extent)
    assert r.empty()


def test_lease_reports_back_when_the_last_reader_lets_go_and_then_refuses_readers():
    r = new_ring(1 << 16)
    r.push(rec(1, b"x" * 10000))
    (record,), _bad, extent, (lease,) = take(r)
    view = memoryview(lease).cast("b")  # what uvloop does with a buffer it must keep
    back = []
    assert lease.seal(lambda: back.append(True)) is False
    assert back == [] and lease.exports == 1
    del view
    assert back == [True] and lease.done
    with pytest.raises(BufferError):
        memoryview(lease)
    with pytest.raises(BufferError):
        bytes(record.payload)


def test_lease_sealed_with_no_reader_is_back_at_once_and_is_read_only():
    r = new_ring(1 << 16)
    r.push(rec(1, b"y" * 10000))
    _recs, _bad, _extent, (lease,) = take(r)
    assert bytes(lease) == b"y" * 10000
    with pytest.raises(TypeError):
        memoryview(lease).cast("b")[0:1] = b"z"  # the view is read-only
    back = []
    assert lease.seal(lambda: back.append(1)) is True and back == [1]
    with pytest.raises(RuntimeError):
        lease.seal(lambda: None)


def test_a_header_the_app_scribbles_after_the_take_cannot_change_the_framing():
    mm = mmap.mmap(-1, CONTROL_SIZE + (1 << 16))
    r = Ring(mm, 0, 1 << 16, init=True)
    original = rec(7, b"P" * 10000)
    r.push(original)
    recs, _bad, extent, _leases = take(r)
    # the app rewrites its record in place after the daemon took it: other lengths,
    # other ids, other payload bytes (the record starts after the ring's 8-byte header)
    start = CONTROL_SIZE + 8
    mm[start:start + len(original)] = R.encode_record(R.REQUEST, 0, 0, 99, 99, 99, 0, b"", b"Q" * 9000) + b"\0" * 1000
    bufs, nbytes = R.wire_buffers(recs)
    wire = b"".join(bytes(b) for b in bufs)
    assert wire[:R.HEADER_SIZE] == original[:R.HEADER_SIZE]  # the private snapshot
    assert nbytes == len(wire) == len(original)  # framing intact: only the app's own bytes changed
    R.ring_release_bytes(r, extent)


# -- take_more / release_bytes against a model ------------------------------------------------

@settings(max_examples=200)
@given(ops=st.lists(st.one_of(
    st.tuples(st.just("push"), st.integers(0, 3000)),
    st.tuples(st.just("take"), st.integers(1, 6)),
    st.tuples(st.just("free")),
), max_size=60))
def test_takes_are_freed_in_order_and_never_before(ops):
    cap = 1 << 13
    r = new_ring(cap)
    queued: collections.deque[bytes] = collections.deque()  # pushed, not yet taken
    extents: collections.deque[int] = collections.deque()
    seq = 0
    for op in ops:
        if op[0] == "push":
            seq += 1
            data = (seq.to_bytes(4, "little") * (op[1] // 4 + 1))[: op[1]]
            if r.push(data):
                queued.append(data)
        elif op[0] == "take":
            got, extent = r.take_more(max_records=op[1], big_min=1000)
            assert [bytes(g) for g in got] == [queued.popleft() for _ in got]
            if extent:
                extents.append(extent)
        elif extents:
            used = r.used_bytes()
            n = extents.popleft()
            r.release_bytes(n)
            assert r.used_bytes() == used - n
    while extents:
        r.release_bytes(extents.popleft())
    got, extent = r.take_more(max_records=10_000, big_min=1000)
    assert [bytes(g) for g in got] == list(queued)
    r.release_bytes(extent)
    assert r.empty()
    with pytest.raises(ValueError):
        r.release_bytes(8)


# -- through real daemons --------------------------------------------------------------------



def lent(daemon) -> int:
    apps = Control(daemon.socket).call("stats")["apps"]
    return sum(s.get("lent_payloads", 0) for s in apps.values())


def test_big_and_small_calls_at_once_arrive_byte_exact(two_daemons, app_factory, gen_dir):
    a, b = two_daemons
    server = app_factory("hello_server.py", b, gen=gen_dir)
    address = server.readline()
    client = app_factory("hello_client.py", a, address, "bulk", "40", "8", gen=gen_dir)
    assert client.readline(60) == "started"
    seen_a = seen_b = 0
    end = time.monotonic() + 120
    while client.proc.poll() is None and time.monotonic() < end:
        seen_a, seen_b = max(seen_a, lent(a)), max(seen_b, lent(b))
        time.sleep(0.01)
    code, out, err = client.wait(10)
    assert code == 0, err
    assert out.strip().splitlines()[-1] == "ok bulk 320"
    assert seen_a > 0  # the requests' payloads went out from the client's ring
    assert seen_b > 0  # and the echoed replies from the server's ring


def test_client_killed_with_payloads_lent_is_reclaimed(two_daemons, app_factory, gen_dir):
    a, b = two_daemons
    server = app_factory("hello_server.py", b, gen=gen_dir)
    address = server.readline()
    # warm up: the first outgoing connection makes the loop open a few lasting fds of its own
    assert app_factory("hello_client.py", a, address, "bulk", "1", "1", gen=gen_dir).wait(60)[0] == 0
    assert wait_until(lambda: Control(a.socket).call("apps")["apps"] == [], 20.0)
    time.sleep(0.2)  # the control connection of that call is gone too
    baseline = a.fd_count()
    client = app_factory("hello_client.py", a, address, "bulk", "200", "8", gen=gen_dir)
    assert client.readline(60) == "started"
    time.sleep(0.3)
    client.proc.send_signal(signal.SIGKILL)
    client.proc.wait(10)
    assert wait_until(lambda: Control(a.socket).call("apps")["apps"] == [], 20.0)
    # (a control call's own connection closes asynchronously: count fds without one)
    assert wait_until(lambda: a.fd_count() <= baseline, 20.0), f"{a.fd_count()} fds, {baseline} before"
    assert a.alive() and b.alive()
    # the daemons still serve
    code, out, err = app_factory("hello_client.py", a, address, "bulk", "3", "2", gen=gen_dir).wait(60)
    assert code == 0, err


def test_policy_attached_and_detached_while_payloads_are_lent(two_daemons, app_factory, gen_dir):
    """Attaching a content-reading policy while big payloads are out switches the app to
    the copying pop only after they are back; every call still arrives byte-exact, and
    the ACL (which reads the request's name) runs on what is popped from then on."""
    a, b = two_daemons
    server = app_factory("hello_server.py", b, gen=gen_dir)
    address = server.readline()
    client = app_factory("hello_client.py", a, address, "bulk", "700", "8", gen=gen_dir)
    assert client.readline(60) == "started"
    ctl = Control(a.socket)
    rules = [{"method": "/helloworld.Greeter/SayHello", "field": "name", "op": "prefix", "value": "DENY-", "action": "deny"}]
    cycles = 0
    for _ in range(5):  # bounded; each cycle only while the client still runs
        if client.proc.poll() is not None:
            break
        try:
            ctl.call("policy_attach", app="hello_client.py", policy="acl",
                     config={"direction": "outbound", "default": "allow", "rules": rules})
            time.sleep(0.05)
            ctl.call("policy_detach", app="hello_client.py", name="acl")
        except Exception:
            assert client.proc.poll() is not None  # only because the client finished meanwhile
            break
        cycles += 1
        time.sleep(0.05)
    assert cycles >= 1
    code, out, err = client.wait(120)
    assert code == 0, err
    assert out.strip().splitlines()[-1] == "ok bulk 5600"


class _LendingSession:
    """What AppSession._drain_tx and its lending helpers use of their session."""

    def __init__(self, ring: Ring) -> None:
        from types import SimpleNamespace

        from mrpcd.daemon.session import AppSession

        self.tx, self.closed = ring, False
        self.config = SimpleNamespace(max_record=1 << 24)
        self.datapath = SimpleNamespace(engines=[])
        self._lent, self._lent_bytes = collections.deque(), 0
        self.stats = {"lent_payloads": 0, "tx_ring_full": 0}
        self.app_waker = SimpleNamespace(signal=lambda: None)
        self.loop = SimpleNamespace(time=time.monotonic, call_later=lambda delay, fn: SimpleNamespace(cancel=lambda: None))
        self._stall_timer = None
        self.pending: list = []  # nothing waits for the app's rx ring
        self.sent: list = []
        self.pumps = 0
        for name in ("_drain_tx", "_lend", "_lease_back", "_free_returned", "_check_lent_stall"):
            setattr(self, name, getattr(AppSession, name).__get__(self))

    def _handle_outbound(self, recs, bad=()) -> None:
        # the socket layer: reads each lent payload (an export, held until it lets go)
        self.sent.extend((r, memoryview(r.payload)) for r in recs)

    def _schedule_pump(self) -> None:
        self.pumps += 1


def test_empty_takes_while_a_payload_is_lent_add_nothing_to_track():
    """With a payload still lent, the pump finds the ring empty again and again (a peer
    slow to take it): each empty take used to add an empty entry to the lent list."""
    ring = new_ring(1 << 20)
    sess = _LendingSession(ring)
    assert ring.push(rec(1, b"x" * (200 << 10)))
    sess._drain_tx()
    [(_, view)] = sess.sent
    assert len(sess._lent) == 1
    for _ in range(5):
        sess._drain_tx()
    assert len(sess._lent) == 1
    view.release()  # the socket took it: the ring space comes back
    assert not sess._lent and ring.empty()
