"""Schema evolution end to end: real daemons, apps of two versions of one .proto
(tests/evolve/v1 and v2, compatible by field number; wide/ changes field kinds as protobuf
allows: int32 -> int64, string -> bytes, int64 -> int32; bad/ changes a field's type
incompatibly).
Each daemon transcodes what it receives into its own app's layout (marshal/evolve.py)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import mrpcd
from mrpcd.ctl import Control
from mrpcd.status import StatusCode
from conftest import DaemonProc, load_generated, wait_until

HERE = Path(__file__).resolve().parent / "evolve"


@pytest.fixture(scope="module")
def shops(tmp_path_factory):
    mods = {}
    for v in ("v1", "v2", "bad", "wide"):
        out = tmp_path_factory.mktemp(f"evolve_{v}")
        subprocess.run([sys.executable, "-m", "mrpcd.stubgen", str(HERE / v / "shop.proto"), "-I", str(HERE / v),
                        "-o", str(out)], check=True)
        mods[v] = load_generated(out / "shop_mrpc.py", f"evolve_{v}_")
    return mods


@pytest.fixture(scope="module")
def daemons(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evolve_d")
    made = []
    try:
        made.append(DaemonProc(tmp, "a"))
        made.append(DaemonProc(tmp, "b"))
        yield made[0], made[1]
    finally:
        for d in made:
            d.stop()


def servicer(pb, seen: list):
    v2 = hasattr(pb.Order(), "client")

    def who(o):
        return o.client if v2 else o.customer

    def receipt(o, text):
        r = pb.Receipt(text=text, total=o.quantity)
        if v2:
            r.lines.extend(["l1", "l2"])
        return r

    class Shop(pb.OrdersServicer):
        def Place(self, request, context):
            seen.append(request)
            return receipt(request, f"placed for {who(request)}")

        def Watch(self, request, context):
            seen.append(request)
            for i in range(3):
                yield receipt(request, f"watch {i} {who(request)}")

        def Batch(self, request_iterator, context):
            got = list(request_iterator)
            seen.extend(got)
            return pb.Receipt(text=",".join(who(o) for o in got), total=sum(o.quantity for o in got))

        def Chat(self, request_iterator, context):
            for o in request_iterator:
                seen.append(o)
                yield receipt(o, f"chat {who(o)}")

    return Shop()


def run_pair(daemons, server_pb, client_pb, body, name):
    a, b = daemons
    seen: list = []
    sapp, capp = mrpcd.connect(b.socket, name=f"{name}-server"), mrpcd.connect(a.socket, name=f"{name}-client")
    try:
        server = mrpcd.server(app=sapp)
        server_pb.add_OrdersServicer_to_server(servicer(server_pb, seen), server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        stub = client_pb.OrdersStub(mrpcd.Channel(f"127.0.0.1:{port}", capp))
        body(stub, seen)
        return stats(a, f"{name}-client"), stats(b, f"{name}-server")
    finally:
        capp.close()
        sapp.close()


def stats(d, app_name):
    """The daemon's view of its app called `app_name` (mrpcctl apps: stats, routes)."""
    ctl = Control(d.socket)
    try:
        apps = [s for s in ctl.call("apps")["apps"] if s["name"] == app_name]
    finally:
        ctl.sock.close()
    assert len(apps) == 1
    return apps[0]


def test_client_v1_server_v2(shops, daemons):
    v1, v2 = shops["v1"], shops["v2"]

    def body(stub, seen):
        order = v1.Order(customer="ann", quantity=3, item=v1.Item(sku="a", qty=9), note="dropped",
                         items=[v1.Item(sku="b", qty=1)], extras={"x": v1.Item(sku="c", qty=2)})
        r = stub.Place(order, timeout=10)
        assert (r.text, r.total) == ("placed for ann", 3)  # Receipt.lines (new) dropped for v1
        got = seen[-1]
        assert type(got).__name__ == "Order" and got.client == "ann" and got.quantity == 3
        assert (got.priority, got.level) == (0, 0)  # what v1 lacks: v2's defaults
        assert got.item.sku == "a" and got.item.price == 0.0
        assert [i.sku for i in got.items] == ["b"] and got.extras["x"].sku == "c"
        rs = list(stub.Watch(v1.Order(customer="bob", quantity=2), timeout=10))
        assert [(x.text, x.total) for x in rs] == [(f"watch {i} bob", 2) for i in range(3)]
        r = stub.Batch(iter([v1.Order(customer=c, quantity=n) for c, n in (("c", 1), ("d", 5))]), timeout=10)
        assert (r.text, r.total) == ("c,d", 6)
        rs = list(stub.Chat(iter([v1.Order(customer=c, quantity=n) for c, n in (("e", 1), ("f", 2))]), timeout=10))
        assert [(x.text, x.total) for x in rs] == [("chat e", 1), ("chat f", 2)]
        assert [o.client for o in seen[-2:]] == ["e", "f"]

    cli, srv = run_pair(daemons, v2, v1, body, "v1v2")
    assert cli["stats"]["transcoded"] == 7  # responses: 1 + 3 + 1 + 2
    assert srv["stats"]["transcoded"] == 6  # requests: 1 + 1 + 2 + 2
    assert any(r.get("transcoding") for r in srv["routes"])


def test_client_v2_server_v1(shops, daemons):
    v1, v2 = shops["v1"], shops["v2"]

    def body(stub, seen):
        order = v2.Order(client="zed", quantity=4, priority=9, level=v2.Level.HIGH, item=v2.Item(sku="s", price=1.5))
        r = stub.Place(order, timeout=10)
        assert (r.text, r.total, list(r.lines)) == ("placed for zed", 4, [])
        got = seen[-1]
        assert (got.customer, got.quantity, got.note, got.item.sku, got.item.qty) == ("zed", 4, "", "s", 0)
        rs = list(stub.Watch(v2.Order(client="y", quantity=1), timeout=10))
        assert [x.text for x in rs] == [f"watch {i} y" for i in range(3)]
        r = stub.Batch(iter([v2.Order(client="p", quantity=2), v2.Order(client="q", quantity=3)]), timeout=10)
        assert (r.text, r.total) == ("p,q", 5)
        rs = list(stub.Chat(iter([v2.Order(client="g", quantity=4, priority=1)]), timeout=10))
        assert [(x.text, x.total, list(x.lines)) for x in rs] == [("chat g", 4, [])]
        assert seen[-1].customer == "g"
        # a method only v2 has: UNIMPLEMENTED, as between equal schemas
        with pytest.raises(mrpcd.RpcError) as ei:
            stub.Cancel(v2.Order(client="x"), timeout=10)
        assert ei.value.code() == StatusCode.UNIMPLEMENTED

    run_pair(daemons, v1, v2, body, "v2v1")


def test_incompatible_change_is_refused_naming_the_field(shops, daemons):
    v1, bad = shops["v1"], shops["bad"]
    a, b = daemons

    def body(stub, seen):
        with pytest.raises(mrpcd.RpcError) as ei:
            stub.Place(bad.Order(customer="x", quantity=1), timeout=10)
        assert ei.value.code() == StatusCode.FAILED_PRECONDITION
        details = ei.value.details()
        assert "schema mismatch for service shop.Orders: incompatible changes" in details, details
        assert "shop.Order field 2" in details and "'int32 quantity'" in details and "'double quantity'" in details
        assert not seen

    run_pair(daemons, v1, bad, body, "bad")
    assert wait_until(lambda: "shop.Order field 2" in b.log())


def test_widened_kinds_both_ways(shops, daemons):
    """v1 client (int32 quantity, string note) and a wide server (int64, bytes): the
    request's note is converted, its quantity passes as it is; the response's total
    (int32 on the wide side) widens into v1's int64 with no transcoding at all."""
    v1, wide = shops["v1"], shops["wide"]

    def body(stub, seen):
        r = stub.Place(v1.Order(customer="ann", quantity=2**31 - 1, note="h\u00e9"), timeout=10)
        assert (r.text, r.total) == ("placed for ann", 2**31 - 1)
        got = seen[-1]
        assert (got.quantity, got.note) == (2**31 - 1, "h\u00e9".encode())
        rs = list(stub.Chat(iter([v1.Order(customer=c, quantity=-n, note=c) for c, n in (("e", 1), ("f", 2))]), timeout=10))
        assert [(x.text, x.total) for x in rs] == [("chat e", -1), ("chat f", -2)]
        assert [o.note for o in seen[-2:]] == [b"e", b"f"]

    cli, srv = run_pair(daemons, wide, v1, body, "widen-v1wide")
    assert srv["stats"]["transcoded"] == 3  # the requests (their note)
    assert cli["stats"]["transcoded"] == 0  # int32 total -> int64: the peer's bytes as they are


def test_narrowed_value_that_does_not_fit_fails_that_call_only(shops, daemons):
    """A wide client (int64 quantity, bytes note) and a v1 server (int32, string): values
    that fit are converted; 2**40, or a note that is not UTF-8, fails that call with
    INVALID_ARGUMENT naming the field and the value (protobuf would silently truncate, or
    refuse the whole message), and the next call works."""
    v1, wide = shops["v1"], shops["wide"]

    def body(stub, seen):
        r = stub.Place(wide.Order(customer="ok", quantity=-7, note=b"fine"), timeout=10)
        assert (r.text, r.total) == ("placed for ok", -7)
        assert (seen[-1].quantity, seen[-1].note) == (-7, "fine")
        with pytest.raises(mrpcd.RpcError) as ei:
            stub.Place(wide.Order(customer="big", quantity=2**40), timeout=10)
        assert ei.value.code() == StatusCode.INVALID_ARGUMENT
        details = ei.value.details()
        assert "does not fit the server's version of the schema" in details, details
        assert "shop.Order.quantity: value 1099511627776 out of range for int32" in details, details
        with pytest.raises(mrpcd.RpcError) as ei:
            stub.Place(wide.Order(customer="bin", quantity=1, note=b"\xff\xfe"), timeout=10)
        assert ei.value.code() == StatusCode.INVALID_ARGUMENT
        assert "shop.Order.note: bytes b'\\xff\\xfe' are not valid UTF-8" in ei.value.details(), ei.value.details()
        assert stub.Place(wide.Order(customer="next", quantity=2**31 - 1), timeout=10).total == 2**31 - 1
        assert [o.customer for o in seen] == ["ok", "next"]
        # a stream: the message that does not fit ends the call, as any transcoding failure
        # (the first one: no response of the server's can race the failure into the stats)
        with pytest.raises(mrpcd.RpcError) as ei:
            list(stub.Chat(iter([wide.Order(customer="s1", quantity=-2**40), wide.Order(customer="s2", quantity=1)]),
                           timeout=10))
        assert ei.value.code() == StatusCode.INVALID_ARGUMENT and "shop.Order.quantity" in ei.value.details()

    cli, srv = run_pair(daemons, v1, wide, body, "widen-widev1")
    assert srv["stats"]["transcode_failed"] == 3
    assert cli["stats"]["transcoded"] == 2  # the int64 totals into the wide client's int32


def test_narrowed_response_that_does_not_fit_fails_with_internal(shops, daemons):
    """The v1 server's int64 total past 2**31 does not fit the wide client's int32 total:
    that call fails INTERNAL (the client's daemon), naming the field and the value."""
    v1, wide = shops["v1"], shops["wide"]
    a, b = daemons
    sapp, capp = mrpcd.connect(b.socket, name="widen-rsp-server"), mrpcd.connect(a.socket, name="widen-rsp-client")
    try:
        server = mrpcd.server(app=sapp)

        class Shop(v1.OrdersServicer):
            def Place(self, request, context):
                return v1.Receipt(text=request.customer, total=2**40 if request.customer == "big" else 5)

        v1.add_OrdersServicer_to_server(Shop(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        stub = wide.OrdersStub(mrpcd.Channel(f"127.0.0.1:{port}", capp))
        with pytest.raises(mrpcd.RpcError) as ei:
            stub.Place(wide.Order(customer="big"), timeout=10)
        assert ei.value.code() == StatusCode.INTERNAL
        details = ei.value.details()
        assert "does not fit the client's version of the schema" in details, details
        assert "shop.Receipt.total: value 1099511627776 out of range for int32" in details, details
        assert (stub.Place(wide.Order(customer="small"), timeout=10).total) == 5
        assert stats(a, "widen-rsp-client")["stats"]["transcode_failed"] == 1
    finally:
        capp.close()
        sapp.close()


def test_asyncio_client_v1_server_v2(shops, daemons):
    import asyncio

    import mrpcd.aio

    v1, v2 = shops["v1"], shops["v2"]
    a, b = daemons
    seen: list = []

    async def main():
        sapp, capp = mrpcd.aio.connect(b.socket, name="aio-server"), mrpcd.aio.connect(a.socket, name="aio-client")
        try:
            server = mrpcd.aio.server(app=sapp)

            class Shop(v2.OrdersServicer):
                async def Watch(self, request, context):
                    seen.append(request)
                    for i in range(2):
                        yield v2.Receipt(text=f"{request.client}{i}", total=request.quantity, lines=["z"])

            v2.add_OrdersServicer_to_server(Shop(), server)
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            channel = mrpcd.aio.insecure_channel(f"127.0.0.1:{port}", app=capp)
            stub = v1.OrdersStub(channel)
            got = [(r.text, r.total) async for r in stub.Watch(v1.Order(customer="al", quantity=7), timeout=10)]
            assert got == [("al0", 7), ("al1", 7)]
            await channel.close()
            await server.stop(None)
        finally:
            capp.close()
            sapp.close()

    asyncio.run(main())
    assert seen[0].client == "al" and seen[0].priority == 0


def test_a_request_that_does_not_fit_fails_that_call_only(shops, daemons):
    v1, v2 = shops["v1"], shops["v2"]

    def body(stub, seen):
        channel = stub.Place._channel
        raw = channel.unary_unary("/shop.Orders/Place", request_type=v1.Order, response_type=v1.Receipt)
        raw._encode = lambda m: b"\x93\x01\x02\x03"  # a buggy encoder: an array of 3 (v1's Order has 6 fields)
        with pytest.raises(mrpcd.RpcError) as ei:
            raw(v1.Order(), timeout=10)
        assert ei.value.code() == StatusCode.INVALID_ARGUMENT
        assert "does not fit the server's version of the schema" in ei.value.details()
        assert "shop.Order" in ei.value.details()
        assert stub.Place(v1.Order(customer="ok", quantity=1), timeout=10).text == "placed for ok"
        assert [s.client for s in seen] == ["ok"]

    _cli, srv = run_pair(daemons, v2, v1, body, "garbage-req")
    assert srv["stats"]["transcode_failed"] == 1


def test_a_response_that_does_not_fit_fails_with_internal(shops, daemons):
    v1, v2 = shops["v1"], shops["v2"]
    a, b = daemons
    sapp, capp = mrpcd.connect(b.socket, name="garbage-rsp-server"), mrpcd.connect(a.socket, name="garbage-rsp-client")
    try:
        server = mrpcd.server(app=sapp)
        bad = mrpcd.unary_unary_rpc_method_handler(
            lambda req, ctx: v2.Receipt(text=req.client), request_deserializer=v2.Order.FromString,
            response_serializer=lambda r: b"\x91\x01" if r.text == "bad" else r.SerializeToString(),
            request_type=v2.Order, response_type=v2.Receipt)
        server.add_generic_rpc_handlers([mrpcd.method_handlers_generic_handler("shop.Orders", {"Place": bad})])
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        stub = v1.OrdersStub(mrpcd.Channel(f"127.0.0.1:{port}", capp))
        with pytest.raises(mrpcd.RpcError) as ei:
            stub.Place(v1.Order(customer="bad"), timeout=10)
        assert ei.value.code() == StatusCode.INTERNAL
        assert "does not fit the client's version of the schema" in ei.value.details()
        assert stub.Place(v1.Order(customer="good"), timeout=10).text == "good"
        assert stats(a, "garbage-rsp-client")["stats"]["transcode_failed"] == 1
    finally:
        capp.close()
        sapp.close()


def test_big_messages_are_transcoded_not_received_in_place(shops, daemons):
    """A transcoding connection never reads a peer record straight into the app's ring
    (the app must get the transcoded payload, not the peer's bytes)."""
    v1, v2 = shops["v1"], shops["v2"]
    big = "x" * (600 * 1024)

    def body(stub, seen):
        r = stub.Place(v1.Order(customer=big, quantity=2, note=big), timeout=30)
        assert r.text == f"placed for {big}" and r.total == 2
        assert seen[-1].client == big

    cli, srv = run_pair(daemons, v2, v1, body, "big")
    assert srv["stats"]["received_in_place"] == 0 and cli["stats"]["received_in_place"] == 0
    assert srv["stats"]["transcoded"] == 1 and cli["stats"]["transcoded"] == 1


def place_through_reconnect(stub, order_type, seconds: float = 10.0):
    """Place an order, again while the call fails UNAVAILABLE because the daemon closed the
    connection to compare the schemas: (the reply, the failed calls' details)."""
    import time

    end = time.monotonic() + seconds
    failures = []
    while True:
        try:
            return stub.Place(order_type(customer="ann", quantity=3, note="n"), timeout=10), failures
        except mrpcd.RpcError as exc:  # a call made before the client learnt of the close
            assert exc.code() == StatusCode.UNAVAILABLE and time.monotonic() < end, exc
            failures.append(exc.details())
            time.sleep(0.05)


def test_a_service_bound_after_a_peer_of_another_version_connected(shops, daemons):
    """The server app serves shop.Orders (v2) only after a v1 client's connection is up: that
    HELLO never compared the two versions. The daemon used to hand the app the v1 payloads
    as they were ("expected 7 fields, got 6", or silently wrong fields); now it closes that
    connection and the client's next connection is compared and transcoded."""
    v1, v2 = shops["v1"], shops["v2"]
    a, b = daemons
    seen: list = []
    sapp, capp = mrpcd.connect(b.socket, name="late-server"), mrpcd.connect(a.socket, name="late-client")
    try:
        server = mrpcd.server(app=sapp)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        stub = v1.OrdersStub(mrpcd.Channel(f"127.0.0.1:{port}", capp))
        with pytest.raises(mrpcd.RpcError) as ei:
            stub.Place(v1.Order(customer="early", quantity=1), timeout=10)
        assert ei.value.code() == StatusCode.UNIMPLEMENTED
        v2.add_OrdersServicer_to_server(servicer(v2, seen), server)
        r, _ = place_through_reconnect(stub, v1.Order)
        assert (r.text, r.total) == ("placed for ann", 3)
        assert [o.client for o in seen] == ["ann"]
        assert stats(b, "late-server")["stats"]["transcoded"] == 1
    finally:
        capp.close()
        sapp.close()


def test_a_service_neither_hello_named_is_compared_before_its_first_call(shops, daemons):
    """The client's channel connects before its app knows shop.Orders, and the server app
    serves Orders (v2) only after that: neither HELLO named it, so no check on either side
    ever compared v1 with v2, and v1 payloads reached the v2 app as they were. Now the first
    call to it closes that connection (UNAVAILABLE) and the next one, on a new connection
    whose HELLOs name Orders, is compared and transcoded."""
    v1, v2 = shops["v1"], shops["v2"]
    a, b = daemons
    seen: list = []
    sapp, capp = mrpcd.connect(b.socket, name="unnamed-server"), mrpcd.connect(a.socket, name="unnamed-client")
    try:
        server = mrpcd.server(app=sapp)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        channel = mrpcd.Channel(f"127.0.0.1:{port}", capp)
        mrpcd.channel_ready_future(channel).result(timeout=10)  # connected: the client app knows no service yet
        v2.add_OrdersServicer_to_server(servicer(v2, seen), server)
        stub = v1.OrdersStub(channel)
        r, failures = place_through_reconnect(stub, v1.Order)
        assert failures and "reconnect to compare the schemas" in failures[0], failures
        assert (r.text, r.total) == ("placed for ann", 3)
        assert [o.client for o in seen] == ["ann"]
        assert stats(b, "unnamed-server")["stats"]["transcoded"] == 1
    finally:
        capp.close()
        sapp.close()


def test_streams_ending_every_way_leave_no_tracked_calls(shops, daemons):
    """Streams on a transcoding connection cancelled, failed, past their deadline, answered
    early, and 40 at once: every message arrives in the app's layout and the daemons'
    per-connection call tables (mrpcctl apps: tracked_calls) end empty."""
    import threading
    import time

    v1, v2 = shops["v1"], shops["v2"]
    a, b = daemons
    sapp, capp = mrpcd.connect(b.socket, name="st-server"), mrpcd.connect(a.socket, name="st-client")
    try:
        server = mrpcd.server(app=sapp)
        class Shop(v2.OrdersServicer):
            def Watch(self, request, context):
                for i in range(1000):
                    if request.quantity == 1 and i == 2:
                        context.abort(StatusCode.ABORTED, "mid")
                    yield v2.Receipt(text=str(i), total=i)
                    time.sleep(0.005)
            def Batch(self, it, context):
                n = 0
                for o in it:
                    n += 1
                    if o.quantity == 9:
                        context.abort(StatusCode.FAILED_PRECONDITION, "nine")
                    if o.quantity == 8:
                        return v2.Receipt(text="early", total=n)
                return v2.Receipt(text="all", total=n)
            def Chat(self, it, context):
                for o in it:
                    yield v2.Receipt(text=o.client, total=o.quantity)
        v2.add_OrdersServicer_to_server(Shop(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        stub = v1.OrdersStub(mrpcd.Channel(f"127.0.0.1:{port}", capp))
        # server streams cancelled by the client after 2 messages
        for k in range(10):
            it = stub.Watch(v1.Order(customer="c", quantity=0), timeout=10)
            assert next(it).total == 0 and next(it).total == 1
            it.cancel()
        # server streams failing mid-stream
        for k in range(10):
            with pytest.raises(mrpcd.RpcError) as ei:
                list(stub.Watch(v1.Order(customer="c", quantity=1), timeout=10))
            assert ei.value.code() == StatusCode.ABORTED
        # server streams hitting their deadline
        for k in range(5):
            with pytest.raises(mrpcd.RpcError) as ei:
                list(stub.Watch(v1.Order(customer="c", quantity=0), timeout=0.05))
            assert ei.value.code() == StatusCode.DEADLINE_EXCEEDED
        def slow(items, pause=0.02):
            for o in items:
                yield o
                time.sleep(pause)
        # client streams: the server fails / answers early while the client still sends
        for k in range(10):
            with pytest.raises(mrpcd.RpcError) as ei:
                stub.Batch(slow([v1.Order(quantity=1), v1.Order(quantity=9)] + [v1.Order(quantity=1)] * 5), timeout=10)
            assert ei.value.code() == StatusCode.FAILED_PRECONDITION
            r = stub.Batch(slow([v1.Order(quantity=1), v1.Order(quantity=8)] + [v1.Order(quantity=1)] * 5), timeout=10)
            assert r.text == "early"
        # bidi cancelled mid-stream, and deadline mid-stream
        for k in range(10):
            it = stub.Chat(slow([v1.Order(customer=str(i), quantity=i) for i in range(50)]), timeout=10)
            assert next(it).text == "0"
            it.cancel()
        for k in range(5):
            with pytest.raises(mrpcd.RpcError) as ei:
                list(stub.Chat(slow([v1.Order(customer=str(i), quantity=i) for i in range(50)]), timeout=0.1))
            assert ei.value.code() == StatusCode.DEADLINE_EXCEEDED
        # many concurrent
        errs = []
        def one(i):
            try:
                rs = list(stub.Chat(iter([v1.Order(customer=f"{i}-{j}", quantity=j) for j in range(5)]), timeout=20))
                assert [r.text for r in rs] == [f"{i}-{j}" for j in range(5)]
            except Exception as e:
                errs.append(e)
        ts = [threading.Thread(target=one, args=(i,)) for i in range(40)]
        [t.start() for t in ts]; [t.join() for t in ts]
        assert not errs, errs[:3]
        for d, n in ((a, "st-client"), (b, "st-server")):
            assert wait_until(lambda: [r.get("tracked_calls") for r in stats(d, n)["routes"]] == [0]), stats(d, n)["routes"]
            assert stats(d, n)["stats"]["transcode_failed"] == 0
    finally:
        capp.close(); sapp.close()


def test_streams_failing_to_transcode_leave_no_tracked_calls(shops, daemons):
    """A stream message that does not fit fails its call; the peer then never ends that call
    (its caller got the final status, or it was told to CANCEL), so the daemon used to keep
    the call in its table for the connection's life (and past 65,536 of them, pushed live
    calls out: their messages then reached the app untranscoded)."""
    import time

    v1, v2 = shops["v1"], shops["v2"]
    a, b = daemons
    seen: list = []
    sapp, capp = mrpcd.connect(b.socket, name="fail-server"), mrpcd.connect(a.socket, name="fail-client")
    try:
        server = mrpcd.server(app=sapp)

        def batch(it, ctx):
            got = list(it)
            seen.extend(got)
            return v2.Receipt(text="all", total=len(got))

        def watch(req, ctx):
            for i in range(50):
                yield v2.Receipt(text="bad" if i == 2 else "ok", total=i)
                time.sleep(0.01)

        handlers = {
            "Batch": mrpcd.stream_unary_rpc_method_handler(
                batch, request_deserializer=v2.Order.FromString, response_serializer=v2.Receipt.SerializeToString,
                request_type=v2.Order, response_type=v2.Receipt),
            "Watch": mrpcd.unary_stream_rpc_method_handler(
                watch, request_deserializer=v2.Order.FromString,
                response_serializer=lambda r: b"\x91\x01" if r.text == "bad" else r.SerializeToString(),
                request_type=v2.Order, response_type=v2.Receipt),
        }
        server.add_generic_rpc_handlers([mrpcd.method_handlers_generic_handler("shop.Orders", handlers)])
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        channel = mrpcd.Channel(f"127.0.0.1:{port}", capp)

        def slow(items):
            for o in items:
                yield o
                time.sleep(0.02)

        raw = channel.stream_unary("/shop.Orders/Batch", request_type=v1.Order, response_type=v1.Receipt)
        raw._encode = lambda m: b"\x93\x01\x02\x03" if m.quantity == 9 else m.SerializeToString()  # does not fit
        for first in (9, 1):  # the first message does not fit / the third does
            with pytest.raises(mrpcd.RpcError) as ei:
                raw(slow([v1.Order(quantity=first)] + [v1.Order(quantity=9 if i == 1 else 1) for i in range(6)]), timeout=10)
            assert ei.value.code() == StatusCode.INVALID_ARGUMENT
        stub = v1.OrdersStub(channel)
        for _ in range(2):
            got = []
            with pytest.raises(mrpcd.RpcError) as ei:
                for r in stub.Watch(v1.Order(customer="x"), timeout=10):
                    got.append(r.total)
            assert ei.value.code() == StatusCode.INTERNAL and got == [0, 1]
        assert stub.Batch(iter([v1.Order(quantity=1)] * 3), timeout=10).total == 3  # the connection goes on
        assert len(seen) == 3  # nothing of the failed calls reached the app
        for d, n, failed in ((a, "fail-client", 2), (b, "fail-server", 2)):
            assert wait_until(lambda: [r.get("tracked_calls") for r in stats(d, n)["routes"]] == [0]), stats(d, n)["routes"]
            assert stats(d, n)["stats"]["transcode_failed"] == failed
    finally:
        capp.close()
        sapp.close()


def test_inbound_acl_reads_fields_in_the_apps_layout(shops, daemons):
    """An inbound ACL on the v2 server's datapath names v2's field (client); the v1 caller's
    customer (same number) is transcoded before the policy reads it, on a START and on a
    later message of a client stream."""
    import time

    v1, v2 = shops["v1"], shops["v2"]
    a, b = daemons
    seen = []
    sapp, capp = mrpcd.connect(b.socket, name="acl-server"), mrpcd.connect(a.socket, name="acl-client")
    try:
        server = mrpcd.server(app=sapp)
        v2.add_OrdersServicer_to_server(servicer(v2, seen), server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        ctl = Control(b.socket)
        rules = [{"method": m, "field": "client", "op": "prefix", "value": "eve", "action": "deny"} for m in ("/shop.Orders/Place", "/shop.Orders/Batch")]
        ctl.call("policy_attach", app="acl-server", policy="acl", config={"direction": "inbound", "default": "allow", "rules": rules})
        ctl.sock.close()
        stub = v1.OrdersStub(mrpcd.Channel(f"127.0.0.1:{port}", capp))
        assert stub.Place(v1.Order(customer="ann", quantity=1), timeout=10).text == "placed for ann"
        with pytest.raises(mrpcd.RpcError) as ei:
            stub.Place(v1.Order(customer="eve-1", quantity=1), timeout=10)
        assert ei.value.code() == StatusCode.PERMISSION_DENIED

        def slow(items):
            for o in items:
                yield o; time.sleep(0.02)
        for k in range(3):
            with pytest.raises(mrpcd.RpcError) as ei:
                stub.Batch(slow([v1.Order(customer="ok"), v1.Order(customer="eve")] + [v1.Order(customer="z")] * 5), timeout=10)
            assert ei.value.code() == StatusCode.PERMISSION_DENIED and "rule 1" in ei.value.details()
        assert seen[0].client == "ann" and not [o for o in seen if o.client.startswith("eve")]
        for d, n in ((a, "acl-client"), (b, "acl-server")):
            assert wait_until(lambda: [r.get("tracked_calls") for r in stats(d, n)["routes"]] == [0]), stats(d, n)["routes"]
    finally:
        capp.close(); sapp.close()


def test_transport_upgrade_in_the_middle_of_a_transcoded_stream(shops, daemons, tmp_path):
    """Both daemons swap their transport code while a bidi stream between v1 and v2 is open:
    the connection keeps its peer's closure and plans, and the stream goes on transcoded."""
    import queue

    v1, v2 = shops["v1"], shops["v2"]
    a, b = daemons
    module = tmp_path / "evolve_transport.py"
    module.write_text("from mrpcd.transports._tcp import PeerConnection as _Current\n\n\n"
                      "class PeerConnection(_Current):\n    VERSION = 'evolve-2'\n")
    seen: list = []
    sapp, capp = mrpcd.connect(b.socket, name="upg-server"), mrpcd.connect(a.socket, name="upg-client")
    try:
        server = mrpcd.server(app=sapp)
        v2.add_OrdersServicer_to_server(servicer(v2, seen), server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        stub = v1.OrdersStub(mrpcd.Channel(f"127.0.0.1:{port}", capp))
        q: queue.Queue = queue.Queue()

        def requests():
            while True:
                o = q.get()
                if o is None:
                    return
                yield o

        q.put(v1.Order(customer="before", quantity=1))
        it = stub.Chat(requests(), timeout=30)
        assert next(it).text == "chat before"
        for d in (a, b):
            ctl = Control(d.socket)
            try:
                assert ctl.call("transport_upgrade", module=str(module))["version"] == "evolve-2"
            finally:
                ctl.sock.close()
        q.put(v1.Order(customer="after", quantity=2))
        r = next(it)
        assert (r.text, r.total) == ("chat after", 2)
        q.put(None)
        assert list(it) == []
        assert [o.client for o in seen] == ["before", "after"]
        assert stub.Place(v1.Order(customer="new", quantity=3), timeout=10).text == "placed for new"
        routes = stats(b, "upg-server")["routes"]
        assert [r["transport"] for r in routes] == ["evolve-2"] and routes[0]["transcoding"]
    finally:
        capp.close()
        sapp.close()


def test_two_versions_on_each_daemon(shops, daemons):
    """Daemon b hosts a v1 and a v2 server app, daemon a a v1 and a v2 client app; each
    client calls both servers: four connections, two of them transcoding, one answer each."""
    v1, v2 = shops["v1"], shops["v2"]
    a, b = daemons
    apps = []
    try:
        ports = {}
        for v, pb in (("v1", v1), ("v2", v2)):
            sapp = mrpcd.connect(b.socket, name=f"two-server-{v}")
            apps.append(sapp)
            server = mrpcd.server(app=sapp)
            pb.add_OrdersServicer_to_server(servicer(pb, []), server)
            ports[v] = server.add_insecure_port("127.0.0.1:0")
            server.start()
        for v, pb in (("v1", v1), ("v2", v2)):
            capp = mrpcd.connect(a.socket, name=f"two-client-{v}")
            apps.append(capp)
            channels = [mrpcd.Channel(f"127.0.0.1:{ports[sv]}", capp) for sv in ("v1", "v2")]  # (kept open)
            for sv, channel in zip(("v1", "v2"), channels):
                stub = pb.OrdersStub(channel)
                order = pb.Order(customer="c", quantity=5) if v == "v1" else pb.Order(client="c", quantity=5)
                rs = list(stub.Watch(order, timeout=10))
                assert [(r.text, r.total) for r in rs] == [(f"watch {i} c", 5) for i in range(3)], (v, sv)
            routes = stats(a, f"two-client-{v}")["routes"]
            assert sorted(bool(r.get("transcoding")) for r in routes) == [False, True]
    finally:
        for app in apps:
            app.close()



@pytest.mark.parametrize("direction", ["request", "response"])
def test_stream_messages_too_big_for_the_apps_ring_leave_no_tracked_calls(shops, daemon_factory, direction):
    """A peer's stream message bigger than the receiving app's ring fails that call on a
    transcoding connection (RESOURCE_EXHAUSTED) both ways; the peer then never ends the call,
    so it must leave the connection's call table."""
    import time

    v1, v2 = shops["v1"], shops["v2"]
    small, big = "ring_size: 65536\n", "ring_size: 1048576\n"
    huge = "x" * (100 << 10)
    request = direction == "request"
    sd, cd = daemon_factory("evs", small if request else big), daemon_factory("evc", big if request else small)
    sapp, capp = mrpcd.connect(sd.socket, name="ring-server"), mrpcd.connect(cd.socket, name="ring-client")
    try:
        server = mrpcd.server(app=sapp)

        class Shop(v2.OrdersServicer):
            def Batch(self, it, context):
                return v2.Receipt(text="all", total=len(list(it)))

            def Watch(self, request, context):
                for i in range(20):
                    yield v2.Receipt(text=huge if i == 1 else "ok", total=i)

            def Place(self, request, context):
                return v2.Receipt(text="placed", total=request.quantity)

        v2.add_OrdersServicer_to_server(Shop(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        stub = v1.OrdersStub(mrpcd.Channel(f"127.0.0.1:{port}", capp))
        for _ in range(2):
            with pytest.raises(mrpcd.RpcError) as ei:
                if request:
                    def orders():  # the rest comes after the caller got its status: no request END
                        yield v1.Order(customer="a", quantity=1)
                        yield v1.Order(customer=huge, quantity=1)
                        for _ in range(3):
                            time.sleep(0.2)
                            yield v1.Order(customer="b")

                    stub.Batch(orders(), timeout=10)
                else:
                    list(stub.Watch(v1.Order(customer="a"), timeout=10))
            assert ei.value.code() == StatusCode.RESOURCE_EXHAUSTED, ei.value.details()
            assert "ring" in ei.value.details()
        assert stub.Place(v1.Order(customer="ok", quantity=1), timeout=10).text == "placed"
        for d, n in ((cd, "ring-client"), (sd, "ring-server")):
            assert wait_until(lambda: [r.get("tracked_calls") for r in stats(d, n)["routes"]] == [0]), stats(d, n)["routes"]
    finally:
        capp.close()
        sapp.close()


BOOM_POLICY = '''
from mrpcd.marshal import records as R
from mrpcd.policies.metrics import POLICY as _Base


class Boom(_Base):
    def inbound(self, batch):
        for r in batch:  # a buggy policy: raises on the second message of a request stream
            if r.kind == R.REQUEST and not r.flags & R.F_START and not r.flags & R.F_NO_MSG:
                raise RuntimeError("boom")
        return super().inbound(batch)


POLICY = Boom
'''


def test_calls_failed_by_a_raising_policy_leave_no_tracked_calls(shops, daemons, tmp_path):
    """A policy that raises fails its batch's calls both ways (fail_calls); the peer then
    never ends them, so they must leave a transcoding connection's call table."""
    import time

    v1, v2 = shops["v1"], shops["v2"]
    a, b = daemons
    module = tmp_path / "evolve_boom.py"
    module.write_text(BOOM_POLICY)
    sapp, capp = mrpcd.connect(b.socket, name="boom-server"), mrpcd.connect(a.socket, name="boom-client")
    try:
        server = mrpcd.server(app=sapp)
        v2.add_OrdersServicer_to_server(servicer(v2, []), server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        ctl = Control(b.socket)
        try:
            ctl.call("policy_attach", app="boom-server", policy=str(module), config={})
        finally:
            ctl.sock.close()
        stub = v1.OrdersStub(mrpcd.Channel(f"127.0.0.1:{port}", capp))

        def orders():  # the rest comes after the caller got its status: no request END
            yield v1.Order(customer="a", quantity=1)
            yield v1.Order(customer="b", quantity=1)
            for _ in range(3):
                time.sleep(0.2)
                yield v1.Order(customer="c")

        for _ in range(2):
            with pytest.raises(mrpcd.RpcError) as ei:
                stub.Batch(orders(), timeout=10)
            assert ei.value.code() == StatusCode.INTERNAL and "boom" in ei.value.details(), ei.value.details()
        assert stub.Place(v1.Order(customer="ok", quantity=1), timeout=10).text == "placed for ok"
        assert wait_until(lambda: [r.get("tracked_calls") for r in stats(b, "boom-server")["routes"]] == [0]), \
            stats(b, "boom-server")["routes"]
    finally:
        capp.close()
        sapp.close()
