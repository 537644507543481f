"""Interop test client: runs the ported gRPC interop cases against a TestService address.

The cases and their assertions follow grpc's tests/interop/methods.py (sync) and
tests_aio/interop/methods.py (asyncio) and doc/interop-test-descriptions.md, with only the
imports changed to mrpcd. Prints one JSON line per case: {"case", "ok", "error", "seconds"}.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
import traceback

import mrpcd
import mrpcd.aio

import test_mrpc as pb

_INITIAL_METADATA_KEY = "x-grpc-test-echo-initial"
_TRAILING_METADATA_KEY = "x-grpc-test-echo-trailing-bin"
SPECIAL_DETAILS = b"\t\ntest with whitespace\r\nand Unicode BMP \xe2\x98\xba and non-BMP \xf0\x9f\x98\x88\t\n".decode("utf-8")

CASES = [
    "empty_unary", "large_unary", "client_streaming", "server_streaming", "ping_pong", "empty_stream",
    "cancel_after_begin", "cancel_after_first_response", "timeout_on_sleeping_server", "custom_metadata",
    "status_code_and_message", "special_status_message", "unimplemented_method", "unimplemented_service",
]


def _expect_status_code(call, expected_code):
    if call.code() != expected_code:
        raise ValueError(f"expected code {expected_code}, got {call.code()}")


def _expect_status_details(call, expected_details):
    if call.details() != expected_details:
        raise ValueError(f"expected message {expected_details!r}, got {call.details()!r}")


def _validate_status_code_and_details(call, expected_code, expected_details):
    _expect_status_code(call, expected_code)
    _expect_status_details(call, expected_details)


def _validate_payload_type_and_length(response, expected_type, expected_length):
    if response.payload.type != expected_type:
        raise ValueError(f"expected payload type {expected_type}, got {response.payload.type}")
    if len(response.payload.body) != expected_length:
        raise ValueError(f"expected payload body size {expected_length}, got {len(response.payload.body)}")


class _Pipe:
    def __init__(self):
        self._condition = threading.Condition()
        self._values = []
        self._open = True

    def __iter__(self):
        return self

    def __next__(self):
        with self._condition:
            while not self._values and self._open:
                self._condition.wait()
            if self._values:
                return self._values.pop(0)
            raise StopIteration()

    def add(self, value):
        with self._condition:
            self._values.append(value)
            self._condition.notify()

    def close(self):
        with self._condition:
            self._open = False
            self._condition.notify()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


REQ_RSP_SIZES = (31415, 9, 2653, 58979)
REQ_PAYLOAD_SIZES = (27182, 8, 1828, 45904)


class SyncCases:
    def __init__(self, stub, unimplemented_stub):
        self.stub = stub
        self.unimplemented_stub = unimplemented_stub

    def empty_unary(self):
        response = self.stub.EmptyCall(pb.Empty())
        if not isinstance(response, pb.Empty):
            raise TypeError(f'response is of type "{type(response)}", not Empty!')

    def large_unary(self):
        size = 314159
        request = pb.SimpleRequest(response_type=pb.PayloadType.COMPRESSABLE, response_size=size, payload=pb.Payload(body=b"\x00" * 271828))
        response = self.stub.UnaryCall.future(request).result()
        _validate_payload_type_and_length(response, pb.PayloadType.COMPRESSABLE, size)

    def client_streaming(self):
        payloads = (pb.Payload(body=b"\x00" * size) for size in REQ_PAYLOAD_SIZES)
        requests = (pb.StreamingInputCallRequest(payload=payload) for payload in payloads)
        response = self.stub.StreamingInputCall(requests)
        if response.aggregated_payload_size != 74922:
            raise ValueError(f"incorrect size {response.aggregated_payload_size}!")

    def server_streaming(self):
        request = pb.StreamingOutputCallRequest(
            response_type=pb.PayloadType.COMPRESSABLE,
            response_parameters=[pb.ResponseParameters(size=s) for s in REQ_RSP_SIZES])
        count = 0
        for index, response in enumerate(self.stub.StreamingOutputCall(request)):
            _validate_payload_type_and_length(response, pb.PayloadType.COMPRESSABLE, REQ_RSP_SIZES[index])
            count += 1
        if count != len(REQ_RSP_SIZES):
            raise ValueError(f"expected {len(REQ_RSP_SIZES)} responses, got {count}")

    def ping_pong(self):
        with _Pipe() as pipe:
            response_iterator = self.stub.FullDuplexCall(pipe)
            for response_size, payload_size in zip(REQ_RSP_SIZES, REQ_PAYLOAD_SIZES):
                request = pb.StreamingOutputCallRequest(
                    response_type=pb.PayloadType.COMPRESSABLE,
                    response_parameters=[pb.ResponseParameters(size=response_size)],
                    payload=pb.Payload(body=b"\x00" * payload_size))
                pipe.add(request)
                response = next(response_iterator)
                _validate_payload_type_and_length(response, pb.PayloadType.COMPRESSABLE, response_size)

    def cancel_after_begin(self):
        with _Pipe() as pipe:
            response_future = self.stub.StreamingInputCall.future(pipe)
            response_future.cancel()
            if not response_future.cancelled():
                raise ValueError("expected cancelled method to return True")
            if response_future.code() is not mrpcd.StatusCode.CANCELLED:
                raise ValueError("expected status code CANCELLED")

    def cancel_after_first_response(self):
        with _Pipe() as pipe:
            response_iterator = self.stub.FullDuplexCall(pipe)
            request = pb.StreamingOutputCallRequest(
                response_type=pb.PayloadType.COMPRESSABLE,
                response_parameters=[pb.ResponseParameters(size=REQ_RSP_SIZES[0])],
                payload=pb.Payload(body=b"\x00" * REQ_PAYLOAD_SIZES[0]))
            pipe.add(request)
            next(response_iterator)
            response_iterator.cancel()
            try:
                next(response_iterator)
            except mrpcd.RpcError as rpc_error:
                if rpc_error.code() is not mrpcd.StatusCode.CANCELLED:
                    raise
            else:
                raise ValueError("expected call to be cancelled")

    def timeout_on_sleeping_server(self):
        with _Pipe() as pipe:
            response_iterator = self.stub.FullDuplexCall(pipe, timeout=0.001)
            request = pb.StreamingOutputCallRequest(
                response_type=pb.PayloadType.COMPRESSABLE,
                payload=pb.Payload(body=b"\x00" * 27182))
            pipe.add(request)
            try:
                next(response_iterator)
            except mrpcd.RpcError as rpc_error:
                if rpc_error.code() is not mrpcd.StatusCode.DEADLINE_EXCEEDED:
                    raise
            else:
                raise ValueError("expected call to exceed deadline")

    def empty_stream(self):
        with _Pipe() as pipe:
            response_iterator = self.stub.FullDuplexCall(pipe)
            pipe.close()
            try:
                next(response_iterator)
                raise ValueError("expected exactly 0 responses")
            except StopIteration:
                pass

    def status_code_and_message(self):
        details = "test status message"
        code = 2
        status = mrpcd.StatusCode.UNKNOWN
        request = pb.SimpleRequest(
            response_type=pb.PayloadType.COMPRESSABLE, response_size=1, payload=pb.Payload(body=b"\x00"),
            response_status=pb.EchoStatus(code=code, message=details))
        response_future = self.stub.UnaryCall.future(request)
        _validate_status_code_and_details(response_future, status, details)
        with _Pipe() as pipe:
            response_iterator = self.stub.FullDuplexCall(pipe)
            request = pb.StreamingOutputCallRequest(
                response_type=pb.PayloadType.COMPRESSABLE,
                response_parameters=[pb.ResponseParameters(size=1)],
                payload=pb.Payload(body=b"\x00"),
                response_status=pb.EchoStatus(code=code, message=details))
            pipe.add(request)
        _validate_status_code_and_details(response_iterator, status, details)

    def special_status_message(self):
        code = 2
        status = mrpcd.StatusCode.UNKNOWN
        request = pb.SimpleRequest(
            response_type=pb.PayloadType.COMPRESSABLE, response_size=1, payload=pb.Payload(body=b"\x00"),
            response_status=pb.EchoStatus(code=code, message=SPECIAL_DETAILS))
        response_future = self.stub.UnaryCall.future(request)
        _validate_status_code_and_details(response_future, status, SPECIAL_DETAILS)

    def unimplemented_method(self):
        response_future = self.stub.UnimplementedCall.future(pb.Empty())
        _expect_status_code(response_future, mrpcd.StatusCode.UNIMPLEMENTED)

    def unimplemented_service(self):
        response_future = self.unimplemented_stub.UnimplementedCall.future(pb.Empty())
        _expect_status_code(response_future, mrpcd.StatusCode.UNIMPLEMENTED)

    def custom_metadata(self):
        initial_value = "test_initial_metadata_value"
        trailing_value = b"\x0a\x0b\x0a\x0b\x0a\x0b"
        metadata = ((_INITIAL_METADATA_KEY, initial_value), (_TRAILING_METADATA_KEY, trailing_value))

        def validate(response):
            initial = dict(response.initial_metadata())
            if initial[_INITIAL_METADATA_KEY] != initial_value:
                raise ValueError(f"expected initial metadata {initial_value!r}, got {initial[_INITIAL_METADATA_KEY]!r}")
            trailing = dict(response.trailing_metadata())
            if trailing[_TRAILING_METADATA_KEY] != trailing_value:
                raise ValueError(f"expected trailing metadata {trailing_value!r}, got {trailing[_TRAILING_METADATA_KEY]!r}")

        request = pb.SimpleRequest(response_type=pb.PayloadType.COMPRESSABLE, response_size=1, payload=pb.Payload(body=b"\x00"))
        validate(self.stub.UnaryCall.future(request, metadata=metadata))
        with _Pipe() as pipe:
            response_iterator = self.stub.FullDuplexCall(pipe, metadata=metadata)
            pipe.add(pb.StreamingOutputCallRequest(response_type=pb.PayloadType.COMPRESSABLE, response_parameters=[pb.ResponseParameters(size=1)]))
            next(response_iterator)
        validate(response_iterator)


class AsyncCases:
    """grpc's tests_aio/interop/methods.py, ported."""

    def __init__(self, stub, unimplemented_stub):
        self.stub = stub
        self.unimplemented_stub = unimplemented_stub

    async def empty_unary(self):
        response = await self.stub.EmptyCall(pb.Empty())
        if not isinstance(response, pb.Empty):
            raise TypeError(f'response is of type "{type(response)}", not Empty!')

    async def large_unary(self):
        size = 314159
        request = pb.SimpleRequest(response_type=pb.PayloadType.COMPRESSABLE, response_size=size, payload=pb.Payload(body=b"\x00" * 271828))
        response = await self.stub.UnaryCall(request)
        _validate_payload_type_and_length(response, pb.PayloadType.COMPRESSABLE, size)

    async def client_streaming(self):
        # grpc.aio's version writes with call.write(); mrpcd takes an async iterator
        async def requests():
            for size in REQ_PAYLOAD_SIZES:
                yield pb.StreamingInputCallRequest(payload=pb.Payload(body=b"\x00" * size))
        call = self.stub.StreamingInputCall(requests())
        response = await call
        if response.aggregated_payload_size != 74922:
            raise ValueError(f"incorrect size {response.aggregated_payload_size}!")

    async def server_streaming(self):
        request = pb.StreamingOutputCallRequest(
            response_type=pb.PayloadType.COMPRESSABLE,
            response_parameters=[pb.ResponseParameters(size=s) for s in REQ_RSP_SIZES])
        call = self.stub.StreamingOutputCall(request)
        for size in REQ_RSP_SIZES:
            response = await call.read()
            _validate_payload_type_and_length(response, pb.PayloadType.COMPRESSABLE, size)
        if await call.read() is not mrpcd.aio.EOF:
            raise ValueError("expected the end of the stream")

    async def ping_pong(self):
        queue: asyncio.Queue = asyncio.Queue()

        async def requests():
            while True:
                item = await queue.get()
                if item is None:
                    return
                yield item

        call = self.stub.FullDuplexCall(requests())
        for response_size, payload_size in zip(REQ_RSP_SIZES, REQ_PAYLOAD_SIZES):
            await queue.put(pb.StreamingOutputCallRequest(
                response_type=pb.PayloadType.COMPRESSABLE,
                response_parameters=[pb.ResponseParameters(size=response_size)],
                payload=pb.Payload(body=b"\x00" * payload_size)))
            response = await call.read()
            _validate_payload_type_and_length(response, pb.PayloadType.COMPRESSABLE, response_size)
        await queue.put(None)
        if await call.read() is not mrpcd.aio.EOF:
            raise ValueError("expected the end of the stream")
        if await call.code() is not mrpcd.StatusCode.OK:
            raise ValueError(f"expected OK, got {await call.code()}")

    async def cancel_after_begin(self):
        call = self.stub.StreamingInputCall(_never())
        call.cancel()
        if not call.cancelled():
            raise ValueError("expected cancelled method to return True")
        code = await call.code()
        if code is not mrpcd.StatusCode.CANCELLED:
            raise ValueError(f"expected status code CANCELLED, got {code}")

    async def cancel_after_first_response(self):
        queue: asyncio.Queue = asyncio.Queue()

        async def requests():
            while True:
                yield await queue.get()

        call = self.stub.FullDuplexCall(requests())
        await queue.put(pb.StreamingOutputCallRequest(
            response_type=pb.PayloadType.COMPRESSABLE,
            response_parameters=[pb.ResponseParameters(size=REQ_RSP_SIZES[0])],
            payload=pb.Payload(body=b"\x00" * REQ_PAYLOAD_SIZES[0])))
        await call.read()
        call.cancel()
        try:
            await call.read()
        except asyncio.CancelledError:
            if await call.code() is not mrpcd.StatusCode.CANCELLED:
                raise ValueError("expected status code CANCELLED")
        except mrpcd.RpcError as rpc_error:
            if rpc_error.code() is not mrpcd.StatusCode.CANCELLED:
                raise
        else:
            raise ValueError("expected call to be cancelled")

    async def timeout_on_sleeping_server(self):
        async def requests():
            yield pb.StreamingOutputCallRequest(response_type=pb.PayloadType.COMPRESSABLE, payload=pb.Payload(body=b"\x00" * 27182))
            await asyncio.sleep(5)

        call = self.stub.FullDuplexCall(requests(), timeout=0.001)
        try:
            await call.read()
        except mrpcd.RpcError as rpc_error:
            if rpc_error.code() is not mrpcd.StatusCode.DEADLINE_EXCEEDED:
                raise
        else:
            raise ValueError("expected call to exceed deadline")

    async def empty_stream(self):
        call = self.stub.FullDuplexCall(iter(()))
        if await call.read() is not mrpcd.aio.EOF:
            raise ValueError("expected exactly 0 responses")

    async def status_code_and_message(self):
        details = "test status message"
        status = mrpcd.StatusCode.UNKNOWN
        request = pb.SimpleRequest(
            response_type=pb.PayloadType.COMPRESSABLE, response_size=1, payload=pb.Payload(body=b"\x00"),
            response_status=pb.EchoStatus(code=2, message=details))
        call = self.stub.UnaryCall(request)
        await _validate_async(call, status, details)
        call = self.stub.FullDuplexCall(iter([pb.StreamingOutputCallRequest(
            response_type=pb.PayloadType.COMPRESSABLE, response_parameters=[pb.ResponseParameters(size=1)],
            payload=pb.Payload(body=b"\x00"), response_status=pb.EchoStatus(code=2, message=details))]))
        await _validate_async(call, status, details)

    async def special_status_message(self):
        request = pb.SimpleRequest(
            response_type=pb.PayloadType.COMPRESSABLE, response_size=1, payload=pb.Payload(body=b"\x00"),
            response_status=pb.EchoStatus(code=2, message=SPECIAL_DETAILS))
        call = self.stub.UnaryCall(request)
        await _validate_async(call, mrpcd.StatusCode.UNKNOWN, SPECIAL_DETAILS)

    async def unimplemented_method(self):
        call = self.stub.UnimplementedCall(pb.Empty())
        if await call.code() is not mrpcd.StatusCode.UNIMPLEMENTED:
            raise ValueError(f"expected UNIMPLEMENTED, got {await call.code()}")

    async def unimplemented_service(self):
        call = self.unimplemented_stub.UnimplementedCall(pb.Empty())
        if await call.code() is not mrpcd.StatusCode.UNIMPLEMENTED:
            raise ValueError(f"expected UNIMPLEMENTED, got {await call.code()}")

    async def custom_metadata(self):
        initial_value = "test_initial_metadata_value"
        trailing_value = b"\x0a\x0b\x0a\x0b\x0a\x0b"
        metadata = ((_INITIAL_METADATA_KEY, initial_value), (_TRAILING_METADATA_KEY, trailing_value))

        async def validate(call):
            initial = dict(await call.initial_metadata())
            if initial[_INITIAL_METADATA_KEY] != initial_value:
                raise ValueError(f"expected initial metadata {initial_value!r}, got {initial[_INITIAL_METADATA_KEY]!r}")
            trailing = dict(await call.trailing_metadata())
            if trailing[_TRAILING_METADATA_KEY] != trailing_value:
                raise ValueError(f"expected trailing metadata {trailing_value!r}, got {trailing[_TRAILING_METADATA_KEY]!r}")

        request = pb.SimpleRequest(response_type=pb.PayloadType.COMPRESSABLE, response_size=1, payload=pb.Payload(body=b"\x00"))
        await validate(self.stub.UnaryCall(request, metadata=metadata))
        call = self.stub.FullDuplexCall(iter([pb.StreamingOutputCallRequest(
            response_type=pb.PayloadType.COMPRESSABLE, response_parameters=[pb.ResponseParameters(size=1)])]), metadata=metadata)
        await call.read()
        await validate(call)


async def _never():
    await asyncio.sleep(3600)
    yield  # pragma: no cover


async def _validate_async(call, code, details):
    if await call.code() != code:
        raise ValueError(f"expected code {code}, got {await call.code()}")
    if await call.details() != details:
        raise ValueError(f"expected message {details!r}, got {await call.details()!r}")


def _report(case: str, started: float, error: str | None) -> None:
    print(json.dumps({"case": case, "ok": error is None, "error": error, "seconds": round(time.monotonic() - started, 4)}), flush=True)


def run_sync(target: str, cases: list[str]) -> None:
    channel = mrpcd.insecure_channel(target)
    runner = SyncCases(pb.TestServiceStub(channel), pb.UnimplementedServiceStub(channel))
    for case in cases:
        started = time.monotonic()
        try:
            getattr(runner, case)()
            _report(case, started, None)
        except BaseException:
            _report(case, started, traceback.format_exc())


async def run_async(target: str, cases: list[str]) -> None:
    channel = mrpcd.aio.insecure_channel(target)
    runner = AsyncCases(pb.TestServiceStub(channel), pb.UnimplementedServiceStub(channel))
    for case in cases:
        started = time.monotonic()
        try:
            await asyncio.wait_for(getattr(runner, case)(), 10)
            _report(case, started, None)
        except BaseException:
            _report(case, started, traceback.format_exc())


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--target", required=True)
    p.add_argument("--async", dest="use_async", action="store_true")
    p.add_argument("--cases", default=",".join(CASES))
    args = p.parse_args()
    cases = args.cases.split(",")
    if args.use_async:
        asyncio.run(run_async(args.target, cases))
    else:
        run_sync(args.target, cases)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
