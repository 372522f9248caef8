"""The wall clock stepped forward and back by an hour under the real daemon (its injected clock follows the
system clock plus an offset that the test steps, as an NTP step or a VM restore would; asyncio's monotonic
timers are untouched, as they are by a real step). Nothing crashes, the state only moves forward, and
every SVID handed out over SDS is valid at the daemon's current time. (issue 15, "Fault injection")"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from envoy.service.secret.v3 import sds_pb2_grpc

from ca_service.app import App, build_app
from ca_service.config import load_settings
from tests.rpc.sds_fixtures import node, request, secrets_of

HOUR = dt.timedelta(hours=1)


class SteppedClock:
    """The system clock plus an offset the test steps: a real wall-clock step, seen by the daemon only."""

    def __init__(self) -> None:
        self.offset = dt.timedelta(0)

    def now(self) -> dt.datetime:
        return dt.datetime.now(dt.UTC) + self.offset

    async def sleep(self, delay: dt.timedelta) -> None:
        await asyncio.sleep(max(delay.total_seconds(), 0.0))  # durations run on real (monotonic) time


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[tuple[App, SteppedClock]]:
    clock = SteppedClock()
    settings = load_settings(environ={}, overrides={
        "data_dir": str(tmp_path / "data"), "http": {"address": "127.0.0.1:0"}, "ca": {"signing_workers": 0},
        "bundle_endpoint": {"enabled": False}, "rotation": {"tick_interval": "100ms"},
        "grpc": [{"address": "127.0.0.1:0", "trust_node_metadata": True}]})
    app = build_app(settings, clock=clock)
    await app.start()
    try:
        yield app, clock
    finally:
        await app.stop()


async def _fetch_leaf(app: App, node_name: str) -> x509.Certificate:
    assert app.sds is not None
    async with grpc.aio.insecure_channel(app.sds.bound_addresses[0]) as channel:
        stub = sds_pb2_grpc.SecretDiscoveryServiceStub(channel)
        response = await stub.FetchSecrets(request(["default"], n=node(node_name)), timeout=10)
    chain = secrets_of(response)["default"].tls_certificate.certificate_chain.inline_bytes
    return x509.load_pem_x509_certificates(chain)[0]


def _valid_at(leaf: x509.Certificate, now: dt.datetime) -> bool:
    return leaf.not_valid_before_utc <= now < leaf.not_valid_after_utc


async def test_an_hour_forward_then_back_every_svid_served_is_valid_now(
        daemon: tuple[App, SteppedClock]) -> None:
    app, clock = daemon
    before = await _fetch_leaf(app, "early")
    revision = app.authority.state.revision
    clock.offset = HOUR
    ahead = await _fetch_leaf(app, "stepped")
    assert _valid_at(ahead, clock.now())
    assert app.reconciler is not None
    await app.reconciler.reconcile()  # a tick in the future: nothing is due an hour in, nothing breaks
    clock.offset = dt.timedelta(0)
    await app.reconciler.reconcile()  # and a tick back in the past: renews what is not valid yet
    not_yet_valid = [c.spiffe_id for c in app.registry if not _valid_at(c.svid.leaf, clock.now())]
    assert not not_yet_valid, f"SVIDs held for streams are not valid at the daemon's time: {not_yet_valid}"
    for name in ("stepped", "early", "late"):
        leaf = await _fetch_leaf(app, name)
        assert _valid_at(leaf, clock.now()), (
            f"{name}: served an SVID valid from {leaf.not_valid_before_utc}, but the daemon's time is {clock.now()}")
    assert _valid_at(before, clock.now())
    assert app.authority.state.revision >= revision, "the CA state went back"
