"""Daemons with different ring sizes: a peer's record bigger than the local app's rx ring.

The sending side cannot know the receiving app's ring (its own app checks only its own
limits), so the receiving daemon is where such a record stops. It must fail that one call
with RESOURCE_EXHAUSTED, both ends, and leave the connection and the app's other calls alone
(it used to close the whole connection, or, when the record came behind another one in the
same read, wedge the app's receive path for good).
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

import mrpcd

BIG = 200_000  # bigger than a 64 KiB ring, fits a 1 MiB one
SMALL_RING = "ring_size: 65536\n"
BIG_RING = "ring_size: 1048576\n"


def _servicer(hello_mrpc, release: threading.Event):
    class Greeter(hello_mrpc.GreeterServicer):
        def SayHello(self, request, context):
            if request.name == "wait":
                release.wait(20)
            if request.name == "big":
                return hello_mrpc.HelloReply(message="z" * BIG)
            return hello_mrpc.HelloReply(message=f"Hello, {request.name[:20]}!")

        def SayHelloStream(self, request, context):
            # a small message and a big one back to back: they reach the client's daemon in
            # one read, the big one behind the small one
            yield hello_mrpc.HelloReply(message="first")
            yield hello_mrpc.HelloReply(message="z" * BIG)
            yield hello_mrpc.HelloReply(message="never")

    return Greeter()


@pytest.fixture
def env(daemon_factory, gen_dir):
    import hello_mrpc

    made = []

    def make(server_cfg: str, client_cfg: str):
        sd, cd = daemon_factory("srv", server_cfg), daemon_factory("cli", client_cfg)
        release = threading.Event()
        srv_app, cli_app = mrpcd.connect(sd.socket, name="mm-server"), mrpcd.connect(cd.socket, name="mm-client")
        server = mrpcd.server(ThreadPoolExecutor(8), app=srv_app)
        hello_mrpc.add_GreeterServicer_to_server(_servicer(hello_mrpc, release), server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        made.append((server, srv_app, cli_app, release))
        return f"127.0.0.1:{port}", cli_app, release

    yield make
    for server, srv_app, cli_app, release in made:
        release.set()
        server.stop(None)
        cli_app.close()
        srv_app.close()


def test_request_bigger_than_the_server_apps_ring_fails_only_that_call(env):
    import hello_mrpc

    address, cli_app, release = env(SMALL_RING, BIG_RING)
    stub = hello_mrpc.GreeterStub(mrpcd.insecure_channel(address, app=cli_app))
    assert stub.SayHello(hello_mrpc.HelloRequest(name="warm"), timeout=10).message == "Hello, warm!"
    waiting = stub.SayHello.future(hello_mrpc.HelloRequest(name="wait"), timeout=20)  # in flight on the same connection
    with pytest.raises(mrpcd.RpcError) as info:
        stub.SayHello(hello_mrpc.HelloRequest(name="y" * BIG), timeout=10)
    assert info.value.code() is mrpcd.StatusCode.RESOURCE_EXHAUSTED, info.value.details()
    assert "ring" in info.value.details()
    release.set()
    assert waiting.result(timeout=20).message == "Hello, wait!"
    assert stub.SayHello(hello_mrpc.HelloRequest(name="after"), timeout=10).message == "Hello, after!"


def test_response_bigger_than_the_client_apps_ring_fails_only_that_call(env):
    import hello_mrpc

    address, cli_app, release = env(BIG_RING, SMALL_RING)
    stub = hello_mrpc.GreeterStub(mrpcd.insecure_channel(address, app=cli_app))
    waiting = stub.SayHello.future(hello_mrpc.HelloRequest(name="wait"), timeout=20)
    with pytest.raises(mrpcd.RpcError) as info:
        stub.SayHello(hello_mrpc.HelloRequest(name="big"), timeout=10)
    assert info.value.code() is mrpcd.StatusCode.RESOURCE_EXHAUSTED, info.value.details()
    got = []
    with pytest.raises(mrpcd.RpcError) as info:
        for reply in stub.SayHelloStream(hello_mrpc.HelloRequest(name="s"), timeout=10):
            got.append(reply.message)
    assert info.value.code() is mrpcd.StatusCode.RESOURCE_EXHAUSTED, info.value.details()
    assert got == ["first"]
    release.set()
    assert waiting.result(timeout=20).message == "Hello, wait!"
    # the app's receive path still works, on this connection and on a new one
    assert stub.SayHello(hello_mrpc.HelloRequest(name="after"), timeout=10).message == "Hello, after!"
    other = hello_mrpc.GreeterStub(mrpcd.insecure_channel(address, app=cli_app))
    assert other.SayHello(hello_mrpc.HelloRequest(name="new"), timeout=10).message == "Hello, new!"
