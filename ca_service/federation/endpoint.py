"""Our SPIFFE bundle endpoint: an HTTPS listener that serves this trust domain's bundle at ``/``.

The bundle is read from the TrustStore on every request, so a root rotation (A -> A+B) is visible to
peers the moment the authority commits it — before anything is signed by B.  Profiles:

* ``https_spiffe``: the server presents an X509-SVID ``spiffe://<td>/ca-service/bundle-endpoint``
  from our own CA (a :class:`~ca_service.services.serving.ServingCertificate`: re-issued when the
  signing intermediate changes and at half its lifetime);
* ``https_web``: the configured certificate and key (e.g. from a public or corporate CA).

No client authentication: a bundle holds only public certificates.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import ssl

from aiohttp import web
from prometheus_client import Counter

from ca_service.adapters.tls_keys import load_chain_into
from ca_service.clock import Clock
from ca_service.config import BundleEndpointSettings, BundleProfile
from ca_service.federation.tls import server_context
from ca_service.pki.identity import SpiffeId
from ca_service.services.authority import Authority
from ca_service.services.issuer import IssuedSvid
from ca_service.services.serving import ServingCertificate, ServingPair
from ca_service.services.state_changes import StateChange
from ca_service.services.trust import TrustStore
from ca_service.web.connections import CappedTCPSite, runner_kwargs

log = logging.getLogger(__name__)

BUNDLE_PATH = "/"
ENDPOINT_PATH = "/ca-service/bundle-endpoint"


def endpoint_spiffe_id(authority: Authority) -> SpiffeId:
    """The SPIFFE ID our endpoint presents; peers put it in ``endpoint_spiffe_id``."""
    return SpiffeId(authority.trust_domain, ENDPOINT_PATH)


class BundleEndpoint:
    """The bundle endpoint component.  After :meth:`start`, :attr:`port` is the bound port (``:0`` works)."""

    name = "bundle-endpoint"

    def __init__(self, settings: BundleEndpointSettings, trust: TrustStore, authority: Authority,
                 clock: Clock, *, refused: Counter | None = None) -> None:
        if settings.profile is BundleProfile.STATIC:
            raise ValueError("a bundle endpoint is https_spiffe or https_web")
        self.settings = settings
        self._trust = trust
        self._authority = authority
        self._clock = clock
        self.spiffe_id = endpoint_spiffe_id(authority)
        self._ssl: ssl.SSLContext | None = None
        self.serving = ServingCertificate(authority.issuer, self.spiffe_id, clock, self._install,
                                          name="bundle endpoint SVID")
        self._runner: web.AppRunner | None = None
        self.port = 0
        self._refused = refused  # ca_connections_refused, when the daemon counts

    @property
    def svid(self) -> IssuedSvid | None:
        return self.serving.svid

    def _install(self, pair: ServingPair) -> None:
        assert self._ssl is not None
        load_chain_into(self._ssl, pair.svid.chain, pair.key)

    @property
    def url(self) -> str:
        host = self.settings.address.rpartition(":")[0]
        return f"https://{host}:{self.port}{BUNDLE_PATH}"

    async def _serve_bundle(self, request: web.Request) -> web.Response:
        # Our refresh hint comes from configuration (the authority's bundle carries the default).
        bundle = dataclasses.replace(self._trust.own_bundle(), refresh_hint=self.settings.refresh_hint)
        return web.Response(body=bundle.to_json(), content_type="application/json",
                            headers={"Cache-Control": "no-store"})

    async def start(self) -> None:
        self._ssl = server_context()
        if self.settings.profile is BundleProfile.HTTPS_WEB:
            assert self.settings.cert_file is not None and self.settings.key_file is not None
            self._ssl.load_cert_chain(self.settings.cert_file, self.settings.key_file)
        else:
            self.serving.start_renewal()
        app = web.Application()
        app.router.add_get(BUNDLE_PATH, self._serve_bundle)
        self._runner = web.AppRunner(app, access_log=None, **runner_kwargs(self.settings.connections))
        await self._runner.setup()
        host, _, port = self.settings.address.rpartition(":")
        site = CappedTCPSite(self._runner, host, int(port), ssl_context=self._ssl, limits=self.settings.connections,
                             name="bundle_endpoint", refused=self._refused)
        await site.start()
        server = site._server  # aiohttp exposes the bound socket only through the asyncio server
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else int(port)
        log.info("bundle endpoint listening", extra={"url": self.url, "profile": str(self.settings.profile),
                                                     "spiffe_id": str(self.spiffe_id)})

    async def stop(self) -> None:
        await self.serving.stop()
        if self._runner is not None:
            await self._runner.cleanup()

    def on_state_change(self, change: StateChange) -> None:
        """State reaction (registered by the assembly): see :meth:`ServingCertificate.on_state_change`."""
        self.serving.on_state_change(change)

    def renew_at(self) -> dt.datetime:
        return self.serving.renew_at()
