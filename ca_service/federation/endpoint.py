"""Our SPIFFE bundle endpoint: an HTTPS listener that serves this trust domain's bundle at ``/``.

The bundle is read from the TrustStore on every request, so a root rotation (A -> A+B) is visible to
peers the moment the authority commits it — before anything is signed by B.  Profiles:

* ``https_spiffe``: the server presents an X509-SVID ``spiffe://<td>/ca-service/bundle-endpoint``
  from our own CA, re-issued when the signing intermediate changes and at half its lifetime;
* ``https_web``: the configured certificate and key (e.g. from a public or corporate CA).

No client authentication: a bundle holds only public certificates.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging
import ssl

from aiohttp import web
from prometheus_client import Counter

from ca_service.clock import Clock
from ca_service.config import BundleEndpointSettings, BundleProfile
from ca_service.errors import NotReadyError
from ca_service.federation.tls import load_chain_into, server_context
from ca_service.pki.identity import SpiffeId
from ca_service.pki.keys import generate_private_key
from ca_service.pki.templates import CAKind
from ca_service.rotation.state import AuthorityState
from ca_service.services.authority import Authority, IssuedSvid
from ca_service.services.trust import TrustStore
from ca_service.web.connections import CappedTCPSite, runner_kwargs

log = logging.getLogger(__name__)

BUNDLE_PATH = "/"
ENDPOINT_PATH = "/ca-service/bundle-endpoint"
# Re-issue at half the SVID's lifetime, like workload SVIDs: a missed check still leaves half a life.
RENEW_FRACTION = 0.5
# Upper bound on how long the renewal task sleeps, so a clock jump is noticed within the hour.
MAX_RENEW_CHECK = dt.timedelta(hours=1)


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
        self.svid: IssuedSvid | None = None
        self._ssl: ssl.SSLContext | None = None
        self._runner: web.AppRunner | None = None
        self._unsubscribe: list[object] = []
        self._renewal: asyncio.Task[None] | None = None
        self.port = 0
        self._refused = refused  # ca_connections_refused, when the daemon counts

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
            self._issue()
            self._unsubscribe.append(self._authority.subscribe(self._on_authority_change))
            self._renewal = asyncio.create_task(self._renew_loop(), name="bundle-endpoint-renewal")
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
        for unsubscribe in self._unsubscribe:
            unsubscribe()  # type: ignore[operator]
        self._unsubscribe.clear()
        if self._renewal is not None:
            self._renewal.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewal
        if self._runner is not None:
            await self._runner.cleanup()

    def _issue(self) -> None:
        assert self._ssl is not None
        key = generate_private_key(self._authority.settings.workload_key_algorithm)
        svid = self._authority.issue_svid(self.spiffe_id, key.public_key(), now=self._clock.now())
        load_chain_into(self._ssl, svid.chain, key)
        self.svid = svid
        log.info("bundle endpoint SVID issued", extra={"spiffe_id": str(self.spiffe_id),
                                                       "serial": format(svid.leaf.serial_number, "x"),
                                                       "not_after": svid.not_after.isoformat()})

    def _on_authority_change(self, old: AuthorityState, new: AuthorityState) -> None:
        # A new signing intermediate (intermediate or root rotation): re-issue so our chain leads to
        # the root peers are about to trust exclusively, before the old one is retired.
        try:
            signer = new.active(CAKind.INTERMEDIATE)
        except NotReadyError:
            return  # mid-change state without a signer: keep the current SVID, it is still valid
        if self.svid is not None and signer.key_id != self.svid.issuer_key_id:
            self._issue()

    def renew_at(self) -> dt.datetime:
        assert self.svid is not None
        return self.svid.not_before + (self.svid.not_after - self.svid.not_before) * RENEW_FRACTION

    async def _renew_loop(self) -> None:
        while True:
            wait = min(self.renew_at() - self._clock.now(), MAX_RENEW_CHECK)
            if wait <= dt.timedelta(0):
                try:
                    self._issue()
                except Exception:
                    log.exception("re-issuing the bundle endpoint SVID failed; retrying in a minute")
                    await asyncio.sleep(60)
                continue
            await asyncio.sleep(wait.total_seconds())
