"""TLS for the side-port: a serving certificate and the client-certificate check for admin callers.

Without ``cert_file``/``key_file`` the listener serves an SVID of our own CA
(``spiffe://<td>/ca-service/sideport``), renewed at half its lifetime.  Client certificates are
optional at the TLS layer (metrics and health stay reachable without one) unless
``require_client_cert``; when presented they must chain to ``client_ca_file`` or, by default, to our
own trust bundle — the admin allow-list then decides by SPIFFE ID.
"""

from __future__ import annotations

import logging
import ssl

from ca_service.adapters.tls_keys import load_chain_into
from ca_service.config import TLSSettings
from ca_service.pki.certs import certs_to_pem
from ca_service.pki.identity import SpiffeId
from ca_service.rotation.state import AuthorityState
from ca_service.services.authority import Authority
from ca_service.services.serving import ServingCertificate, ServingPair
from ca_service.services.state_changes import StateChange

log = logging.getLogger(__name__)

SIDEPORT_PATH = "/ca-service/sideport"


class SideportTls:
    def __init__(self, settings: TLSSettings, authority: Authority) -> None:
        self._settings = settings
        self._authority = authority
        self._context: ssl.SSLContext | None = None
        self.serving: ServingCertificate | None = None
        if settings.cert_file is None or settings.key_file is None:
            self.serving = ServingCertificate(authority.issuer, SpiffeId(authority.trust_domain, SIDEPORT_PATH),
                                              authority.clock, self._install,
                                              name="side-port serving certificate")

    def context(self) -> ssl.SSLContext:
        if self._context is None:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.verify_mode = ssl.CERT_REQUIRED if self._settings.require_client_cert else ssl.CERT_OPTIONAL
            if self._settings.client_ca_file is not None:
                ctx.load_verify_locations(cafile=str(self._settings.client_ca_file))
            else:
                self._trust_roots(ctx, self._authority.state)
            self._context = ctx
            if self.serving is not None:
                self.serving.issue()
            else:
                assert self._settings.cert_file is not None and self._settings.key_file is not None
                ctx.load_cert_chain(str(self._settings.cert_file), str(self._settings.key_file))
        return self._context

    def _install(self, pair: ServingPair) -> None:
        assert self._context is not None
        load_chain_into(self._context, pair.svid.chain, pair.key)

    def _trust_roots(self, ctx: ssl.SSLContext, state: AuthorityState) -> None:
        # Adding to a live context takes effect for new handshakes: a new root B is trusted as soon as
        # it is published (A → A+B).  OpenSSL cannot remove one; a retired root's certificates expire.
        ctx.load_verify_locations(cadata=certs_to_pem(state.roots).decode())

    def on_state_change(self, change: StateChange) -> None:
        """State reaction: trust new roots for client certificates; re-issue under a new signer."""
        if self._context is None:
            return
        if self._settings.client_ca_file is None:
            self._trust_roots(self._context, change.new)
        if self.serving is not None:
            self.serving.on_state_change(change)

    def start_renewal(self) -> None:
        if self.serving is not None and self._context is not None:
            self.serving.start_renewal()

    async def stop(self) -> None:
        if self.serving is not None:
            await self.serving.stop()
