"""Hostile SDS input: a forged NACK detail reaches the log escaped and bounded; a malformed frame is
refused with INVALID_ARGUMENT (issue 15 items 9 and 10)."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc

from tests.logs.capture import captured_log
from tests.logs.test_log_guard import RECORD_START
from tests.rpc.sds_fixtures import READ_TIMEOUT, SdsStack, node, read, request

FORGED = "bad\n2026-01-01 00:00:00,000 INFO    ca_service.app: all good\r\x1b[2J\x1b]0;owned\x07"
# A field of a protobuf with wire type 7 (invalid): no DiscoveryRequest parses from this.
MALFORMED_FRAME = b"\x0f\xff\xff\xff"
SDS = "/envoy.service.secret.v3.SecretDiscoveryService/"


async def test_a_nack_with_a_forged_line_and_ansi_and_200_kib_is_logged_escaped_on_one_bounded_line(
        sds: SdsStack, stub: sds_pb2_grpc.SecretDiscoveryServiceStub) -> None:
    call = stub.StreamSecrets()
    with captured_log() as out:
        await call.write(request(["default"], n=node("a")))
        first = await read(call)
        # 200 KiB: just under sds.max_request_bytes (256 KiB), which refuses bigger frames before any log.
        await call.write(request(["default"], nonce=first.nonce, error=FORGED + "Z" * (200 << 10)))
        # Requests are handled in order: once this is answered, the NACK has been logged.
        await call.write(request(["default", "ROOTCA"], version=first.version_info, nonce=first.nonce))
        await read(call)
    call.cancel()
    nack = [line for line in out.lines() if "SDS NACK" in line]
    assert len(nack) == 1, out.lines()
    assert "\\n2026-01-01" in nack[0] and "\\x1b[2J" in nack[0] and "\\x07" in nack[0]
    assert "more)" in nack[0] and len(nack[0]) < 4096
    assert all(RECORD_START.match(line) for line in out.lines()), "a line that is not a record start"
    assert "\x1b" not in out.text and "\r" not in out.text


@pytest.mark.parametrize("method", ["StreamSecrets", "DeltaSecrets"])
async def test_a_malformed_frame_ends_the_stream_with_invalid_argument(sds: SdsStack, method: str) -> None:
    async with grpc.aio.insecure_channel(sds.address(0)) as channel:
        call = channel.stream_stream(SDS + method, request_serializer=lambda b: b,
                                     response_deserializer=discovery_pb2.DiscoveryResponse.FromString)()
        await call.write(MALFORMED_FRAME)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _read_until_status(call)
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "protobuf" not in (caught.value.details() or "").lower()


async def _read_until_status(call: grpc.aio.StreamStreamCall) -> None:  # type: ignore[type-arg]
    response = await asyncio.wait_for(call.read(), READ_TIMEOUT)
    if response is grpc.aio.EOF:  # today's behaviour: the stream just ends (status OK)
        code = await asyncio.wait_for(call.code(), READ_TIMEOUT)
        raise AssertionError(f"stream ended with {code}, not an error")


async def test_a_malformed_fetch_is_invalid_argument_without_the_exception_class(sds: SdsStack) -> None:
    async with grpc.aio.insecure_channel(sds.address(0)) as channel:
        fetch = channel.unary_unary(SDS + "FetchSecrets", request_serializer=lambda b: b,
                                    response_deserializer=discovery_pb2.DiscoveryResponse.FromString)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await fetch(MALFORMED_FRAME, timeout=READ_TIMEOUT)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "Error" not in (caught.value.details() or "")
