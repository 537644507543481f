"""mrpcd.health.v1: grpc's health service, built in, used as grpcio-health-checking's
grpc_health.v1 is (the import is the only change). Sync and asyncio servers behind daemon
B, clients behind daemon A, all in this process; every read has a deadline, so a bug fails
a call instead of hanging the test. What is checked besides the answers: an ended Watch
leaves nothing behind (its watcher is dropped, its worker thread / task is free again)."""
from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import threading
from concurrent import futures
from pathlib import Path

import pytest

import mrpcd
import mrpcd.aio
from mrpcd.health.v1 import _core, health, health_pb2, health_pb2_grpc

from conftest import DaemonProc, load_generated, wait_until

HEALTH_DIR = Path(health.__file__).resolve().parent
Status = health_pb2.HealthCheckResponse
SERVING, NOT_SERVING, SERVICE_UNKNOWN = Status.SERVING, Status.NOT_SERVING, Status.SERVICE_UNKNOWN


@pytest.fixture(scope="module")
def daemons(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("health")
    made: list[DaemonProc] = []
    try:
        made.append(DaemonProc(tmp, "a"))
        made.append(DaemonProc(tmp, "b"))
        yield made[0], made[1]
    finally:
        for d in made:
            d.stop()


@contextlib.contextmanager
def sync_health(daemons, servicer, max_workers=4):
    """(server, HealthStub, client app): `servicer` on a sync server behind B, a stub on a
    channel from an app behind A."""
    a, b = daemons
    srv_app = mrpcd.connect(b.socket, name="health-server")
    cli_app = mrpcd.connect(a.socket, name="health-client")
    try:
        server = mrpcd.server(futures.ThreadPoolExecutor(max_workers=max_workers), app=srv_app)
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        with mrpcd.insecure_channel(f"127.0.0.1:{port}", app=cli_app) as channel:
            yield server, health_pb2_grpc.HealthStub(channel), port
        server.stop(None)
    finally:
        cli_app.close()
        srv_app.close()


@contextlib.asynccontextmanager
async def aio_health(daemons, servicer):
    """(server, HealthStub): `servicer` on an asyncio server behind B, a stub behind A."""
    a, b = daemons
    srv_app = mrpcd.aio.connect(b.socket, name="health-aio-server")
    cli_app = mrpcd.aio.connect(a.socket, name="health-aio-client")
    try:
        server = mrpcd.aio.server(app=srv_app)
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        channel = mrpcd.aio.insecure_channel(f"127.0.0.1:{port}", app=cli_app)
        try:
            yield server, health_pb2_grpc.HealthStub(channel)
        finally:
            await channel.close()
            await server.stop(None)
    finally:
        cli_app.close()
        srv_app.close()


def req(service=""):
    return health_pb2.HealthCheckRequest(service=service)


# -- the package: what ported code imports -------------------------------------------------


def test_generated_module_is_what_stubgen_makes_of_the_vendored_proto(tmp_path):
    """health_mrpc.py / .pyi are committed (apps need no protoc at import); they must be what
    mrpcd-stubgen makes of health.proto today. If this fails after a change to stubgen,
    regenerate: .venv/bin/mrpcd-stubgen mrpcd/health/v1/health.proto -o mrpcd/health/v1"""
    subprocess.run([sys.executable, "-m", "mrpcd.stubgen", str(HEALTH_DIR / "health.proto"), "-o", str(tmp_path)],
                   check=True, capture_output=True, timeout=120)
    for name in ("health_mrpc.py", "health_mrpc.pyi"):
        assert (tmp_path / name).read_text() == (HEALTH_DIR / name).read_text(), \
            f"mrpcd/health/v1/{name} is stale: .venv/bin/mrpcd-stubgen mrpcd/health/v1/health.proto -o mrpcd/health/v1"


def test_the_names_of_grpc_health_v1():
    assert health.SERVICE_NAME == "grpc.health.v1.Health" and health.OVERALL_HEALTH == ""
    assert [Status.UNKNOWN, SERVING, NOT_SERVING, SERVICE_UNKNOWN] == [0, 1, 2, 3]
    assert Status.ServingStatus.Name(2) == "NOT_SERVING"
    assert health_pb2.HealthCheckRequest(service="x").service == "x"
    assert health.aio.HealthServicer is not health.HealthServicer
    # grpcio's constructor arguments are taken (they change nothing here)
    health.HealthServicer(experimental_non_blocking=False, experimental_thread_pool=futures.ThreadPoolExecutor(1))
    for name in ("HealthStub", "HealthServicer", "add_HealthServicer_to_server"):
        assert hasattr(health_pb2_grpc, name)
    assert isinstance(health.HealthServicer(), health_pb2_grpc.HealthServicer)


# -- the state, without a server ----------------------------------------------------------


def test_watchers_see_every_change_in_order_while_threads_set_at_once():
    """set() from many threads: each watcher's statuses are the order the changes were made
    in (no status twice in a row), ending on the last one."""
    state = _core.HealthState()
    watchers = [state.watch("svc") for _ in range(3)]
    order: list = []
    lock = threading.Lock()

    def flip(n):
        for i in range(200):
            with lock:  # the order the changes happen in, as the state sees them
                status = SERVING if (n + i) % 2 else NOT_SERVING
                state.set("svc", status)
                order.append(status)

    threads = [threading.Thread(target=flip, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for w in watchers:
        seen = []
        while w._pending:
            seen.append(w.take())
        assert all(x != y for x, y in zip(seen, seen[1:]))
        assert seen[-1] == order[-1] == state.get("svc")
    for w in watchers:
        state.forget(w)
    assert state.watcher_count() == 0


def test_a_reader_that_does_not_keep_up_holds_a_bounded_queue():
    state = _core.HealthState()
    w = state.watch("svc")
    for i in range(10 * _core.MAX_PENDING):
        state.set("svc", SERVING if i % 2 else NOT_SERVING)
    assert len(w._pending) == _core.MAX_PENDING
    taken = [w.take() for _ in range(_core.MAX_PENDING)]
    assert taken[-1] == state.get("svc")  # the oldest were dropped, never the latest
    state.forget(w)
    assert w.take() is None  # closed: a waiting handler returns at once


# -- sync server --------------------------------------------------------------------------


def test_check_overall_per_service_and_not_found(daemons):
    servicer = health.HealthServicer()
    with sync_health(daemons, servicer) as (_server, stub, _port):
        assert stub.Check(req(), timeout=10).status == SERVING  # the whole server: SERVING from the start
        servicer.set("pkg.Svc", SERVING)
        servicer.set("pkg.Other", NOT_SERVING)
        assert stub.Check(req("pkg.Svc"), timeout=10).status == SERVING
        assert stub.Check(req("pkg.Other"), timeout=10).status == NOT_SERVING
        with pytest.raises(mrpcd.RpcError) as err:
            stub.Check(req("pkg.Nope"), timeout=10)
        assert err.value.code() == mrpcd.StatusCode.NOT_FOUND
        listed = stub.List(health_pb2.HealthListRequest(), timeout=10).statuses
        assert {k: v.status for k, v in listed.items()} == {"": SERVING, "pkg.Svc": SERVING, "pkg.Other": NOT_SERVING}


def test_list_refuses_more_than_100_services(daemons):
    servicer = health.HealthServicer()
    for i in range(_core.MAX_LIST):  # with "": 101
        servicer.set(f"s{i}", SERVING)
    with sync_health(daemons, servicer) as (_server, stub, _port):
        with pytest.raises(mrpcd.RpcError) as err:
            stub.List(health_pb2.HealthListRequest(), timeout=10)
        assert err.value.code() == mrpcd.StatusCode.RESOURCE_EXHAUSTED


def test_watch_streams_changes_in_order_and_ends_on_cancel(daemons):
    """One worker thread: a Watch that did not end on cancel would keep it, and the Check and
    the second Watch after it could not run."""
    servicer = health.HealthServicer()
    with sync_health(daemons, servicer, max_workers=1) as (server, stub, _port):
        call = stub.Watch(req("pkg.Svc"), timeout=30)
        assert next(call).status == SERVICE_UNKNOWN  # unknown: a status, not an error
        servicer.set("pkg.Svc", SERVING)
        assert next(call).status == SERVING
        servicer.set("pkg.Svc", NOT_SERVING)
        assert next(call).status == NOT_SERVING
        servicer.set("pkg.Svc", NOT_SERVING)  # no change: no message
        servicer.set("pkg.Svc", SERVING)
        assert next(call).status == SERVING
        servicer.set("pkg.Other", NOT_SERVING)  # another service's changes are not sent here
        assert servicer._health.watcher_count() == 1
        call.cancel()
        assert wait_until(lambda: servicer._health.watcher_count() == 0, 10)
        assert wait_until(lambda: server._runners == 0, 10)  # the worker thread is free again
        assert stub.Check(req("pkg.Svc"), timeout=10).status == SERVING
        again = stub.Watch(req("pkg.Svc"), timeout=30)
        assert next(again).status == SERVING
        again.cancel()
        assert wait_until(lambda: servicer._health.watcher_count() == 0, 10)


def test_watch_ends_when_the_client_app_goes_away(daemons):
    servicer = health.HealthServicer()
    with sync_health(daemons, servicer) as (server, _stub, port):
        other = mrpcd.connect(daemons[0].socket, name="health-leaver")
        try:
            stub = health_pb2_grpc.HealthStub(mrpcd.insecure_channel(f"127.0.0.1:{port}", app=other))
            calls = [stub.Watch(req(), timeout=30) for _ in range(3)]
            assert [next(c).status for c in calls] == [SERVING] * 3
            assert servicer._health.watcher_count() == 3
        finally:
            other.close()
        assert wait_until(lambda: servicer._health.watcher_count() == 0, 15)
        assert wait_until(lambda: server._runners == 0, 10)


def test_watch_ends_when_the_server_stops(daemons):
    servicer = health.HealthServicer()
    with sync_health(daemons, servicer) as (server, stub, _port):
        call = stub.Watch(req(), timeout=30)
        assert next(call).status == SERVING
        server.stop(None).wait(10)
        with pytest.raises(mrpcd.RpcError):
            next(call)
        assert wait_until(lambda: servicer._health.watcher_count() == 0, 10)


def test_watch_ends_at_its_deadline(daemons):
    servicer = health.HealthServicer()
    with sync_health(daemons, servicer, max_workers=1) as (server, stub, _port):
        call = stub.Watch(req(), timeout=0.5)
        assert next(call).status == SERVING
        with pytest.raises(mrpcd.RpcError) as err:
            next(call)
        assert err.value.code() == mrpcd.StatusCode.DEADLINE_EXCEEDED
        assert wait_until(lambda: servicer._health.watcher_count() == 0, 10)
        assert wait_until(lambda: server._runners == 0, 10)


# what clients generated by the user from grpc's health.proto have: the file as grpcio
# 1.60's, before List (tests write it, it is only the messages and methods)
_HEALTH_PROTO_WITHOUT_LIST = """
syntax = "proto3";
package grpc.health.v1;
message HealthCheckRequest { string service = 1; }
message HealthCheckResponse {
  enum ServingStatus { UNKNOWN = 0; SERVING = 1; NOT_SERVING = 2; SERVICE_UNKNOWN = 3; }
  ServingStatus status = 1;
}
service Health {
  rpc Check(HealthCheckRequest) returns (HealthCheckResponse);
  rpc Watch(HealthCheckRequest) returns (stream HealthCheckResponse);
}
"""


def test_a_client_of_its_own_older_health_proto_talks_to_it(daemons, tmp_path):
    """Code that followed the old advice (generate health.proto yourself) keeps working as a
    client: the daemons match the two versions of the schema (one has List)."""
    (tmp_path / "health.proto").write_text(_HEALTH_PROTO_WITHOUT_LIST)
    subprocess.run([sys.executable, "-m", "mrpcd.stubgen", str(tmp_path / "health.proto"), "-o", str(tmp_path / "gen")],
                   check=True, capture_output=True, timeout=120)
    own = load_generated(tmp_path / "gen" / "health_mrpc.py", "own_")
    servicer = health.HealthServicer()
    servicer.set("pkg.Svc", NOT_SERVING)
    with sync_health(daemons, servicer) as (_server, _stub, port):
        other = mrpcd.connect(daemons[0].socket, name="health-own-client")
        try:
            with mrpcd.insecure_channel(f"127.0.0.1:{port}", app=other) as channel:
                stub = own.HealthStub(channel)
                reply = stub.Check(own.HealthCheckRequest(service="pkg.Svc"), timeout=10)
                assert reply.status == own.HealthCheckResponse.NOT_SERVING
                call = stub.Watch(own.HealthCheckRequest(service="pkg.Svc"), timeout=30)
                assert next(call).status == NOT_SERVING
                servicer.set("pkg.Svc", SERVING)
                assert next(call).status == SERVING
                call.cancel()
        finally:
            other.close()
        assert wait_until(lambda: servicer._health.watcher_count() == 0, 10)


def test_enter_graceful_shutdown(daemons):
    servicer = health.HealthServicer()
    servicer.set("pkg.Svc", SERVING)
    with sync_health(daemons, servicer) as (_server, stub, _port):
        overall, svc, unknown = (stub.Watch(req(s), timeout=30) for s in ("", "pkg.Svc", "pkg.Later"))
        assert [next(overall).status, next(svc).status, next(unknown).status] == [SERVING, SERVING, SERVICE_UNKNOWN]
        servicer.enter_graceful_shutdown()
        assert next(overall).status == NOT_SERVING and next(svc).status == NOT_SERVING
        servicer.set("pkg.Svc", SERVING)  # ignored from now on
        servicer.set("pkg.Later", SERVING)
        servicer.enter_graceful_shutdown()  # twice: nothing more
        assert stub.Check(req(), timeout=10).status == NOT_SERVING
        assert stub.Check(req("pkg.Svc"), timeout=10).status == NOT_SERVING
        with pytest.raises(mrpcd.RpcError) as err:
            stub.Check(req("pkg.Later"), timeout=10)
        assert err.value.code() == mrpcd.StatusCode.NOT_FOUND
        # nothing else was sent to the watchers: a fresh Watch of the same name sees the same
        fresh = stub.Watch(req("pkg.Svc"), timeout=30)
        assert next(fresh).status == NOT_SERVING
        for c in (overall, svc, unknown, fresh):
            c.cancel()
        assert wait_until(lambda: servicer._health.watcher_count() == 0, 10)


# -- asyncio server -----------------------------------------------------------------------


def test_asyncio_servicer(daemons):
    servicer = health.aio.HealthServicer()

    async def main():
        async with aio_health(daemons, servicer) as (_server, stub):
            assert (await stub.Check(req(), timeout=10)).status == SERVING
            await servicer.set("pkg.Svc", SERVING)
            assert (await stub.Check(req("pkg.Svc"), timeout=10)).status == SERVING
            with pytest.raises(mrpcd.aio.AioRpcError) as err:
                await stub.Check(req("pkg.Nope"), timeout=10)
            assert err.value.code() == mrpcd.StatusCode.NOT_FOUND
            listed = (await stub.List(health_pb2.HealthListRequest(), timeout=10)).statuses
            assert {k: v.status for k, v in listed.items()} == {"": SERVING, "pkg.Svc": SERVING}

            tasks_before = len(asyncio.all_tasks())
            call = stub.Watch(req("pkg.Svc"), timeout=30)
            assert (await call.read()).status == SERVING
            await servicer.set("pkg.Svc", NOT_SERVING)
            assert (await call.read()).status == NOT_SERVING
            await servicer.set("pkg.Svc", SERVING)
            assert (await call.read()).status == SERVING
            unknown = stub.Watch(req("pkg.Later"), timeout=30)
            assert (await unknown.read()).status == SERVICE_UNKNOWN
            await servicer.set("pkg.Later", SERVING)  # becomes known: the watcher hears it
            assert (await unknown.read()).status == SERVING
            assert servicer._health.watcher_count() == 2

            await servicer.enter_graceful_shutdown()
            assert (await call.read()).status == NOT_SERVING
            await servicer.set("pkg.Svc", SERVING)  # ignored
            assert (await stub.Check(req("pkg.Svc"), timeout=10)).status == NOT_SERVING

            call.cancel()
            unknown.cancel()
            for _ in range(500):  # the Watch tasks end with their calls
                if servicer._health.watcher_count() == 0 and len(asyncio.all_tasks()) <= tasks_before:
                    break
                await asyncio.sleep(0.02)
            assert servicer._health.watcher_count() == 0
            assert len(asyncio.all_tasks()) <= tasks_before

    asyncio.run(asyncio.wait_for(main(), 60))


def test_sync_servicer_on_an_asyncio_server_with_set_from_a_thread(daemons):
    """grpcio runs a sync servicer on a grpc.aio server too: here its Watch streams from the
    call's task (not blocking the loop), and set() may come from any thread."""
    servicer = health.HealthServicer()

    async def main():
        async with aio_health(daemons, servicer) as (_server, stub):
            loop = asyncio.get_running_loop()
            call = stub.Watch(req("pkg.Svc"), timeout=30)
            assert (await call.read()).status == SERVICE_UNKNOWN
            await loop.run_in_executor(None, servicer.set, "pkg.Svc", SERVING)
            assert (await call.read()).status == SERVING
            assert (await stub.Check(req("pkg.Svc"), timeout=10)).status == SERVING  # the loop is free
            with pytest.raises(mrpcd.aio.AioRpcError) as err:
                await stub.Check(req("pkg.Nope"), timeout=10)
            assert err.value.code() == mrpcd.StatusCode.NOT_FOUND
            await loop.run_in_executor(None, servicer.enter_graceful_shutdown)
            assert (await call.read()).status == NOT_SERVING
            call.cancel()
            for _ in range(500):
                if servicer._health.watcher_count() == 0:
                    break
                await asyncio.sleep(0.02)
            assert servicer._health.watcher_count() == 0

    asyncio.run(asyncio.wait_for(main(), 60))
