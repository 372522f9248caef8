"""A running side-port on 127.0.0.1:0 over a real Authority on a DirectoryStore in tmp_path."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from ca_service.app import register_reactions
from ca_service.clock import SystemClock
from ca_service.config import Settings, load_settings
from ca_service.pki.identity import SpiffeId, TrustDomain
from ca_service.services.authority import Authority
from ca_service.services.trust import TrustStore
from ca_service.services.workloads import WorkloadRegistry
from ca_service.storage.directory import DirectoryStore
from ca_service.telemetry import Telemetry
from ca_service.web.server import HttpSideport

from .fakes import FakeRotator

TD = TrustDomain("cluster.local")
ADMIN_ID = "spiffe://cluster.local/ns/ops/sa/sre"


@dataclasses.dataclass
class Daemon:
    settings: Settings
    authority: Authority
    registry: WorkloadRegistry
    trust: TrustStore
    telemetry: Telemetry
    rotator: FakeRotator
    sideport: HttpSideport
    session: aiohttp.ClientSession

    @property
    def url(self) -> str:
        return self.sideport.url

    @property
    def token(self) -> str:
        return self.settings.admin_token_file.read_text().strip()

    def auth(self, token: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token or self.token}"}

    def audit_lines(self) -> list[str]:
        path = self.settings.audit_log_file
        return path.read_text().splitlines() if path.exists() else []


def web_settings(tmp_path: Path, **http: object) -> Settings:
    # The real clock throughout: TLS handshakes check validity against the wall clock.
    return load_settings(environ={}, overrides={
        "data_dir": str(tmp_path / "data"),
        "http": {"address": "127.0.0.1:0", "admin": {"allowed_spiffe_ids": [ADMIN_ID]}, **http},
    })


async def start_daemon(settings: Settings) -> Daemon:
    clock = SystemClock()
    authority = Authority(DirectoryStore(settings.data_dir / "state"), settings.domain, settings.ca, clock)
    authority.load_or_bootstrap()
    registry = WorkloadRegistry(authority, settings.rotation, clock, rng=random.Random(7))
    trust = TrustStore(authority)
    telemetry = Telemetry()
    rotator = FakeRotator(authority, registry)
    sideport = HttpSideport(settings, authority, telemetry, clock, registry=registry, trust=trust, rotator=rotator,
                            readiness_checks={"grpc_serving": lambda: True})
    register_reactions(authority.reactions, trust=trust, sideport=sideport)
    await sideport.start()
    return Daemon(settings, authority, registry, trust, telemetry, rotator, sideport, aiohttp.ClientSession())


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[Daemon]:
    d = await start_daemon(web_settings(tmp_path))
    try:
        yield d
    finally:
        await d.session.close()
        await d.sideport.stop()


def sa(ns: str, name: str) -> SpiffeId:
    return SpiffeId.for_service_account(TD, ns, name)
