"""TLS for the side-port: a serving certificate and the client-certificate check for admin callers.

Without ``cert_file``/``key_file`` the listener serves an SVID of our own CA
(``spiffe://<td>/ca-service/sideport``), renewed at half its lifetime.  Client certificates are
optional at the TLS layer (metrics and health stay reachable without one) unless
``require_client_cert``; when presented they must chain to ``client_ca_file`` or, by default, to our
own trust bundle — the admin allow-list then decides by SPIFFE ID.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import ssl
import tempfile
from pathlib import Path

from ca_service.config import TLSSettings
from ca_service.pki.certs import certs_to_pem
from ca_service.pki.identity import SpiffeId
from ca_service.pki.keys import generate_private_key, private_key_to_pem
from ca_service.rotation.state import AuthorityState
from ca_service.services.authority import Authority

log = logging.getLogger(__name__)

SIDEPORT_PATH = "/ca-service/sideport"
# Never spin: even an already-due renewal waits a second after the last attempt.
MIN_RENEW_DELAY = dt.timedelta(seconds=1)


class SideportTls:
    def __init__(self, settings: TLSSettings, authority: Authority) -> None:
        self._settings = settings
        self._authority = authority
        self._context: ssl.SSLContext | None = None
        self._renew_task: asyncio.Task[None] | None = None
        self._renew_at: dt.datetime | None = None

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
            self._renew_at = self._load_serving_cert()
        return self._context

    def _trust_roots(self, ctx: ssl.SSLContext, state: AuthorityState) -> None:
        # Adding to a live context takes effect for new handshakes: a new root B is trusted as soon as
        # it is published (A → A+B).  OpenSSL cannot remove one; a retired root's certificates expire.
        ctx.load_verify_locations(cadata=certs_to_pem(state.roots).decode())

    def on_authority_change(self, _old: AuthorityState, new: AuthorityState) -> None:
        if self._context is not None and self._settings.client_ca_file is None:
            self._trust_roots(self._context, new)

    def _load_serving_cert(self) -> dt.datetime | None:
        """Load the configured pair, or a fresh SVID of ours; returns when the SVID should be renewed."""
        assert self._context is not None
        if self._settings.cert_file is not None and self._settings.key_file is not None:
            self._context.load_cert_chain(str(self._settings.cert_file), str(self._settings.key_file))
            return None
        key = generate_private_key(self._authority.settings.workload_key_algorithm)
        svid = self._authority.issue_svid(SpiffeId(self._authority.trust_domain, SIDEPORT_PATH), key.public_key())
        # ssl only loads from files: a private temporary directory, removed right after loading.
        with tempfile.TemporaryDirectory(prefix="ca-sideport-") as tmp:
            cert_path, key_path = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
            cert_path.write_bytes(certs_to_pem(svid.chain))
            fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(private_key_to_pem(key))
            self._context.load_cert_chain(str(cert_path), str(key_path))
        log.info("side-port serving certificate issued",
                 extra={"serial": f"{svid.leaf.serial_number:x}", "not_after": svid.not_after.isoformat()})
        return svid.not_before + (svid.not_after - svid.not_before) / 2

    def start_renewal(self) -> None:
        if self._renew_at is not None and self._renew_task is None:
            self._renew_task = asyncio.get_running_loop().create_task(self._renew_loop(), name="sideport-tls-renew")

    async def _renew_loop(self) -> None:
        renew_at = self._renew_at
        while renew_at is not None:
            delay = renew_at - self._authority.clock.now()
            await self._authority.clock.sleep(max(delay, MIN_RENEW_DELAY))
            try:
                renew_at = self._load_serving_cert()
            except Exception:
                # Keep serving the current certificate and retry: the side-port must not die of this.
                log.exception("renewing the side-port serving certificate failed; retrying in 60s")
                renew_at = self._authority.clock.now() + dt.timedelta(seconds=60)

    async def stop(self) -> None:
        if self._renew_task is not None:
            self._renew_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renew_task
            self._renew_task = None
