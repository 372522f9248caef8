"""A client that sends large requests and never reads must not grow the daemon without bound.

The daemon runs as a real subprocess (``python -m ca_service serve``) so its resident set size can be
read from /proc; the client is a raw grpc.aio stream that writes and never reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc

from ca_service.rpc.sds_resources import SECRET_TYPE_URL
from tests.envoy_harness.traffic import free_port
from tests.processes import stop
from tests.rpc.sds_fixtures import node

REPO = Path(__file__).resolve().parents[2]
MIB = 1024 * 1024
# What 300 x 1 MiB may cost at most; the issue measured +271 MB before the fix.
RSS_GROWTH_BOUND = 100 * MIB


def _rss(pid: int, field: str = "VmRSS") -> int:
    """Resident set size now (VmRSS) or at its peak so far (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field}")


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    address = f"127.0.0.1:{free_port()}"
    config = tmp_path / "ca-service.yaml"
    config.write_text(f"""
data_dir: {tmp_path / 'data'}
ca: {{signing_workers: 0}}
grpc: [{{address: "{address}", trust_node_metadata: true}}]
http: {{address: "127.0.0.1:0"}}
bundle_endpoint: {{enabled: false}}
""")
    log = (tmp_path / "daemon.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "ca_service", "--config", str(config), "serve"], stdout=log,
                            stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 60
        while b"ca-service ready" not in (tmp_path / "daemon.log").read_bytes():
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "daemon.log").read_text()
            time.sleep(0.1)
        yield proc, address
    finally:
        stop(proc)
        log.close()


def _big_request(index: int, pad: int, *, names: int = 0) -> discovery_pb2.DiscoveryRequest:
    """Alternating ``default`` / ``ROOTCA``, so every request is answered (and the answers pile up unread).

    ``pad`` bytes of node metadata; ``names`` extra well-formed names of unknown trust domains (~250 bytes each,
    silently unanswered), so a request can be large and still within every bound.
    """
    n = node("a")
    n.metadata.update({"PAD": "x" * pad})
    extra = [f"spiffe://td-{i:04d}-" + "a" * 230 for i in range(names)]
    return discovery_pb2.DiscoveryRequest(node=n, resource_names=["default" if index % 2 else "ROOTCA", *extra],
                                          type_url=SECRET_TYPE_URL)


async def _send_without_reading(address: str, requests: list[discovery_pb2.DiscoveryRequest]) -> int:
    """Write every request (a new stream when the server ended the previous one); never read. Returns streams."""
    streams = 1
    async with grpc.aio.insecure_channel(address, options=[("grpc.max_send_message_length", 8 * MIB)]) as channel:
        stub = sds_pb2_grpc.SecretDiscoveryServiceStub(channel)
        call = stub.StreamSecrets()
        for req in requests:
            try:
                await asyncio.wait_for(call.write(req), 2.0)
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError, grpc.aio.UsageError):
                call.cancel()
                call, streams = stub.StreamSecrets(), streams + 1
            except TimeoutError:
                # The server stopped reading (backpressure): the write waits on flow control.  Move on to
                # a fresh stream so the flood continues.
                call.cancel()
                call, streams = stub.StreamSecrets(), streams + 1
        call.cancel()
    return streams


async def _open_streams_without_reading(address: str, request: discovery_pb2.DiscoveryRequest, count: int,
                                        pid: int) -> int:
    """``count`` streams each send ``request`` and stay open, unread; returns the peak RSS meanwhile."""
    options = [("grpc.max_send_message_length", 8 * MIB)]
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        stub = sds_pb2_grpc.SecretDiscoveryServiceStub(channel)
        calls = [stub.StreamSecrets() for _ in range(count)]
        for call in calls:
            # Refused (the fix) or held by flow control: keep going either way.
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError, grpc.aio.UsageError,
                                     TimeoutError):
                await asyncio.wait_for(call.write(request), 2.0)
        await asyncio.sleep(2.0)  # let the server take in what it accepted (the peak is what is asserted)
        peak = _rss(pid, "VmHWM")
        for call in calls:
            call.cancel()
    return peak


async def test_300_one_mib_requests_never_read_leave_the_daemon_rss_bounded(
        daemon: tuple[subprocess.Popen[bytes], str]) -> None:
    proc, address = daemon
    before = _rss(proc.pid)
    await _send_without_reading(address, [_big_request(i, MIB) for i in range(300)])  # one stream
    peak = await _open_streams_without_reading(address, _big_request(0, MIB), 300, proc.pid)  # 300 streams
    assert proc.poll() is None
    assert peak - before < RSS_GROWTH_BOUND


async def test_valid_requests_under_the_size_bound_sent_without_reading_leave_the_rss_bounded(
        daemon: tuple[subprocess.Popen[bytes], str]) -> None:
    proc, address = daemon
    before = _rss(proc.pid)
    # ~60 KB of metadata and 240 names of ~250 bytes: ~120 KB each, under every bound, so the server reads
    # them; 2,000 of them (240 MB) must not all end up in its memory.
    requests = [_big_request(i % 2, 60_000, names=240) for i in range(2)]
    await _send_without_reading(address, [requests[i % 2] for i in range(2000)])
    assert proc.poll() is None
    assert _rss(proc.pid) - before < RSS_GROWTH_BOUND
