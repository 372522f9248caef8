"""Idle floods and slow clients against the whole daemon (build_app + start) on real sockets.

A flood of idle connections on one listener must be cut at that listener's cap while the other
listeners (side-port /healthz, SDS) keep answering; a client that sends its request a byte at a time
is dropped at the header deadline; the open-file limit is raised at start.
"""

from __future__ import annotations

import asyncio
import os
import resource
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import grpc
import pytest
from envoy.service.secret.v3 import sds_pb2_grpc

from ca_service.app import App, build_app
from ca_service.config import load_settings
from tests.rpc.sds_fixtures import node, request

CAP = 20
FLOOD = 60
# Generous bound on how long the server may take to close what it must close (not a timing assertion:
# the test only fails if the connection is still open after it).
CLOSE_WAIT = 20.0


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[App]:
    limits = {"max_connections": CAP, "header_timeout": "2s"}
    settings = load_settings(environ={}, overrides={
        "data_dir": str(tmp_path / "data"), "http": {"address": "127.0.0.1:0", "connections": limits},
        "bundle_endpoint": {"address": "127.0.0.1:0", "connections": limits},
        "grpc": [{"address": "127.0.0.1:0", "trust_node_metadata": True}]})
    daemon = build_app(settings)
    await daemon.start()
    try:
        yield daemon
    finally:
        await daemon.stop()


def _sideport(app: App) -> tuple[str, int]:
    url = (app.settings.data_dir / "sideport.address").read_text().strip()
    host, _, port = url.removeprefix("http://").rpartition(":")
    return host, int(port)


def _bundle_port(app: App) -> int:
    from ca_service.federation.endpoint import BundleEndpoint
    return next(c for c in app.components if isinstance(c, BundleEndpoint)).port


async def _closed_by_server(reader: asyncio.StreamReader) -> bool:
    """True when the server closes (EOF or reset) within CLOSE_WAIT."""
    try:
        data = await asyncio.wait_for(reader.read(1024), CLOSE_WAIT)
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
    return data == b"" or await _closed_by_server(reader)


async def _probe(app: App) -> tuple[int, int]:
    host, port = _sideport(app)
    async with aiohttp.ClientSession() as session, session.get(f"http://{host}:{port}/healthz") as resp:
        health = resp.status
    assert app.sds is not None
    async with grpc.aio.insecure_channel(app.sds.bound_addresses[0]) as channel:
        response = await sds_pb2_grpc.SecretDiscoveryServiceStub(channel).FetchSecrets(
            request(["default"], n=node("a")), timeout=10)
    return health, len(response.resources)


async def test_an_idle_flood_on_the_bundle_endpoint_is_cut_at_its_cap_while_healthz_and_sds_answer(
        app: App) -> None:
    streams = [await asyncio.open_connection("127.0.0.1", _bundle_port(app)) for _ in range(FLOOD)]
    try:
        assert await _probe(app) == (200, 1)
        closed = await asyncio.gather(*(_closed_by_server(r) for r, _ in streams))
        # Beyond the cap at once; the rest (TLS handshake never started) at the handshake deadline.
        assert all(closed)
        refused = app.telemetry.registry.get_sample_value(
            "ca_connections_refused_total", {"listener": "bundle_endpoint", "reason": "max_connections"})
        assert refused is not None and refused >= FLOOD - CAP
        assert await _probe(app) == (200, 1)
    finally:
        for _, writer in streams:
            writer.close()


async def test_an_idle_flood_on_the_side_port_is_refused_beyond_its_cap_and_sds_still_answers(app: App) -> None:
    host, port = _sideport(app)
    streams = [await asyncio.open_connection(host, port) for _ in range(FLOOD)]
    try:
        assert app.sds is not None
        async with grpc.aio.insecure_channel(app.sds.bound_addresses[0]) as channel:
            response = await sds_pb2_grpc.SecretDiscoveryServiceStub(channel).FetchSecrets(
                request(["default"], n=node("a")), timeout=10)
        assert len(response.resources) == 1
        assert all(await asyncio.gather(*(_closed_by_server(r) for r, _ in streams)))
        refused = app.telemetry.registry.get_sample_value(
            "ca_connections_refused_total", {"listener": "http", "reason": "max_connections"})
        assert refused is not None and refused >= FLOOD - CAP
    finally:
        for _, writer in streams:
            writer.close()
    assert (await _probe(app))[0] == 200  # idle ones were closed at the deadline: room again


async def test_a_client_sending_one_byte_at_a_time_is_dropped_before_its_request_is_complete(app: App) -> None:
    host, port = _sideport(app)
    payload = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 200 + b"\r\n\r\n"
    reader, writer = await asyncio.open_connection(host, port)
    sent = 0
    try:
        for byte in payload:
            writer.write(bytes([byte]))
            await writer.drain()
            sent += 1
            if reader.at_eof():
                break
            try:
                if await asyncio.wait_for(reader.read(1), 0.1) == b"":
                    break
            except TimeoutError:
                continue
    except (ConnectionResetError, BrokenPipeError):
        pass
    finally:
        writer.close()
    # 0.1 s per byte: the whole request would take > 20 s; the 2 s header deadline cuts it long before.
    assert sent < len(payload)


def test_the_open_file_soft_limit_is_raised_to_the_hard_limit() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = min(256, hard)
    # The child lowers its own soft limit first: a preexec_fn in this threaded test process can abort the
    # child between fork and exec (it did once in CI, SIGABRT).
    code = (f"import resource; resource.setrlimit(resource.RLIMIT_NOFILE, ({low}, {hard})); "
            "from ca_service.process_limits import raise_open_file_limit; "
            "print(*raise_open_file_limit(), *resource.getrlimit(resource.RLIMIT_NOFILE))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    reported_soft, reported_hard, now_soft, now_hard = map(int, out.stdout.split())
    assert (reported_soft, reported_hard) == (hard, hard)
    assert (now_soft, now_hard) == (hard, hard)


async def test_accept_running_out_of_descriptors_is_counted_and_logged_once_not_per_attempt(
        caplog: pytest.LogCaptureFixture) -> None:
    from ca_service.process_limits import AcceptErrorHandler
    from ca_service.telemetry import Telemetry

    telemetry = Telemetry()
    handler = AcceptErrorHandler(telemetry.connections_refused)
    loop = asyncio.get_running_loop()
    context = {"message": "socket.accept() out of system resource", "exception": OSError(24, "Too many open files")}
    with caplog.at_level("DEBUG"):
        for _ in range(500):
            handler(loop, context)
    assert telemetry.registry.get_sample_value(
        "ca_connections_refused_total", {"listener": "any", "reason": "out_of_file_descriptors"}) == 500
    records = [r for r in caplog.records if "out of file descriptors" in r.getMessage()]
    assert len(records) == 1 and records[0].exc_info is None
    assert handler.suppressed == 499


async def test_idle_sockets_on_the_sds_port_are_closed_at_the_handshake_deadline_while_sds_answers(
        tmp_path: Path) -> None:
    settings = load_settings(environ={}, overrides={
        "data_dir": str(tmp_path / "data"), "http": {"address": "127.0.0.1:0"},
        "bundle_endpoint": {"enabled": False}, "sds": {"max_connections": CAP, "handshake_timeout": "1s"},
        "grpc": [{"address": "127.0.0.1:0", "trust_node_metadata": True}]})
    daemon = build_app(settings)
    await daemon.start()
    try:
        assert daemon.sds is not None
        host, _, port = daemon.sds.bound_addresses[0].rpartition(":")
        streams = [await asyncio.open_connection(host, int(port)) for _ in range(FLOOD)]
        try:
            assert all(await asyncio.gather(*(_closed_by_server(r) for r, _ in streams)))
        finally:
            for _, writer in streams:
                writer.close()
        assert await _probe(daemon) == (200, 1)
    finally:
        await daemon.stop()
