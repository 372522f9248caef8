"""Two federation stacks in one process: Authority on a DirectoryStore, TrustStore, bundle endpoint,
peer pollers and bundle files, each on 127.0.0.1:0 and its own data directory."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web
from cryptography import x509

from ca_service.adapters.tls_keys import load_chain_into
from ca_service.app import register_reactions
from ca_service.config import BundleEndpointSettings, BundleProfile, CASettings, PeerSettings
from ca_service.federation.endpoint import BundleEndpoint
from ca_service.federation.files import BundleFilePublisher
from ca_service.federation.lastgood import LastGoodStore
from ca_service.federation.peers import Federation
from ca_service.federation.tls import server_context
from ca_service.pki.identity import SpiffeId, TrustDomain
from ca_service.pki.keys import PrivateKey, generate_private_key
from ca_service.pki.templates import CAKind
from ca_service.rotation.minting import mint_intermediate, mint_root
from ca_service.rotation.state import SlotState
from ca_service.services.authority import Authority
from ca_service.services.trust import TrustStore
from ca_service.storage.directory import DirectoryStore
from ca_service.telemetry import Telemetry
from tests.clock import FakeClock

# Short enough for the test to wait for one poll, long enough that polls do not pile up.
TEST_REFRESH = dt.timedelta(milliseconds=200)


@dataclass
class Region:
    name: str
    data_dir: Path
    clock: FakeClock
    authority: Authority
    trust: TrustStore
    telemetry: Telemetry
    endpoint: BundleEndpoint
    files: BundleFilePublisher
    federation: Federation | None = None
    started: list[object] = field(default_factory=list)

    @property
    def td(self) -> TrustDomain:
        return self.authority.trust_domain

    def bootstrap_file(self) -> Path:
        """What ``ca-service bundle --format spiffe > <name>-bundle.json`` exports."""
        path = self.data_dir.parent / f"{self.name}-bundle.json"
        path.write_bytes(self.authority.bundle().to_json())
        return path

    def peer_settings(self, *, refresh: dt.timedelta = TEST_REFRESH) -> PeerSettings:
        return PeerSettings(trust_domain=self.td.name, profile=BundleProfile.HTTPS_SPIFFE,
                            endpoint_url=self.endpoint.url, endpoint_spiffe_id=str(self.endpoint.spiffe_id),
                            bootstrap_bundle=self.bootstrap_file(), refresh_hint=refresh)

    async def federate(self, peers: Sequence[PeerSettings]) -> Federation:
        self.federation = Federation(peers, self.trust, LastGoodStore(self.data_dir / "federation"),
                                     self.telemetry, self.clock)
        await self.federation.start()
        return self.federation

    async def stop(self) -> None:
        if self.federation is not None:
            await self.federation.stop()
        await self.files.stop()
        await self.endpoint.stop()

    def failures(self, peer: TrustDomain, reason: str) -> float:
        value = self.telemetry.registry.get_sample_value(
            "ca_trust_bundle_refresh_failures_total", {"trust_domain": peer.name, "reason": reason})
        return value or 0.0

    def rotate_root_publish(self) -> x509.Certificate:
        """Root rotation step one (A -> A+B): B enters the bundle, A still signs."""
        state = self.authority.state
        new_root = mint_root(self.td, algorithm=self.authority.settings.key_algorithm,
                             ttl=self.authority.settings.root_ttl, now=self.clock.now(), state=SlotState.PREPARED)
        self.authority.commit(state.replace(entries=(*state.entries, new_root)))
        return new_root.cert

    def rotate_root_sign_with_new(self) -> None:
        """Step two/three: an intermediate under B signs, A leaves the bundle."""
        state = self.authority.state
        new_root = next(e for e in state.of_kind(CAKind.ROOT) if e.state is SlotState.PREPARED)
        signing = mint_intermediate(new_root.with_state(SlotState.ACTIVE), self.td, kind=CAKind.INTERMEDIATE,
                                    algorithm=self.authority.settings.key_algorithm,
                                    ttl=self.authority.settings.intermediate_ttl, now=self.clock.now())
        entries = [new_root.with_state(SlotState.ACTIVE), signing]
        self.authority.commit(state.replace(entries=entries))


async def start_region(name: str, base: Path, clock: FakeClock, *, reuse: Path | None = None) -> Region:
    data_dir = reuse or base / name
    td = TrustDomain(f"{name}.cluster.local")
    authority = Authority(DirectoryStore(data_dir / "state"), td, CASettings(), clock)
    authority.load_or_bootstrap()
    trust = TrustStore(authority)
    endpoint = BundleEndpoint(BundleEndpointSettings(address="127.0.0.1:0", refresh_hint=dt.timedelta(seconds=1)),
                              trust, authority, clock)
    files = BundleFilePublisher(trust, data_dir / "bundles")
    register_reactions(authority.reactions, trust=trust, endpoint=endpoint)
    await endpoint.start()
    await files.start()
    return Region(name, data_dir, clock, authority, trust, Telemetry(), endpoint, files)


class RogueEndpoint:
    """An HTTPS server with any chain and any body: the malicious or broken peer."""

    def __init__(self, chain: Sequence[x509.Certificate], key: PrivateKey, body: bytes = b"{}") -> None:
        self.chain, self.key, self.body = chain, key, body
        self.status = 200
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def _handle(self, request: web.Request) -> web.Response:
        return web.Response(body=self.body, status=self.status, content_type="application/json")

    async def start(self) -> None:
        context = server_context()
        load_chain_into(context, self.chain, self.key)
        app = web.Application()
        app.router.add_get("/", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=context)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}/"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


def svid_of(authority: Authority, path: str) -> tuple[tuple[x509.Certificate, ...], PrivateKey]:
    key = generate_private_key()
    svid = authority.issue_svid(SpiffeId(authority.trust_domain, path), key.public_key())
    return svid.chain, key


def replace_sequence(bundle_json: bytes, sequence: int) -> bytes:
    doc = json.loads(bundle_json)
    doc["spiffe_sequence"] = sequence
    return json.dumps(doc).encode()

