"""Apps outlive a restart of their daemon (`systemctl restart mrpcd`, or a crash).

Calls in flight fail UNAVAILABLE (as grpc's do when a server restarts); afterwards channels
connect again through a new session with the daemon (App.successor), wait_for_ready calls
made while it was down go through once it is back, and servers register again and serve
at the same address. An app its user closed stays closed.
"""
from __future__ import annotations

import asyncio
import logging
import signal
import socket
import threading
from pathlib import Path

import pytest

import mrpcd
import mrpcd.aio

from conftest import DaemonProc, wait_until


class Daemons:
    """Daemons that the test stops and starts again at the same control socket."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[DaemonProc] = []

    def start(self, name: str) -> DaemonProc:
        d = DaemonProc(self.tmp, name)
        self.procs.append(d)
        return d

    def restart(self, d: DaemonProc, sig: int = signal.SIGTERM) -> DaemonProc:
        """Stop `d` (SIGKILL: a crash, its socket file left behind) and start a new one."""
        if sig == signal.SIGKILL:
            d.proc.kill()
            d.proc.wait(10)
        d.stop()
        name = Path(d.socket).stem
        return self.start(name)


@pytest.fixture
def daemons(tmp_path):
    ds = Daemons(tmp_path)
    yield ds
    for d in ds.procs:
        d.stop()


def _hello(gen_dir):
    import hello_mrpc

    return hello_mrpc


def _call(stub, hello, name: str, **kw):
    return stub.SayHello(hello.HelloRequest(name=name), timeout=kw.pop("timeout", 5), **kw).message


def _works(stub, hello) -> bool:
    try:
        return _call(stub, hello, "again") == "Hello, again!"
    except mrpcd.RpcError:
        return False


@pytest.mark.parametrize("flavor,sig", [("sync", signal.SIGKILL), ("aio", signal.SIGTERM)])
def test_a_server_app_serves_again_after_its_daemon_restarts(daemons, app_factory, gen_dir, tmp_path, flavor, sig):
    hello = _hello(gen_dir)
    a, b = daemons.start("a"), daemons.start("b")
    cancel_log, started_log = tmp_path / "cancel.log", tmp_path / "started.log"
    args = ["--async"] if flavor == "aio" else ["--cancel-log", str(cancel_log), "--started-log", str(started_log)]
    server = app_factory("hello_server.py", b, *args, gen=gen_dir)
    address = server.readline()
    app = mrpcd.connect(a.socket)
    try:
        stub = hello.GreeterStub(mrpcd.insecure_channel(address, app=app))
        assert _call(stub, hello, "before") == "Hello, before!" + (" (async)" if flavor == "aio" else "")
        slow = None
        if flavor == "sync":  # a call in flight, its handler running
            slow = stub.SayHello.future(hello.HelloRequest(name="slow:60"), timeout=60)
            assert wait_until(started_log.exists, 10)

        b = daemons.restart(b, sig)
        if slow is not None:
            # the call in flight ends UNAVAILABLE, not at its deadline, and its handler is cancelled
            with pytest.raises(mrpcd.RpcError) as info:
                slow.result(timeout=10)
            assert info.value.code() is mrpcd.StatusCode.UNAVAILABLE
            assert wait_until(lambda: cancel_log.exists() and cancel_log.read_text() == "cancelled\n", 10)
        # the server process did not exit: it registered again with the new daemon, at the same port
        expected = "Hello, again!" + (" (async)" if flavor == "aio" else "")
        assert wait_until(lambda: _call_or_none(stub, hello) == expected, 15), b.log()
        assert server.proc.poll() is None
    finally:
        app.close()


def _call_or_none(stub, hello):
    try:
        return _call(stub, hello, "again")
    except mrpcd.RpcError:
        return None


def test_a_sync_client_app_carries_on_after_its_daemon_restarts(daemons, app_factory, gen_dir):
    hello = _hello(gen_dir)
    a, b = daemons.start("a"), daemons.start("b")
    address = app_factory("hello_server.py", b, gen=gen_dir).readline()
    app = mrpcd.connect(a.socket)
    channel = mrpcd.insecure_channel(address, app=app)
    states: list = []
    channel.subscribe(states.append)
    stub = hello.GreeterStub(channel)
    try:
        assert _call(stub, hello, "before") == "Hello, before!"
        a.stop()
        assert wait_until(lambda: app.closed, 10)
        assert app.daemon_lost
        with pytest.raises(mrpcd.RpcError) as info:
            _call(stub, hello, "down")
        assert info.value.code() is mrpcd.StatusCode.UNAVAILABLE
        assert "cannot reach mrpcd" in info.value.details()

        # made while the daemon is down: they wait for it (and for the target), as grpc's do
        waited: list = []
        blocking = threading.Thread(target=lambda: waited.append(_call(stub, hello, "blocking", timeout=30, wait_for_ready=True)))
        blocking.start()
        future = stub.SayHello.future(hello.HelloRequest(name="future"), timeout=30, wait_for_ready=True)
        stream = stub.SayHelloStream(hello.HelloRequest(name="stream", count=2), timeout=30, wait_for_ready=True)
        states.clear()

        daemons.restart(a)
        blocking.join(30)
        assert waited == ["Hello, blocking!"]
        assert future.result(timeout=30).message == "Hello, future!"
        assert [r.message for r in stream] == ["Hello #1, stream!", "Hello #2, stream!"]
        assert _call(stub, hello, "after") == "Hello, after!"
        # the channel moved to the app's successor, a live session with the new daemon
        assert channel.app is app.successor() and channel.app is not app and not channel.app.closed
        assert wait_until(lambda: states and states[-1] is mrpcd.ChannelConnectivity.READY, 5), states
    finally:
        channel.close()
        channel.app.close()
        app.close()


def test_an_asyncio_client_app_carries_on_after_its_daemon_restarts(daemons, app_factory, gen_dir):
    hello = _hello(gen_dir)
    a, b = daemons.start("a"), daemons.start("b")
    address = app_factory("hello_server.py", b, "--async", gen=gen_dir).readline()

    async def main() -> None:
        nonlocal a
        app = mrpcd.aio.connect(a.socket)
        channel = mrpcd.aio.insecure_channel(address, app=app)
        stub = hello.GreeterStub(channel)
        try:
            assert (await stub.SayHello(hello.HelloRequest(name="before"), timeout=5)).message == "Hello, before! (async)"
            await asyncio.get_running_loop().run_in_executor(None, a.stop)
            for _ in range(200):
                if app.closed:
                    break
                await asyncio.sleep(0.05)
            assert app.closed and app.daemon_lost
            with pytest.raises(mrpcd.RpcError) as info:
                await stub.SayHello(hello.HelloRequest(name="down"), timeout=5)
            assert info.value.code() is mrpcd.StatusCode.UNAVAILABLE
            waiting = asyncio.ensure_future(stub.SayHello(hello.HelloRequest(name="waited"), timeout=30, wait_for_ready=True))
            await asyncio.sleep(0.3)
            assert not waiting.done()
            a = await asyncio.get_running_loop().run_in_executor(None, daemons.restart, a)
            assert (await waiting).message == "Hello, waited! (async)"
            replies = [r.message async for r in stub.SayHelloStream(hello.HelloRequest(name="s", count=2), timeout=10)]
            assert replies == ["Hello #1, s! (async)", "Hello #2, s! (async)"]
            assert channel.app is not app and not channel.app.closed
            assert channel.get_state() is mrpcd.ChannelConnectivity.READY
        finally:
            await channel.close()
            channel.app.close()
            app.close()

    asyncio.run(main())


def test_an_app_its_user_closed_does_not_come_back(daemons, gen_dir):
    hello = _hello(gen_dir)
    a = daemons.start("a")
    app = mrpcd.connect(a.socket)
    stub = hello.GreeterStub(mrpcd.insecure_channel("127.0.0.1:9", app=app))
    server = mrpcd.server(app=app)
    app.close()
    assert not app.daemon_lost
    with pytest.raises(mrpcd.RpcError) as info:
        _call(stub, hello, "x", wait_for_ready=True, timeout=3)
    assert info.value.code() is mrpcd.StatusCode.CANCELLED  # at once, not after waiting 3 s
    with pytest.raises(mrpcd.RpcError):
        app.successor()
    assert app._successor is None
    assert not server.wait_for_termination(1)  # terminated, as before


def test_a_server_waits_for_its_address_to_be_free_again(daemons, gen_dir, caplog):
    """The new daemon cannot listen at the server's port (something took it meanwhile):
    the server says so and tries again; once the port is free it serves there."""
    hello = _hello(gen_dir)
    a, b = daemons.start("a"), daemons.start("b")

    class Greeter(hello.GreeterServicer):
        def SayHello(self, request, context):
            return hello.HelloReply(message=f"Hello, {request.name}!")

    server_app = mrpcd.connect(b.socket)
    server = mrpcd.server(app=server_app)
    hello.add_GreeterServicer_to_server(Greeter(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    client_app = mrpcd.connect(a.socket)
    stub = hello.GreeterStub(mrpcd.insecure_channel(f"127.0.0.1:{port}", app=client_app))
    squatter = socket.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # (the killed daemon left TIME_WAIT behind)
    try:
        assert _works(stub, hello)
        b.proc.kill()
        b.proc.wait(10)
        assert wait_until(lambda: server_app.closed, 10)
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        with caplog.at_level(logging.WARNING, logger="mrpcd.server"):
            b = daemons.restart(b)
            assert wait_until(lambda: "cannot serve at 127.0.0.1:%d again yet" % port in caplog.text, 10), caplog.text
        assert not _works(stub, hello)
        assert server.wait_for_termination(0.1)  # still serving (waiting), not terminated
        squatter.close()
        assert wait_until(lambda: _works(stub, hello), 15)
    finally:
        squatter.close()
        server.stop(None)
        client_app.close()
        server.app.close()


def test_a_server_the_new_daemon_refuses_terminates(daemons, gen_dir, caplog):
    """A refusal no retry fixes (here PERMISSION_DENIED) ends the server, so
    wait_for_termination returns and a supervisor can restart the process."""
    hello = _hello(gen_dir)
    b = daemons.start("b")
    app = mrpcd.connect(b.socket)
    server = mrpcd.server(app=app)
    hello.add_GreeterServicer_to_server(hello.GreeterServicer(), server)
    server.add_insecure_port("127.0.0.1:0")
    server.start()

    def refuse() -> mrpcd.App:
        raise mrpcd.RpcError(mrpcd.StatusCode.PERMISSION_DENIED, "not this one")

    app.successor = refuse  # type: ignore[method-assign]
    with caplog.at_level(logging.ERROR, logger="mrpcd.server"):
        b.stop()
        assert not server.wait_for_termination(10)
    assert "cannot serve again after mrpcd restarted: not this one (PERMISSION_DENIED)" in caplog.text


def test_a_call_waiting_for_its_target_waits_on_through_a_daemon_restart(daemons, app_factory, gen_dir):
    """A wait_for_ready call whose server is not up yet is not failed by its daemon going
    away: it waits on with the app's successor until the server is there."""
    hello = _hello(gen_dir)
    a, b = daemons.start("a"), daemons.start("b")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = "127.0.0.1:%d" % s.getsockname()[1]
    app = mrpcd.connect(a.socket)
    channel = mrpcd.insecure_channel(address, app=app)
    stub = hello.GreeterStub(channel)
    try:
        future = stub.SayHello.future(hello.HelloRequest(name="patient"), timeout=40, wait_for_ready=True)
        assert not future.done()
        daemons.restart(a)
        assert wait_until(lambda: app.closed, 10)
        assert not future.done()
        app_factory("hello_server.py", b, "--address", address, gen=gen_dir).readline()
        assert future.result(timeout=30).message == "Hello, patient!"
    finally:
        channel.close()
        channel.app.close()
        app.close()


def test_sync_apps_made_before_their_daemon_starts(daemons, gen_dir, tmp_path, monkeypatch):
    """As grpc makes a channel to anywhere: with no daemon yet, insecure_channel() and
    server() work (an unconnected default app); calls fail UNAVAILABLE or, with
    wait_for_ready, wait; binding says the daemon is missing. Once it runs, all carry on."""
    import mrpcd.app as appmod

    hello = _hello(gen_dir)
    monkeypatch.setenv("MRPCD_SOCKET", str(tmp_path / "later.sock"))
    monkeypatch.setattr(appmod, "_default_app", None)

    class Greeter(hello.GreeterServicer):
        def SayHello(self, request, context):
            return hello.HelloReply(message=f"Hello, {request.name}!")

    server = mrpcd.server()
    hello.add_GreeterServicer_to_server(Greeter(), server)
    with pytest.raises(mrpcd.RpcError) as info:
        server.add_insecure_port("127.0.0.1:0")
    assert info.value.code() is mrpcd.StatusCode.UNAVAILABLE and "cannot reach mrpcd" in info.value.details()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = "127.0.0.1:%d" % s.getsockname()[1]
    channel = mrpcd.insecure_channel(address)
    stub = hello.GreeterStub(channel)
    with pytest.raises(mrpcd.RpcError) as info:
        _call(stub, hello, "early")
    assert info.value.code() is mrpcd.StatusCode.UNAVAILABLE and "cannot reach mrpcd" in info.value.details()
    patient = stub.SayHello.future(hello.HelloRequest(name="patient"), timeout=30, wait_for_ready=True)
    try:
        daemons.start("later")
        server.add_insecure_port(address)
        server.start()
        assert patient.result(timeout=30).message == "Hello, patient!"
        assert _call(stub, hello, "later") == "Hello, later!"
        assert channel.app is server.app is appmod.default_app() and not server.app.closed
    finally:
        server.stop(None)
        channel.close()
        appmod.default_app().close()


def test_asyncio_apps_made_before_their_daemon_starts(daemons, gen_dir, tmp_path, monkeypatch):
    import mrpcd.aio._app as aioapp

    hello = _hello(gen_dir)
    monkeypatch.setenv("MRPCD_SOCKET", str(tmp_path / "later.sock"))
    monkeypatch.setattr(aioapp, "_apps", {})

    class Greeter(hello.GreeterServicer):
        async def SayHello(self, request, context):
            return hello.HelloReply(message=f"Hello, {request.name}!")

    async def main() -> None:
        server = mrpcd.aio.server()
        hello.add_GreeterServicer_to_server(Greeter(), server)
        with pytest.raises(mrpcd.RpcError) as info:
            server.add_insecure_port("127.0.0.1:0")
        assert info.value.code() is mrpcd.StatusCode.UNAVAILABLE
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            address = "127.0.0.1:%d" % s.getsockname()[1]
        channel = mrpcd.aio.insecure_channel(address)
        stub = hello.GreeterStub(channel)
        with pytest.raises(mrpcd.RpcError) as info:
            await stub.SayHello(hello.HelloRequest(name="early"), timeout=5)
        assert info.value.code() is mrpcd.StatusCode.UNAVAILABLE and "cannot reach mrpcd" in info.value.details()
        patient = asyncio.ensure_future(stub.SayHello(hello.HelloRequest(name="patient"), timeout=30, wait_for_ready=True))
        await asyncio.sleep(0.2)
        await asyncio.get_running_loop().run_in_executor(None, daemons.start, "later")
        try:
            server.add_insecure_port(address)
            await server.start()
            assert (await patient).message == "Hello, patient!"
            assert channel.app is server.app and not server.app.closed
        finally:
            await server.stop(None)
            await channel.close()
            server.app.close()

    asyncio.run(main())


def test_closing_an_app_whose_daemon_went_away_ends_its_carrying_on(daemons, gen_dir):
    """The user's close of an app that lost its daemon closes the session its channels
    moved to as well, and no new one is made after that (a wait_for_ready call ends)."""
    hello = _hello(gen_dir)
    a = daemons.start("a")
    app = mrpcd.connect(a.socket)
    stub = hello.GreeterStub(mrpcd.insecure_channel("127.0.0.1:9", app=app))
    a = daemons.restart(a)
    assert wait_until(lambda: app.closed and app.daemon_lost, 10)
    successor = app.successor()
    outcome: list = []

    def wait() -> None:
        try:
            _call(stub, hello, "x", wait_for_ready=True, timeout=30)
        except mrpcd.RpcError as exc:
            outcome.append(exc.code())

    waiter = threading.Thread(target=wait)
    waiter.start()
    assert wait_until(lambda: stub.SayHello._channel.app is successor, 10)
    app.close()
    waiter.join(10)
    assert successor.closed and not app.daemon_lost
    assert outcome and outcome[0] in (mrpcd.StatusCode.CANCELLED, mrpcd.StatusCode.UNAVAILABLE), outcome
    with pytest.raises(mrpcd.RpcError):
        app.successor()
