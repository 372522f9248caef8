"""ServingCertificate: the certificate one of our own TLS listeners presents (SDS over TLS, the
side-port, the bundle endpoint).

Issued by the :class:`~ca_service.services.issuer.Issuer` with a fresh key, renewed at half its
lifetime on the injected clock, and re-issued as soon as the signing intermediate changes (so the
chain leads to the roots peers are about to trust exclusively).  Each new pair is handed to the
listener's TLS context through ``install``; a failed renewal keeps the current pair and retries.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ca_service.clock import Clock
from ca_service.errors import NotReadyError
from ca_service.pki.identity import SpiffeId
from ca_service.pki.keys import PrivateKey, private_key_to_pem
from ca_service.pki.templates import CAKind
from ca_service.services.issuer import IssuedSvid, Issuer
from ca_service.services.state_changes import StateChange

log = logging.getLogger(__name__)

# Renew at half the lifetime, like workload SVIDs: a missed renewal still leaves half a life.
RENEW_FRACTION = 0.5
# Upper bound on one sleep of the renewal loop, so a wall-clock jump is noticed within the hour.
MAX_RENEW_CHECK = dt.timedelta(hours=1)
# A failed renewal is retried after a minute: the current certificate still has half its life left.
RETRY_DELAY = dt.timedelta(minutes=1)


@dataclass(frozen=True)
class ServingPair:
    svid: IssuedSvid
    key: PrivateKey

    def key_pem(self) -> bytes:
        return private_key_to_pem(self.key)

    def __repr__(self) -> str:  # never print the key
        return f"ServingPair(spiffe_id='{self.svid.spiffe_id}', serial={self.svid.serial})"


class ServingCertificate:
    """Issue, renew and hand over one listener's serving certificate."""

    def __init__(self, issuer: Issuer, spiffe_id: SpiffeId, clock: Clock, install: Callable[[ServingPair], None],
                 *, dns_names: Sequence[str] = (), name: str = "serving certificate") -> None:
        self._issuer = issuer
        self.spiffe_id = spiffe_id
        self._clock = clock
        self._install = install
        self.dns_names = tuple(dns_names)
        self.name = name
        self.current: ServingPair | None = None
        self._renewal: asyncio.Task[None] | None = None

    @property
    def svid(self) -> IssuedSvid | None:
        return None if self.current is None else self.current.svid

    def issue(self) -> ServingPair:
        """A new key and certificate, installed now.  Raises what :meth:`Issuer.issue_serving` raises."""
        key = self._issuer.new_key()
        svid = self._issuer.issue_serving(self.spiffe_id, key.public_key(), dns_names=self.dns_names,
                                          now=self._clock.now())
        pair = ServingPair(svid, key)
        self._install(pair)
        self.current = pair
        log.info("%s issued", self.name, extra={"spiffe_id": str(self.spiffe_id),
                                                 "serial": svid.serial,
                                                 "not_after": svid.not_after.isoformat()})
        return pair

    def renew_at(self) -> dt.datetime:
        assert self.current is not None
        svid = self.current.svid
        return svid.not_before + (svid.not_after - svid.not_before) * RENEW_FRACTION

    def start_renewal(self) -> None:
        """Issue (if not yet) and start the renewal loop on the running event loop."""
        if self.current is None:
            self.issue()
        if self._renewal is None:
            self._renewal = asyncio.get_running_loop().create_task(self._renew_loop(), name=f"{self.name} renewal")

    async def stop(self) -> None:
        if self._renewal is not None:
            self._renewal.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewal
            self._renewal = None

    def on_state_change(self, change: StateChange) -> None:
        """State reaction: re-issue under a new signing intermediate (nothing to do before the first issue)."""
        if self.current is None:
            return
        try:
            signer = change.new.active(CAKind.INTERMEDIATE)
        except NotReadyError:
            return  # mid-change state without a signer: keep the current certificate, it is still valid
        if signer.key_id != self.current.svid.issuer_key_id:
            self.issue()

    async def _renew_loop(self) -> None:
        while True:
            wait = min(self.renew_at() - self._clock.now(), MAX_RENEW_CHECK)
            if wait > dt.timedelta(0):
                await self._clock.sleep(wait)
                continue
            try:
                self.issue()
            except Exception:
                # Keep serving the current certificate and retry: the listener must not die of this.
                log.exception("renewing the %s failed; retrying in %s", self.name, RETRY_DELAY)
                await self._clock.sleep(RETRY_DELAY)
