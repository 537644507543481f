"""grpc's retryPolicy (gRFC A6) for unary-unary and server-streaming calls, sync and asyncio.

A service config's per-method retryPolicy retries a call that failed with one of its
retryableStatusCodes, up to maxAttempts, with jittered exponential backoff, within the
call's deadline, sending `grpc-previous-rpc-attempts` with each retry; retryThrottling's
token bucket stops retries while a channel's calls keep failing; grpc.enable_retries=0
turns them off. The servers here count the attempts they see.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import threading
import time
from concurrent import futures

import pytest

import mrpcd
import mrpcd.aio
from mrpcd import wire
from mrpcd._calls import RetryState

from conftest import wait_until

SERVICE = "mrpc.stream.Streamer"
UNAVAILABLE = mrpcd.StatusCode.UNAVAILABLE


def _policy(**kw) -> dict:
    policy = {"maxAttempts": 4, "initialBackoff": "0.01s", "maxBackoff": "0.05s", "backoffMultiplier": 2,
              "retryableStatusCodes": ["UNAVAILABLE"]}
    policy.update(kw)
    return policy


def _options(policy: dict | None = None, name: dict | None = None, throttling: dict | None = None, extra=()) -> list:
    config: dict = {"methodConfig": [{"name": [name or {"service": SERVICE}], "retryPolicy": policy or _policy()}]}
    if throttling is not None:
        config["retryThrottling"] = throttling
    return [("grpc.service_config", json.dumps(config)), *extra]


class Flaky:
    """Answers Unary: its first `fail` attempts end with `code` ("down <n>"), the next ones
    succeed (total = attempt number). Each attempt's grpc-previous-rpc-attempts is kept;
    each sets trailing metadata `attempt` = n (and `pushback`, if given)."""

    def __init__(self, pb, fail: int, code=UNAVAILABLE, pushback: str | None = None, initial: bool = False, block: threading.Event | None = None) -> None:
        self.pb = pb
        self.fail, self.code, self.pushback, self.initial, self.block = fail, code, pushback, initial, block
        self.previous: list = []
        self.started = threading.Event()
        outer = self

        class Servicer(pb.StreamerServicer):
            def Unary(self, request, context):
                return outer.unary(request, context)

        self.servicer = Servicer()

    @property
    def attempts(self) -> int:
        return len(self.previous)

    def unary(self, request, context):
        self.previous.append(dict(context.invocation_metadata()).get("grpc-previous-rpc-attempts"))
        n = len(self.previous)
        self.started.set()
        if self.block is not None and n == 1:  # the first attempt waits (a daemon restart, a cancel)
            gone = threading.Event()
            context.add_callback(gone.set)
            gone.wait(30)
            return self.pb.Summary(total=-1)
        trailing = [("attempt", str(n))]
        if self.pushback is not None:
            trailing.append(("grpc-retry-pushback-ms", self.pushback))
        context.set_trailing_metadata(trailing)
        if n <= self.fail:
            if self.initial:
                context.send_initial_metadata([("early", "1")])
            context.abort(self.code, f"down {n}")
        return self.pb.Summary(total=n)


@contextlib.contextmanager
def served(streamer, flaky: Flaky):
    """(address, client app): `flaky` served behind daemon B, a client app behind A."""
    a, b, pb = streamer
    srv_app = mrpcd.connect(b.socket, name="retry-server")
    cli_app = mrpcd.connect(a.socket, name="retry-client")
    try:
        server = mrpcd.server(futures.ThreadPoolExecutor(max_workers=4), app=srv_app)
        pb.add_StreamerServicer_to_server(flaky.servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        yield f"127.0.0.1:{port}", cli_app
        server.stop(None)
    finally:
        cli_app.close()
        srv_app.close()


def _sync_call(stub, pb, mode: str, **kw):
    """(response, call or None) of one Unary call made the `mode` way; raises RpcError."""
    kw.setdefault("timeout", 10)
    if mode == "blocking":
        return stub.Unary(pb.Chunk(seq=1), **kw), None
    if mode == "with_call":
        return stub.Unary.with_call(pb.Chunk(seq=1), **kw)
    fut = stub.Unary.future(pb.Chunk(seq=1), **kw)
    return fut.result(), fut


MODES = ["blocking", "with_call", "future"]


@pytest.fixture
def fixed_jitter(monkeypatch):
    """Backoffs at their cap (A6's random(0, cap) at its top), so waits are predictable."""
    monkeypatch.setattr(wire.random, "uniform", lambda lo, hi: hi)


# -- the service config: validation and lookup (sans-I/O) ------------------------------------

BAD = [
    (_policy(maxAttempts=1), "methodConfig[0].retryPolicy.maxAttempts must be at least 2"),
    (_policy(maxAttempts=2.5), "methodConfig[0].retryPolicy.maxAttempts must be an integer"),
    (_policy(initialBackoff="0s"), "methodConfig[0].retryPolicy.initialBackoff must be greater than 0"),
    (_policy(initialBackoff="1"), "methodConfig[0].retryPolicy.initialBackoff must be a duration"),
    (_policy(initialBackoff="0.0000000001s"), "methodConfig[0].retryPolicy.initialBackoff must be a duration"),
    (_policy(maxBackoff="-1s"), "methodConfig[0].retryPolicy.maxBackoff must be a duration"),
    (_policy(backoffMultiplier=0), "methodConfig[0].retryPolicy.backoffMultiplier must be greater than 0"),
    (_policy(backoffMultiplier="x"), "methodConfig[0].retryPolicy.backoffMultiplier must be a number"),
    (_policy(retryableStatusCodes=[]), "methodConfig[0].retryPolicy.retryableStatusCodes must be a non-empty list"),
    (_policy(retryableStatusCodes=["NOPE"]), r"methodConfig\[0\].retryPolicy.retryableStatusCodes\[0\] is not a status code"),
    (_policy(retryableStatusCodes=[99]), r"retryableStatusCodes\[0\] is not a status code"),
    ({"maxAttempts": 5}, "methodConfig[0].retryPolicy.initialBackoff is missing"),
    ("yes", "methodConfig[0].retryPolicy must be an object"),
]


@pytest.mark.parametrize("policy,message", BAD, ids=[m.split(" ")[0].split(".")[-1] + str(i) for i, (_p, m) in enumerate(BAD)])
def test_an_invalid_retry_policy_is_a_clear_error_naming_the_field(policy, message):
    import re

    with pytest.raises(ValueError, match=re.escape(message) if "\\" not in message else message) as info:
        wire.retry_config(_options(policy))
    assert "grpc.service_config" in str(info.value)
    # (validated even when retries are off: grpc rejects the service config all the same)
    with pytest.raises(ValueError):
        wire.retry_config(_options(policy, extra=[("grpc.enable_retries", 0)]))


@pytest.mark.parametrize("throttling,message", [
    ({"maxTokens": 0, "tokenRatio": 1}, "retryThrottling.maxTokens must be greater than 0"),
    ({"maxTokens": 1.5, "tokenRatio": 1}, "retryThrottling.maxTokens must be an integer"),
    ({"maxTokens": 10, "tokenRatio": 0}, "retryThrottling.tokenRatio must be greater than 0"),
    ({"maxTokens": 10}, "retryThrottling.tokenRatio is missing"),
])
def test_an_invalid_retry_throttling_is_a_clear_error(throttling, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        wire.retry_config(_options(throttling=throttling))


def test_invalid_policies_are_refused_where_sync_and_asyncio_channels_are_made(streamer):
    a, _b, _pb = streamer
    app = mrpcd.connect(a.socket, name="retry-invalid")
    try:
        with pytest.raises(ValueError, match=r"retryPolicy\.maxAttempts must be at least 2"):
            mrpcd.insecure_channel("127.0.0.1:1", _options(_policy(maxAttempts=1)), app=app)
    finally:
        app.close()

    async def main():
        aapp = mrpcd.aio.connect(a.socket, name="retry-invalid-aio")
        try:
            with pytest.raises(ValueError, match=r"retryPolicy\.retryableStatusCodes must be a non-empty list"):
                mrpcd.aio.insecure_channel("127.0.0.1:1", _options(_policy(retryableStatusCodes=[])), app=aapp)
        finally:
            aapp.close()

    asyncio.run(asyncio.wait_for(main(), 20))


def test_valid_policies_as_grpc_reads_them():
    """maxAttempts is capped at 5; codes by name (any case) or number; numbers given as
    strings (protobuf's JSON); OK among the codes changes nothing; maxTokens capped at
    1000, tokenRatio kept to 3 decimals."""
    config = wire.retry_config(_options(_policy(maxAttempts="9", backoffMultiplier="1.5", retryableStatusCodes=["unavailable", 4, "OK"]),
                                        throttling={"maxTokens": 5000, "tokenRatio": 0.12345}))
    assert config is not None
    policy = config.policy(f"/{SERVICE}/Unary")
    assert policy is not None and policy.max_attempts == 5 and policy.multiplier == 1.5
    assert policy.codes == {mrpcd.StatusCode.UNAVAILABLE, mrpcd.StatusCode.DEADLINE_EXCEEDED}
    assert config.throttle is not None and config.throttle.max_tokens == 1000 and config.throttle.ratio == 0.123


def test_the_policy_is_the_chosen_entrys_and_retries_can_be_turned_off():
    """grpc picks a method's methodConfig entry (its own, else its service's, else the
    default) and takes its retryPolicy: an entry without one means no retries. No policy
    anywhere, or grpc.enable_retries=0: no RetryConfig, the calls' path is the plain one."""
    config = {"methodConfig": [
        {"name": [{"service": SERVICE}], "retryPolicy": _policy(maxAttempts=3)},
        {"name": [{"service": SERVICE, "method": "Ping"}], "timeout": "1s"},
        {"name": [{}], "retryPolicy": _policy(maxAttempts=2)},
    ]}
    options = [("grpc.service_config", json.dumps(config))]
    retry = wire.retry_config(options)
    assert retry is not None
    assert retry.policy(f"/{SERVICE}/Unary").max_attempts == 3
    assert retry.policy(f"/{SERVICE}/Ping") is None
    assert retry.policy("/other.Svc/M").max_attempts == 2
    assert wire.method_default(wire.method_defaults(options), f"/{SERVICE}/Ping") == (1.0, None)
    assert wire.retry_config(options + [("grpc.enable_retries", 0)]) is None
    assert wire.retry_config(options + [("grpc.enable_retries", "0")]) is None
    assert wire.retry_config(options + [("grpc.enable_retries", 0), ("grpc.enable_retries", 1)]) is not None  # (the last one counts)
    assert wire.retry_config([("grpc.service_config", json.dumps({"methodConfig": [{"name": [{}], "timeout": "1s"}]}))]) is None
    assert wire.retry_config(None) is None


def test_backoff_and_decisions_follow_a6(fixed_jitter):
    """backoff n = random(0, min(initial * multiplier**(n-1), max)); a retryable failure
    retries until maxAttempts; others, a success or a committed call end it; a server's
    pushback replaces one backoff (and restarts them), a malformed or negative one stops."""
    policy = wire.retry_config(_options(_policy(maxAttempts=5, initialBackoff="0.1s", maxBackoff="0.3s")))
    assert policy is not None
    p = policy.policy(f"/{SERVICE}/Unary")
    assert [round(p.backoff(n), 6) for n in (1, 2, 3, 4)] == [0.1, 0.2, 0.3, 0.3]
    state = RetryState(p, None)
    delays = []
    for _ in range(5):
        state.metadata([])
        delays.append(state.next_delay(UNAVAILABLE, [], False))
    assert [None if d is None else round(d, 6) for d in delays] == [0.1, 0.2, 0.3, 0.3, None]
    state = RetryState(p, None)
    assert state.metadata([("k", "v")]) == [("k", "v")]
    assert state.metadata([("k", "v")]) == [("k", "v"), ("grpc-previous-rpc-attempts", "1")]
    assert state.next_delay(mrpcd.StatusCode.INTERNAL, [], False) is None
    assert state.next_delay(UNAVAILABLE, [], True) is None
    assert state.next_delay(UNAVAILABLE, [("grpc-retry-pushback-ms", "250")], False) == 0.25
    assert state.next_delay(UNAVAILABLE, [], False) == 0.1  # (backoffs start again after a pushback)
    assert state.next_delay(UNAVAILABLE, [("grpc-retry-pushback-ms", "-1")], False) is None
    assert state.next_delay(UNAVAILABLE, [("grpc-retry-pushback-ms", "soon")], False) is None


def test_the_throttle_stops_retries_at_half_its_tokens():
    """A6's token bucket, as grpc counts it (measured with grpcio 1.85: maxTokens 4,
    tokenRatio 1, a server that always fails: the first call makes 2 attempts, the next
    ones 1)."""
    throttle = wire.RetryThrottle(4.0, 1.0)
    assert throttle.failure() is True  # 3 > 2
    assert throttle.failure() is False  # 2: throttled
    assert throttle.failure() is False
    throttle.success()
    throttle.success()
    assert throttle.tokens == 3.0 and throttle.failure() is False  # 2 again
    for _ in range(10):
        throttle.success()
    assert throttle.tokens == 4.0


# -- sync calls -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_sync_retries_until_an_attempt_succeeds(streamer, mode):
    _a, _b, pb = streamer
    flaky = Flaky(pb, fail=2)
    with served(streamer, flaky) as (address, app):
        stub = pb.StreamerStub(mrpcd.insecure_channel(address, _options(), app=app))
        response, call = _sync_call(stub, pb, mode, metadata=[("who", "me")])
        assert response.total == 3 and flaky.attempts == 3
        assert flaky.previous == [None, "1", "2"]  # what A6 sends with each retry
        if call is not None:  # the call's metadata and status are the last attempt's
            assert call.code() is mrpcd.StatusCode.OK
            assert dict(call.trailing_metadata())["attempt"] == "3"
            assert "grpc-previous-rpc-attempts" not in dict(call.initial_metadata())  # (nor does grpc Python show it)


@pytest.mark.parametrize("mode", MODES)
def test_sync_without_the_policy_or_with_retries_off_a_call_fails_once(streamer, mode):
    _a, _b, pb = streamer
    for options in (None, _options(name={"service": "other.Svc"}), _options(extra=[("grpc.enable_retries", 0)])):
        flaky = Flaky(pb, fail=1)
        with served(streamer, flaky) as (address, app):
            stub = pb.StreamerStub(mrpcd.insecure_channel(address, options, app=app))
            with pytest.raises(mrpcd.RpcError) as info:
                _sync_call(stub, pb, mode)
            assert info.value.code() is UNAVAILABLE and flaky.attempts == 1 and flaky.previous == [None]


@pytest.mark.parametrize("mode", MODES)
def test_sync_codes_not_listed_are_not_retried(streamer, mode):
    _a, _b, pb = streamer
    flaky = Flaky(pb, fail=1, code=mrpcd.StatusCode.INTERNAL)
    with served(streamer, flaky) as (address, app):
        stub = pb.StreamerStub(mrpcd.insecure_channel(address, _options(), app=app))
        with pytest.raises(mrpcd.RpcError) as info:
            _sync_call(stub, pb, mode)
        assert info.value.code() is mrpcd.StatusCode.INTERNAL and flaky.attempts == 1


@pytest.mark.parametrize("mode", MODES)
def test_sync_max_attempts_bound_the_retries_and_the_last_error_is_the_calls(streamer, mode):
    _a, _b, pb = streamer
    for max_attempts, expected in ((3, 3), (9, 5)):  # (grpc caps maxAttempts at 5)
        flaky = Flaky(pb, fail=100)
        with served(streamer, flaky) as (address, app):
            stub = pb.StreamerStub(mrpcd.insecure_channel(address, _options(_policy(maxAttempts=max_attempts)), app=app))
            with pytest.raises(mrpcd.RpcError) as info:
                _sync_call(stub, pb, mode)
            assert flaky.attempts == expected
            err = info.value
            assert err.code() is UNAVAILABLE and err.details() == f"down {expected}"
            assert dict(err.trailing_metadata())["attempt"] == str(expected)


def test_sync_a_committed_call_is_not_retried(streamer):
    """The server sent its initial metadata before failing: the call is committed (A6)."""
    _a, _b, pb = streamer
    flaky = Flaky(pb, fail=1, initial=True)
    with served(streamer, flaky) as (address, app):
        stub = pb.StreamerStub(mrpcd.insecure_channel(address, _options(), app=app))
        with pytest.raises(mrpcd.RpcError) as info:
            stub.Unary(pb.Chunk(), timeout=10)
        assert info.value.code() is UNAVAILABLE and flaky.attempts == 1


def test_sync_server_pushback_delays_or_stops_the_retries(streamer):
    _a, _b, pb = streamer
    flaky = Flaky(pb, fail=1, pushback="300")
    with served(streamer, flaky) as (address, app):
        stub = pb.StreamerStub(mrpcd.insecure_channel(address, _options(), app=app))
        t0 = time.monotonic()
        assert stub.Unary(pb.Chunk(), timeout=10).total == 2
        assert time.monotonic() - t0 >= 0.3 and flaky.attempts == 2
    flaky = Flaky(pb, fail=1, pushback="-1")
    with served(streamer, flaky) as (address, app):
        stub = pb.StreamerStub(mrpcd.insecure_channel(address, _options(), app=app))
        with pytest.raises(mrpcd.RpcError):
            stub.Unary(pb.Chunk(), timeout=10)
        assert flaky.attempts == 1


@pytest.mark.parametrize("mode", MODES)
def test_sync_the_deadline_bounds_the_retries(streamer, mode, fixed_jitter):
    """A backoff longer than the time left: the call ends at its deadline with
    DEADLINE_EXCEEDED, as grpc's (measured: 1 attempt, DEADLINE_EXCEEDED at the deadline)."""
    _a, _b, pb = streamer
    flaky = Flaky(pb, fail=100)
    with served(streamer, flaky) as (address, app):
        stub = pb.StreamerStub(mrpcd.insecure_channel(address, _options(_policy(initialBackoff="5s", maxBackoff="5s")), app=app))
        t0 = time.monotonic()
        with pytest.raises(mrpcd.RpcError) as info:
            _sync_call(stub, pb, mode, timeout=0.5)
        took = time.monotonic() - t0
        assert info.value.code() is mrpcd.StatusCode.DEADLINE_EXCEEDED and flaky.attempts == 1
        assert 0.4 < took < 4, took
        # the service config's timeout bounds them too
        config = {"methodConfig": [{"name": [{"service": SERVICE}], "timeout": "0.5s", "retryPolicy": _policy(initialBackoff="5s", maxBackoff="5s")}]}
        stub = pb.StreamerStub(mrpcd.insecure_channel(address, [("grpc.service_config", json.dumps(config))], app=app))
        t0 = time.monotonic()
        with pytest.raises(mrpcd.RpcError) as info:
            stub.Unary(pb.Chunk(), timeout=None)
        assert info.value.code() is mrpcd.StatusCode.DEADLINE_EXCEEDED and time.monotonic() - t0 < 4


def test_sync_a_future_with_only_a_callback_ends_at_its_deadline_between_attempts(streamer, fixed_jitter):
    _a, _b, pb = streamer
    flaky = Flaky(pb, fail=100)
    with served(streamer, flaky) as (address, app):
        stub = pb.StreamerStub(mrpcd.insecure_channel(address, _options(_policy(initialBackoff="5s", maxBackoff="5s")), app=app))
        ended = threading.Event()
        fut = stub.Unary.future(pb.Chunk(), timeout=0.5)
        fut.add_done_callback(lambda f: ended.set())
        assert ended.wait(4)
        assert fut.code() is mrpcd.StatusCode.DEADLINE_EXCEEDED and flaky.attempts == 1


def test_sync_cancel_stops_the_retries(streamer, fixed_jitter):
    """Cancelled during its backoff, or with an attempt in flight: no attempt after it."""
    _a, _b, pb = streamer
    flaky = Flaky(pb, fail=100)
    with served(streamer, flaky) as (address, app):
        stub = pb.StreamerStub(mrpcd.insecure_channel(address, _options(_policy(initialBackoff="1s", maxBackoff="1s")), app=app))
        fut = stub.Unary.future(pb.Chunk(), timeout=30)
        assert wait_until(lambda: flaky.attempts == 1, 10)
        time.sleep(0.1)  # (its first attempt has ended: it waits for its backoff)
        assert fut.cancel() and fut.cancelled()
        time.sleep(1.5)
        assert flaky.attempts == 1
        with pytest.raises(futures.CancelledError):
            fut.result()
    flaky = Flaky(pb, fail=100, block=threading.Event())
    with served(streamer, flaky) as (address, app):
        stub = pb.StreamerStub(mrpcd.insecure_channel(address, _options(), app=app))
        fut = stub.Unary.future(pb.Chunk(), timeout=30)
        assert flaky.started.wait(10)
        assert fut.cancel()
        time.sleep(0.5)
        assert flaky.attempts == 1 and fut.cancelled()


def test_sync_throttling_limits_retries_per_channel(streamer):
    """maxTokens 4, tokenRatio 1 against a server that always fails: 2 attempts for the
    first call, 1 for the next ones (what grpcio 1.85 does, measured)."""
    _a, _b, pb = streamer
    flaky = Flaky(pb, fail=100)
    with served(streamer, flaky) as (address, app):
        stub = pb.StreamerStub(mrpcd.insecure_channel(address, _options(throttling={"maxTokens": 4, "tokenRatio": 1}), app=app))
        counts = []
        for _ in range(3):
            before = flaky.attempts
            with pytest.raises(mrpcd.RpcError):
                stub.Unary(pb.Chunk(), timeout=10)
            counts.append(flaky.attempts - before)
        assert counts == [2, 1, 1]
        # another channel has its own bucket
        other = pb.StreamerStub(mrpcd.insecure_channel(address, _options(throttling={"maxTokens": 4, "tokenRatio": 1}), app=app))
        before = flaky.attempts
        with pytest.raises(mrpcd.RpcError):
            other.Unary(pb.Chunk(), timeout=10)
        assert flaky.attempts - before == 2


class Streams:
    """ServerStream: its first `fail` attempts fail UNAVAILABLE after `sent` messages, the
    next ones stream 3 (seq = attempt number); ClientStream always fails UNAVAILABLE."""

    def __init__(self, pb, fail: int, sent: int = 0) -> None:
        self.previous: list = []
        self.client_streams = 0
        outer = self

        class Servicer(pb.StreamerServicer):
            def ServerStream(self, request, context):
                outer.previous.append(dict(context.invocation_metadata()).get("grpc-previous-rpc-attempts"))
                n = len(outer.previous)
                if n <= fail:
                    for _ in range(sent):
                        yield pb.Chunk(seq=n)
                    context.abort(UNAVAILABLE, f"down {n}")
                for _ in range(3):
                    yield pb.Chunk(seq=n)

            def ClientStream(self, request_iterator, context):
                for _ in request_iterator:
                    pass
                outer.client_streams += 1
                context.abort(UNAVAILABLE, "down")

        self.servicer = Servicer()


def test_sync_response_streams_are_retried_until_their_first_message(streamer):
    """A6: a response stream is retried while nothing came back; once its first message
    arrived it is committed (its failure is the call's); request streams are not retried."""
    _a, _b, pb = streamer
    streams = Streams(pb, fail=2)
    with served(streamer, streams) as (address, app):  # type: ignore[arg-type]
        stub = pb.StreamerStub(mrpcd.insecure_channel(address, _options(), app=app))
        call = stub.ServerStream(pb.Chunk(), timeout=10)
        assert [c.seq for c in call] == [3, 3, 3]
        assert call.code() is mrpcd.StatusCode.OK and streams.previous == [None, "1", "2"]
        with pytest.raises(mrpcd.RpcError) as info:
            stub.ClientStream(iter([pb.Chunk(), pb.Chunk()]), timeout=10)
        assert info.value.code() is UNAVAILABLE and streams.client_streams == 1
    streams = Streams(pb, fail=1, sent=1)
    with served(streamer, streams) as (address, app):  # type: ignore[arg-type]
        stub = pb.StreamerStub(mrpcd.insecure_channel(address, _options(), app=app))
        got = []
        with pytest.raises(mrpcd.RpcError) as info:
            for c in stub.ServerStream(pb.Chunk(), timeout=10):
                got.append(c.seq)
        assert got == [1] and info.value.code() is UNAVAILABLE and info.value.details() == "down 1"
        assert streams.previous == [None]


def test_aio_response_streams_are_retried_until_their_first_message(streamer):
    _a, _b, pb = streamer
    streams = Streams(pb, fail=2)

    async def body(stub):
        call = stub.ServerStream(pb.Chunk(), timeout=10)
        assert [c.seq async for c in call] == [3, 3, 3]
        assert await call.code() is mrpcd.StatusCode.OK
        with pytest.raises(mrpcd.aio.AioRpcError):
            await stub.ClientStream(iter([pb.Chunk()]), timeout=10)

    _aio(streamer, streams, body, _options())  # type: ignore[arg-type]
    assert streams.previous == [None, "1", "2"] and streams.client_streams == 1
    streams = Streams(pb, fail=1, sent=1)
    got = []

    async def committed(stub):
        call = stub.ServerStream(pb.Chunk(), timeout=10)
        with pytest.raises(mrpcd.aio.AioRpcError) as info:
            async for c in call:
                got.append(c.seq)
        assert info.value.code() is UNAVAILABLE and info.value.details() == "down 1"

    _aio(streamer, streams, committed, _options())  # type: ignore[arg-type]
    assert got == [1] and streams.previous == [None]


# -- asyncio calls ------------------------------------------------------------------------


def _aio(streamer, flaky: Flaky, body, options):
    """body(stub) in asyncio, with a client app behind A, `flaky` served (sync) behind B."""
    a, _b, pb = streamer

    async def main():
        with served(streamer, flaky) as (address, _sync_app):
            app = mrpcd.aio.connect(a.socket, name="retry-aio")
            try:
                async with mrpcd.aio.insecure_channel(address, options, app=app) as channel:
                    await body(pb.StreamerStub(channel))
            finally:
                app.close()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_aio_retries_until_an_attempt_succeeds(streamer):
    _a, _b, pb = streamer
    flaky = Flaky(pb, fail=2)

    async def body(stub):
        call = stub.Unary(pb.Chunk(seq=1), timeout=10, metadata=[("who", "me")])
        assert (await call).total == 3
        assert await call.code() is mrpcd.StatusCode.OK
        assert dict(await call.trailing_metadata())["attempt"] == "3"

    _aio(streamer, flaky, body, _options())
    assert flaky.previous == [None, "1", "2"]


@pytest.mark.parametrize("case", ["not-listed", "retries-off", "max-attempts"])
def test_aio_what_is_not_retried(streamer, case):
    _a, _b, pb = streamer
    flaky = Flaky(pb, fail=100, code=mrpcd.StatusCode.INTERNAL if case == "not-listed" else UNAVAILABLE)
    options = {"not-listed": _options(), "retries-off": _options(extra=[("grpc.enable_retries", 0)]),
               "max-attempts": _options(_policy(maxAttempts=3))}[case]

    async def body(stub):
        with pytest.raises(mrpcd.aio.AioRpcError) as info:
            await stub.Unary(pb.Chunk(), timeout=10)
        if case == "max-attempts":
            assert info.value.details() == "down 3" and dict(info.value.trailing_metadata())["attempt"] == "3"

    _aio(streamer, flaky, body, options)
    assert flaky.attempts == (3 if case == "max-attempts" else 1)


def test_aio_the_deadline_bounds_the_retries(streamer, fixed_jitter):
    _a, _b, pb = streamer
    flaky = Flaky(pb, fail=100)

    async def body(stub):
        t0 = time.monotonic()
        with pytest.raises(mrpcd.aio.AioRpcError) as info:
            await stub.Unary(pb.Chunk(), timeout=0.5)
        assert info.value.code() is mrpcd.StatusCode.DEADLINE_EXCEEDED and 0.4 < time.monotonic() - t0 < 4

    _aio(streamer, flaky, body, _options(_policy(initialBackoff="5s", maxBackoff="5s")))
    assert flaky.attempts == 1


def test_aio_cancel_stops_the_retries(streamer, fixed_jitter):
    _a, _b, pb = streamer
    flaky = Flaky(pb, fail=100)

    async def body(stub):
        call = stub.Unary(pb.Chunk(), timeout=30)
        for _ in range(200):
            if flaky.attempts:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.1)  # (in its backoff now)
        assert call.cancel() and call.cancelled()
        with pytest.raises(asyncio.CancelledError):
            await call
        await asyncio.sleep(1.5)
        assert flaky.attempts == 1

        # the task awaiting a call cancelled: the call and its retries too
        before = flaky.attempts
        task = asyncio.ensure_future(stub.Unary(pb.Chunk(), timeout=30))
        for _ in range(200):
            if flaky.attempts > before:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(1.5)
        assert flaky.attempts == before + 1

    _aio(streamer, flaky, body, _options(_policy(initialBackoff="1s", maxBackoff="1s")))


def test_aio_throttling_limits_retries_per_channel(streamer):
    _a, _b, pb = streamer
    flaky = Flaky(pb, fail=100)
    counts = []

    async def body(stub):
        for _ in range(3):
            before = flaky.attempts
            with pytest.raises(mrpcd.aio.AioRpcError):
                await stub.Unary(pb.Chunk(), timeout=10)
            counts.append(flaky.attempts - before)

    _aio(streamer, flaky, body, _options(throttling={"maxTokens": 4, "tokenRatio": 1}))
    assert counts == [2, 1, 1]


# -- across a restart of the server's daemon ---------------------------------------------------


@pytest.mark.parametrize("flavor", ["sync", "aio"])
@pytest.mark.parametrize("with_policy", [True, False], ids=["retried", "not-retried"])
def test_a_call_in_flight_when_the_servers_daemon_restarts(tmp_path, flavor, with_policy, streamer, fixed_jitter):
    """The server's daemon is killed while the call's first attempt runs: that attempt
    fails UNAVAILABLE; with a retry policy a later attempt reaches the server once it
    serves again through the new daemon, and the call succeeds; without one it fails."""
    from test_daemon_restart import Daemons

    _sa, _sb, pb = streamer
    daemons = Daemons(tmp_path)
    try:
        a, b = daemons.start("a"), daemons.start("b")
        flaky = Flaky(pb, fail=0, block=threading.Event())
        srv_app = mrpcd.connect(b.socket, name="retry-restart-server")
        server = mrpcd.server(futures.ThreadPoolExecutor(max_workers=4), app=srv_app)
        pb.add_StreamerServicer_to_server(flaky.servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        # backoffs (at their cap) of 0.5, 1, 2, 2 s: 5.5 s for the daemon and the server to be back
        options = _options(_policy(maxAttempts=5, initialBackoff="0.5s", maxBackoff="2s")) if with_policy else None

        def restart():
            assert flaky.started.wait(15)
            daemons.restart(b, signal.SIGKILL)

        outcome: list = []
        if flavor == "sync":
            app = mrpcd.connect(a.socket, name="retry-restart-client")
            try:
                stub = pb.StreamerStub(mrpcd.insecure_channel(f"127.0.0.1:{port}", options, app=app))
                fut = stub.Unary.future(pb.Chunk(), timeout=20)
                restart()
                try:
                    outcome.append(fut.result().total)
                except mrpcd.RpcError as exc:
                    outcome.append(exc.code())
            finally:
                app.close()
        else:
            async def main():
                app = mrpcd.aio.connect(a.socket, name="retry-restart-aio")
                try:
                    async with mrpcd.aio.insecure_channel(f"127.0.0.1:{port}", options, app=app) as channel:
                        call = pb.StreamerStub(channel).Unary(pb.Chunk(), timeout=20)
                        await asyncio.get_running_loop().run_in_executor(None, restart)
                        try:
                            outcome.append((await call).total)
                        except mrpcd.aio.AioRpcError as exc:
                            outcome.append(exc.code())
                finally:
                    app.close()

            asyncio.run(asyncio.wait_for(main(), 60))
        if with_policy:
            assert outcome == [2], (outcome, flaky.previous)
            # (the attempts made while the server was not back never reached it)
            assert flaky.previous[0] is None and flaky.previous[1] in ("1", "2", "3", "4"), flaky.previous
        else:
            assert outcome == [UNAVAILABLE] and flaky.attempts == 1
        server.stop(None)
        srv_app.close()
    finally:
        for d in daemons.procs:
            d.stop()


@pytest.mark.parametrize("flavor", ["sync", "aio"])
def test_the_service_configs_wait_for_ready_holds_for_retried_calls(streamer, flavor):
    """waitForReady from the same methodConfig: each attempt waits for the target (here:
    none listens) until the deadline, rather than failing UNAVAILABLE and being retried."""
    import socket

    a, _b, pb = streamer
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    config = {"methodConfig": [{"name": [{"service": SERVICE}], "waitForReady": True, "retryPolicy": _policy()}]}
    options = [("grpc.service_config", json.dumps(config))]
    if flavor == "sync":
        app = mrpcd.connect(a.socket, name="retry-wfr")
        try:
            stub = pb.StreamerStub(mrpcd.insecure_channel(address, options, app=app))
            with pytest.raises(mrpcd.RpcError) as info:
                stub.Unary(pb.Chunk(), timeout=1)
            assert info.value.code() is mrpcd.StatusCode.DEADLINE_EXCEEDED
        finally:
            app.close()
        return

    async def main():
        app = mrpcd.aio.connect(a.socket, name="retry-wfr-aio")
        try:
            async with mrpcd.aio.insecure_channel(address, options, app=app) as channel:
                with pytest.raises(mrpcd.aio.AioRpcError) as info:
                    await pb.StreamerStub(channel).Unary(pb.Chunk(), timeout=1)
                assert info.value.code() is mrpcd.StatusCode.DEADLINE_EXCEEDED
        finally:
            app.close()

    asyncio.run(asyncio.wait_for(main(), 30))


@pytest.mark.parametrize("mode", ["blocking", "future", "aio"])
def test_closing_the_channel_ends_a_call_waiting_for_its_retry(streamer, mode, fixed_jitter):
    """A call in its backoff (5 s here) when its channel closes ends at once, as the
    channel's calls in flight do: CANCELLED "Channel closed!" (grpc.aio: CancelledError)."""
    _a, _b, pb = streamer
    flaky = Flaky(pb, fail=100)
    options = _options(_policy(initialBackoff="5s", maxBackoff="5s"))
    if mode == "aio":
        async def body(stub):
            call = stub.Unary(pb.Chunk(), timeout=30)
            for _ in range(200):
                if flaky.attempts:
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.2)
            t0 = time.monotonic()
            await body.channel.close()
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(call, 3)
            assert time.monotonic() - t0 < 3

        a, _b2, _pb = streamer

        async def main():
            with served(streamer, flaky) as (address, _sync_app):
                app = mrpcd.aio.connect(a.socket, name="retry-close-aio")
                try:
                    body.channel = mrpcd.aio.insecure_channel(address, options, app=app)
                    await body(pb.StreamerStub(body.channel))
                finally:
                    app.close()

        asyncio.run(asyncio.wait_for(main(), 30))
        assert flaky.attempts == 1
        return
    with served(streamer, flaky) as (address, app):
        channel = mrpcd.insecure_channel(address, options, app=app)
        stub = pb.StreamerStub(channel)
        errors: list = []

        def run():
            try:
                if mode == "blocking":
                    stub.Unary(pb.Chunk(), timeout=30)
                else:
                    stub.Unary.future(pb.Chunk(), timeout=30).result()
            except mrpcd.RpcError as exc:
                errors.append(exc)

        caller = threading.Thread(target=run)
        caller.start()
        assert wait_until(lambda: flaky.attempts == 1, 10)
        time.sleep(0.2)  # (in its backoff now)
        t0 = time.monotonic()
        channel.close()
        caller.join(10)
        assert not caller.is_alive() and time.monotonic() - t0 < 3
        assert errors[0].code() is mrpcd.StatusCode.CANCELLED and errors[0].details() == "Channel closed!"
        assert flaky.attempts == 1


@pytest.mark.parametrize("flavor", ["sync", "aio"])
def test_a_retried_response_stream_ends_at_its_deadline_or_cancel(streamer, flavor, fixed_jitter):
    """Waiting for its next attempt (5 s away), a response stream ends at its deadline
    (DEADLINE_EXCEEDED) or when cancelled; no attempt follows."""
    _a, _b, pb = streamer
    streams = Streams(pb, fail=100)
    options = _options(_policy(initialBackoff="5s", maxBackoff="5s"))
    if flavor == "sync":
        with served(streamer, streams) as (address, app):  # type: ignore[arg-type]
            stub = pb.StreamerStub(mrpcd.insecure_channel(address, options, app=app))
            t0 = time.monotonic()
            with pytest.raises(mrpcd.RpcError) as info:
                list(stub.ServerStream(pb.Chunk(), timeout=0.5))
            assert info.value.code() is mrpcd.StatusCode.DEADLINE_EXCEEDED and time.monotonic() - t0 < 4
            call = stub.ServerStream(pb.Chunk(), timeout=30)
            assert wait_until(lambda: len(streams.previous) == 2, 10)
            time.sleep(0.1)
            assert call.cancel()
            with pytest.raises(mrpcd.RpcError) as info:
                next(call)
            assert info.value.code() is mrpcd.StatusCode.CANCELLED and call.cancelled()
    else:
        async def body(stub):
            t0 = time.monotonic()
            with pytest.raises(mrpcd.aio.AioRpcError) as info:
                [c async for c in stub.ServerStream(pb.Chunk(), timeout=0.5)]
            assert info.value.code() is mrpcd.StatusCode.DEADLINE_EXCEEDED and time.monotonic() - t0 < 4
            call = stub.ServerStream(pb.Chunk(), timeout=30)
            for _ in range(200):
                if len(streams.previous) == 2:
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.1)
            assert call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call.read()

        _aio(streamer, streams, body, options)  # type: ignore[arg-type]
    time.sleep(0.3)
    assert len(streams.previous) == 2


@pytest.mark.parametrize("flavor", ["sync", "aio"])
def test_client_interceptors_see_one_call_over_its_attempts(streamer, flavor):
    """As in grpc, retries happen below the client interceptors: an interceptor sees the
    call once, and its outcome is the last attempt's."""
    _a, _b, pb = streamer
    flaky = Flaky(pb, fail=2)
    seen: list = []
    if flavor == "sync":
        class Counting(mrpcd.UnaryUnaryClientInterceptor):
            def intercept_unary_unary(self, continuation, client_call_details, request):
                seen.append(client_call_details.method)
                return continuation(client_call_details, request)

        with served(streamer, flaky) as (address, app):
            channel = mrpcd.intercept_channel(mrpcd.insecure_channel(address, _options(), app=app), Counting())
            assert pb.StreamerStub(channel).Unary(pb.Chunk(), timeout=10).total == 3
    else:
        class AioCounting(mrpcd.aio.UnaryUnaryClientInterceptor):
            async def intercept_unary_unary(self, continuation, client_call_details, request):
                seen.append(client_call_details.method)
                return await continuation(client_call_details, request)

        a, _b2, _pb = streamer

        async def main():
            with served(streamer, flaky) as (address, _sync_app):
                app = mrpcd.aio.connect(a.socket, name="retry-intercepted")
                try:
                    async with mrpcd.aio.insecure_channel(address, _options(), interceptors=[AioCounting()], app=app) as channel:
                        assert (await pb.StreamerStub(channel).Unary(pb.Chunk(), timeout=10)).total == 3
                finally:
                    app.close()

        asyncio.run(asyncio.wait_for(main(), 30))
    assert len(seen) == 1 and flaky.attempts == 3
