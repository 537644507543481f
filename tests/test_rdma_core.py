"""RDMA transport, sans-I/O parts: credits, framing, registration/SGE plans, channel cores
wired through a simulated RC link (reliable, in order, finite receive buffers)."""
from __future__ import annotations

import random
from collections import deque

import pytest
from hypothesis import given, settings, strategies as st

from mrpcd.marshal.records import REQUEST, F_START, encode_record
from mrpcd.transports.rdma.channel import ChannelCore, ProtocolError
from mrpcd.transports.rdma.credits import CreditError, CreditWindow
from mrpcd.transports.rdma.framing import (
    MSG_HEADER_SIZE, OP_CREDIT, OP_DATA, FramingError, OutStream, Segment, decode_header, encode_header,
)
from mrpcd.transports.rdma.plan import (
    ACCESS_LOCAL_WRITE, PlanError, plan_message, recv_buffer_offsets, registration_plan,
)


RING = bytes(random.Random(1).getrandbits(8) for _ in range(4096))


def rec(call_id: int, size: int) -> bytes:
    return encode_record(REQUEST, F_START, 0, 0, call_id, 7, 0, b"", bytes([call_id % 251]) * size)


# ------------------------------------------------------------------------ credits

def test_credit_window_basics():
    cw = CreditWindow(4, 3, threshold=2)
    assert cw.send_credits == 3 and cw.can_send_data()
    assert cw.take_for_data() == 0 and cw.take_for_data() == 0
    assert not cw.can_send_data()           # the last credit is reserved for updates
    with pytest.raises(RuntimeError):
        cw.take_for_data()
    assert cw.take_for_update() == 0 and cw.send_credits == 0
    with pytest.raises(RuntimeError):
        cw.take_for_update()
    cw.on_message(True, 3)                  # peer returns all three
    assert cw.send_credits == 3 and cw.granted == 3
    cw.on_reposted()
    assert not cw.wants_update(False)       # 1 pending < threshold 2
    cw.on_message(True, 0)
    cw.on_reposted()
    assert cw.wants_update(False) and not cw.wants_update(True)
    assert cw.take_for_data() == 2          # piggy-backed
    assert cw.pending_return == 0 and cw.granted == 4


def test_credit_violations_are_clear():
    cw = CreditWindow(3, 3, threshold=2)
    cw.on_message(False, 0)
    cw.on_message(False, 0)
    with pytest.raises(CreditError, match="reserved credit"):
        cw.on_message(True, 0)
    cw.on_message(False, 0)
    with pytest.raises(CreditError, match="without credit"):
        cw.on_message(False, 0)
    with pytest.raises(CreditError, match="returned 5 credits but only 0"):
        CreditWindow(3, 3).on_message(True, 5)
    for t in (1, 4):
        with pytest.raises(ValueError, match="threshold"):
            CreditWindow(4, 4, threshold=t)
    with pytest.raises(ValueError, match="recv_buffers"):
        CreditWindow(2, 4)


def test_held_credits_are_not_returned():
    cw = CreditWindow(4, 4, threshold=2)
    for _ in range(2):
        cw.on_message(True, 0)
        cw.on_reposted()
    cw.held = True
    assert not cw.wants_update(False) and cw.take_for_data() == 0
    cw.held = False
    assert cw.wants_update(False) and cw.take_for_data() == 2


# ------------------------------------------------------------------------ framing

def test_header_checks():
    assert decode_header(encode_header(OP_DATA, 3, 2) + b"ab") == (OP_DATA, 3, 2)
    assert decode_header(encode_header(OP_CREDIT, 9, 0)) == (OP_CREDIT, 9, 0)
    for bad, msg in [(b"\x01\x00", "shorter"), (encode_header(9, 0, 0), "unknown message op"),
                     (encode_header(OP_DATA, 0, 5) + b"ab", "says 5 data bytes"),
                     (encode_header(OP_DATA, 0, 0), "no data"),
                     (encode_header(OP_CREDIT, 0, 1) + b"x", "CREDIT message carries"),
                     (b"\x01\x01" + encode_header(OP_DATA, 0, 1)[2:] + b"x", "reserved")]:
        with pytest.raises(FramingError, match=msg):
            decode_header(bad)


@settings(max_examples=150, deadline=None)
@given(sizes=st.lists(st.integers(0, 3000), min_size=1, max_size=12),
       room=st.integers(24, 900), max_sge=st.integers(2, 6), regmask=st.integers(0, 4095))
def test_outstream_take_covers_exactly_and_respects_sge(sizes, room, max_sge, regmask):
    ring = RING
    regions = {"ring": ring}
    stream, expect = OutStream(), b""
    for i, n in enumerate(sizes):
        if regmask >> i & 1:
            seg = Segment("ring", 7 * i, min(n, 4096 - 7 * i))
        else:
            seg = Segment(bytes([i]) * n, 0, n)
        stream.push(seg)
        expect += bytes(seg.view(regions))
    got = b""
    slot = room + MSG_HEADER_SIZE
    while stream:
        segs = stream.take(room, max_sge)
        assert segs and sum(s.length for s in segs) <= room
        sges, copies = plan_message(0, segs, slot_size=slot, max_sge=max_sge, max_msg=slot)
        assert len(sges) <= max_sge
        # materialise the message from the SGE list, as the NIC would
        send = bytearray(slot)
        for off, seg in copies:
            send[off:off + seg.length] = seg.view(regions)
        wire = b"".join(bytes(send[s.offset:s.offset + s.length]) if s.region == "send"
                        else ring[s.offset:s.offset + s.length] for s in sges)
        assert len(wire) == MSG_HEADER_SIZE + sum(s.length for s in segs)
        got += wire[MSG_HEADER_SIZE:]
    assert got == expect and stream.bytes == 0


def test_plan_message_limits():
    with pytest.raises(PlanError, match="SGEs"):
        plan_message(0, [Segment("ring", 0, 1), Segment("ring", 5, 1)], slot_size=64, max_sge=2, max_msg=64)
    with pytest.raises(PlanError, match="exceeds the limit"):
        plan_message(0, [Segment("ring", 0, 100)], slot_size=64, max_sge=4, max_msg=64)
    with pytest.raises(PlanError, match="send slot"):
        plan_message(0, [Segment(b"x" * 100, 0, 100)], slot_size=64, max_sge=4, max_msg=512)


def test_registration_plan():
    plan = {r.name: r for r in registration_plan(recv_buffers=8, buf_size=4096, send_slots=4, ring_size=1 << 20)}
    assert plan["recv"].length == 8 * 4096 and plan["recv"].access == ACCESS_LOCAL_WRITE
    assert plan["send"].access == 0 and plan["ring"].access == 0 and plan["ring"].length == 1 << 20
    assert "ring" not in {r.name for r in registration_plan(recv_buffers=3, buf_size=256, send_slots=1)}
    assert recv_buffer_offsets(3, 256) == [0, 256, 512]
    for kw, msg in [({"recv_buffers": 2}, "at least 3"), ({"buf_size": 100}, "multiple of 64"),
                    ({"send_slots": 0}, "send slot"), ({"ring_size": 0}, "positive")]:
        args = dict(recv_buffers=4, buf_size=256, send_slots=2) | kw
        with pytest.raises(PlanError, match=msg):
            registration_plan(**args)


# ------------------------------------------------------------------------ simulated link

class Side:
    def __init__(self, n_recv, peer_n, buf, max_sge=4, sq=4):
        self.core = ChannelCore(recv_buffers=n_recv, peer_recv_buffers=peer_n, peer_buf_size=buf,
                                max_msg=buf, max_sge=max_sge, max_inline=64)
        self.posted = n_recv            # receive buffers posted
        self.sq_free = sq               # send queue / slot room
        self.inflight = deque()         # SENDs on the wire toward the peer (RC: in order)
        self.unprocessed = deque()      # completions received, not yet handled
        self.got = []

    def pump(self):
        for m in self.core.poll(self.sq_free):
            self.sq_free -= 1
            body = b"".join(bytes(s.view()) for s in m.segments)
            assert len(body) == m.length and m.size <= self.core.msg_limit
            self.inflight.append(m.header + body)


def deliver(src: Side, dst: Side):
    msg = src.inflight.popleft()
    assert dst.posted > 0, "RNR: a SEND arrived with no receive buffer posted (credit bug)"
    dst.posted -= 1
    src.sq_free += 1                    # send completion
    dst.unprocessed.append(msg)


def process(side: Side):
    msg = side.unprocessed.popleft()
    side.got.extend(side.core.on_message(msg))
    side.posted += 1
    side.core.reposted()


@settings(max_examples=300, deadline=None)
@given(seed=st.integers(0, 2**32), n_a=st.integers(3, 6), n_b=st.integers(3, 6),
       buf=st.sampled_from([64, 100, 256]),
       sizes_a=st.lists(st.integers(0, 300), max_size=25), sizes_b=st.lists(st.integers(0, 300), max_size=25))
def test_random_interleavings_lose_nothing_and_never_deadlock(seed, n_a, n_b, buf, sizes_a, sizes_b):
    rnd = random.Random(seed)
    a, b = Side(n_a, n_b, buf), Side(n_b, n_a, buf)
    want_a = [rec(i, n) for i, n in enumerate(sizes_a)]   # a → b
    want_b = [rec(1000 + i, n) for i, n in enumerate(sizes_b)]
    todo_a, todo_b = list(want_a), list(want_b)
    for step in range(20000):
        actions = []
        if todo_a: actions.append("qa")
        if todo_b: actions.append("qb")
        if a.inflight: actions.append("da")
        if b.inflight: actions.append("db")
        if a.unprocessed: actions.append("pa")
        if b.unprocessed: actions.append("pb")
        if not actions:
            break
        act = rnd.choice(actions)
        if act == "qa":
            k = rnd.randint(1, len(todo_a)); a.core.send_records(todo_a[:k]); del todo_a[:k]
        elif act == "qb":
            k = rnd.randint(1, len(todo_b)); b.core.send_records(todo_b[:k]); del todo_b[:k]
        elif act == "da": deliver(a, b)
        elif act == "db": deliver(b, a)
        elif act == "pa": process(a)
        elif act == "pb": process(b)
        a.pump(); b.pump()
        for s in (a, b):
            cw = s.core.credits
            assert cw.send_credits >= 0 and cw.granted >= 0 and cw.pending_return >= 0
    else:
        pytest.fail("did not quiesce")
    # quiescent: every record arrived once, in order, and no credit is lost
    assert [r.encode() for r in b.got] == want_a
    assert [r.encode() for r in a.got] == want_b
    assert a.core.queued_bytes == b.core.queued_bytes == 0
    for s, peer in ((a, b), (b, a)):
        cw = s.core.credits
        # everything we ever spent is either back or waiting in the peer's pending returns
        assert cw.send_credits + peer.core.credits.pending_return == cw.peer_buffers
        assert cw.granted + cw.pending_return == cw.recv_buffers


def test_one_way_stream_gets_credit_updates():
    a, b = Side(4, 4, 128), Side(4, 4, 128)
    recs = [rec(i, 50) for i in range(200)]
    a.core.send_records(recs)
    for _ in range(5000):
        a.pump(); b.pump()
        if a.inflight: deliver(a, b)
        if b.inflight: deliver(b, a)
        if b.unprocessed: process(b)
        if a.unprocessed: process(a)
        if not (a.inflight or b.inflight or a.unprocessed or b.unprocessed or a.core.queued_bytes):
            break
    assert [r.encode() for r in b.got] == recs
    assert b.core.messages_out > 0 and b.got and not a.got   # b only sent credit updates


def test_peer_violations_fail_the_channel():
    c = ChannelCore(recv_buffers=3, peer_recv_buffers=3, peer_buf_size=256, max_msg=256, max_sge=2)
    r = rec(1, 10)
    c.on_message(encode_header(OP_DATA, 0, len(r)) + r)
    c.on_message(encode_header(OP_DATA, 0, len(r)) + r)
    with pytest.raises(ProtocolError, match="reserved credit"):
        c.on_message(encode_header(OP_DATA, 0, len(r)) + r)
    with pytest.raises(ConnectionError, match="failed earlier"):
        c.send_records([r])
    c = ChannelCore(recv_buffers=4, peer_recv_buffers=3, peer_buf_size=256, max_msg=256, max_sge=2)
    bad = r + b"\xff" * 40
    with pytest.raises(ProtocolError, match="malformed record") as ei:
        c.on_message(encode_header(OP_DATA, 0, len(bad)) + bad)
    assert [x.encode() for x in ei.value.records] == [r]
    c = ChannelCore(recv_buffers=4, peer_recv_buffers=3, peer_buf_size=256, max_msg=256, max_sge=2)
    with pytest.raises(ProtocolError, match="returned 3 credits"):
        c.on_message(encode_header(OP_CREDIT, 3, 0))


def test_inline_flag_and_message_limit():
    c = ChannelCore(recv_buffers=8, peer_recv_buffers=8, peer_buf_size=4096, max_msg=1024, max_sge=4, max_inline=100)
    c.send_records([rec(1, 10)])
    (m,) = c.poll(8)
    assert m.inline and m.size == MSG_HEADER_SIZE + 50
    c.send_records([rec(2, 3000)])
    msgs = c.poll(8)
    assert all(x.size <= 1024 for x in msgs) and not any(x.inline for x in msgs)
    assert sum(x.length for x in msgs) == 3040
