"""Interop test server: grpc.testing.TestService served through the daemon in MRPCD_SOCKET.

Ported from grpc's interop server (tests/interop/methods.py TestService and its asyncio
twin): echoes metadata and status as the interop spec asks. Prints its address when ready.
"""
from __future__ import annotations

import argparse
import asyncio
import time

from serving import serve

import test_mrpc as pb

_INITIAL_METADATA_KEY = "x-grpc-test-echo-initial"
_TRAILING_METADATA_KEY = "x-grpc-test-echo-trailing-bin"
_US_IN_A_SECOND = 1000 * 1000


def _echo_metadata(context) -> tuple[tuple, tuple]:
    invocation = dict(context.invocation_metadata())
    initial = ((_INITIAL_METADATA_KEY, invocation[_INITIAL_METADATA_KEY]),) if _INITIAL_METADATA_KEY in invocation else ()
    trailing = ((_TRAILING_METADATA_KEY, invocation[_TRAILING_METADATA_KEY]),) if _TRAILING_METADATA_KEY in invocation else ()
    return initial, trailing


def _maybe_echo_status_and_message(request, context) -> None:
    if request.response_status is not None:
        context.set_code(request.response_status.code)
        context.set_details(request.response_status.message)


def _payload(size: int, kind=pb.PayloadType.COMPRESSABLE):
    return pb.Payload(type=kind, body=b"\x00" * size)


class TestService(pb.TestServiceServicer):
    def _maybe_echo_metadata(self, context) -> None:
        initial, trailing = _echo_metadata(context)
        if initial:
            context.send_initial_metadata(initial)
        if trailing:
            context.set_trailing_metadata(trailing)

    def EmptyCall(self, request, context):
        self._maybe_echo_metadata(context)
        return pb.Empty()

    def UnaryCall(self, request, context):
        self._maybe_echo_metadata(context)
        _maybe_echo_status_and_message(request, context)
        return pb.SimpleResponse(payload=_payload(request.response_size))

    def StreamingOutputCall(self, request, context):
        _maybe_echo_status_and_message(request, context)
        for params in request.response_parameters:
            if params.interval_us != 0:
                time.sleep(params.interval_us / _US_IN_A_SECOND)
            yield pb.StreamingOutputCallResponse(payload=_payload(params.size, request.response_type))

    def StreamingInputCall(self, request_iterator, context):
        aggregate = 0
        for request in request_iterator:
            if request.payload is not None and request.payload.body:
                aggregate += len(request.payload.body)
        return pb.StreamingInputCallResponse(aggregated_payload_size=aggregate)

    def FullDuplexCall(self, request_iterator, context):
        self._maybe_echo_metadata(context)
        for request in request_iterator:
            _maybe_echo_status_and_message(request, context)
            for params in request.response_parameters:
                if params.interval_us != 0:
                    time.sleep(params.interval_us / _US_IN_A_SECOND)
                yield pb.StreamingOutputCallResponse(payload=_payload(params.size, request.payload.type if request.payload else 0))

    def HalfDuplexCall(self, request_iterator, context):
        return self.FullDuplexCall(request_iterator, context)


class AsyncTestService(pb.TestServiceServicer):
    async def _maybe_echo_metadata(self, context) -> None:
        initial, trailing = _echo_metadata(context)
        if initial:
            await context.send_initial_metadata(initial)
        if trailing:
            context.set_trailing_metadata(trailing)

    async def EmptyCall(self, request, context):
        await self._maybe_echo_metadata(context)
        return pb.Empty()

    async def UnaryCall(self, request, context):
        await self._maybe_echo_metadata(context)
        _maybe_echo_status_and_message(request, context)
        return pb.SimpleResponse(payload=_payload(request.response_size))

    async def StreamingOutputCall(self, request, context):
        _maybe_echo_status_and_message(request, context)
        for params in request.response_parameters:
            if params.interval_us != 0:
                await asyncio.sleep(params.interval_us / _US_IN_A_SECOND)
            yield pb.StreamingOutputCallResponse(payload=_payload(params.size, request.response_type))

    async def StreamingInputCall(self, request_iterator, context):
        aggregate = 0
        async for request in request_iterator:
            if request.payload is not None and request.payload.body:
                aggregate += len(request.payload.body)
        return pb.StreamingInputCallResponse(aggregated_payload_size=aggregate)

    async def FullDuplexCall(self, request_iterator, context):
        await self._maybe_echo_metadata(context)
        async for request in request_iterator:
            _maybe_echo_status_and_message(request, context)
            for params in request.response_parameters:
                if params.interval_us != 0:
                    await asyncio.sleep(params.interval_us / _US_IN_A_SECOND)
                yield pb.StreamingOutputCallResponse(payload=_payload(params.size, request.payload.type if request.payload else 0))

    async def HalfDuplexCall(self, request_iterator, context):
        async for response in self.FullDuplexCall(request_iterator, context):
            yield response


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--address", default="127.0.0.1:0")
    p.add_argument("--async", dest="use_async", action="store_true")
    args = p.parse_args()
    servicer = AsyncTestService() if args.use_async else TestService()
    return serve(pb.add_TestServiceServicer_to_server, servicer, args.address, args.use_async)


if __name__ == "__main__":
    raise SystemExit(main())
