"""Keeping peer bundles fresh: one poller per configured peer, and the component that runs them all.

A poller fetches at the refresh hint (the peer's own ``spiffe_refresh_hint`` unless configuration
overrides it), retries failures with exponential backoff and jitter, and only ever moves the
TrustStore forward: a rejected fetch logs, counts ``ca_trust_bundle_refresh_failures{reason}`` and
leaves the current bundle in place.  Staleness is ``now - ca_trust_bundle_last_refresh_timestamp_seconds``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import random
from collections.abc import Callable, Sequence
from pathlib import Path

from ca_service.clock import Clock
from ca_service.config import BundleProfile, PeerSettings
from ca_service.errors import CAServiceError
from ca_service.federation import policy
from ca_service.federation.lastgood import LastGoodStore
from ca_service.federation.policy import BundleRejectedError
from ca_service.federation.sources import BundleSource, build_source
from ca_service.pki.bundle import DEFAULT_REFRESH_HINT, TrustBundle
from ca_service.pki.identity import TrustDomain
from ca_service.services.trust import TrustStore
from ca_service.telemetry import Telemetry

log = logging.getLogger(__name__)

# First retry after a second (a peer restarting is back quickly), doubling up to the refresh interval:
# retrying a down peer more often than we would poll a healthy one only adds load to its recovery.
MIN_BACKOFF = dt.timedelta(seconds=1)
# How often a file source is stat()ed: "re-read as soon as it changes" within a second, for one syscall.
WATCH_INTERVAL = dt.timedelta(seconds=1)

SourceFactory = Callable[[PeerSettings, Callable[[], TrustBundle]], BundleSource]


def backoff_delay(failures: int, cap: dt.timedelta, *, rng: random.Random | None = None) -> dt.timedelta:
    """Delay before retry number ``failures`` (1-based): 1s, 2s, 4s ... capped, then 50-100% jitter
    so that every region's pollers do not hit a recovering peer in the same second."""
    doubling: int = 2 ** min(failures - 1, 30)
    base: dt.timedelta = min(MIN_BACKOFF * doubling, max(cap, MIN_BACKOFF))
    factor: float = (rng or random).uniform(0.5, 1.0)
    return base * factor


class PeerPoller:
    """Fetch, validate and store the bundle of one peer trust domain."""

    def __init__(self, trust_domain: TrustDomain, source: BundleSource, trust: TrustStore, last_good: LastGoodStore,
                 telemetry: Telemetry, clock: Clock, *, refresh_override: dt.timedelta | None = None,
                 bootstrap: TrustBundle | None = None) -> None:
        self.trust_domain = trust_domain
        self.source = source
        self._trust = trust
        self._last_good = last_good
        self._telemetry = telemetry
        self._clock = clock
        self._refresh_override = refresh_override
        self.bootstrap = bootstrap
        self.current: TrustBundle | None = None
        self.last_refresh: dt.datetime | None = None
        self.failures = 0
        self.last_error = ""

    def authenticating_bundle(self) -> TrustBundle:
        """Roots that authenticate the peer's endpoint: the latest accepted bundle, else the bootstrap one.
        Following the latest lets the peer rotate its root with no configuration change."""
        bundle = self.current or self.bootstrap
        if bundle is None:
            raise CAServiceError(f"no bundle of {self.trust_domain} to authenticate its endpoint with")
        return bundle

    @property
    def refresh_interval(self) -> dt.timedelta:
        if self._refresh_override is not None:
            return self._refresh_override
        return self.current.refresh_hint if self.current else DEFAULT_REFRESH_HINT

    def staleness(self, now: dt.datetime) -> dt.timedelta | None:
        return None if self.last_refresh is None else now - self.last_refresh

    def restore(self) -> None:
        """Trust the last good bundle from disk, else the bootstrap bundle, before the first fetch."""
        saved = self._last_good.load(self.trust_domain)
        if saved is not None:
            self._install(saved.bundle, saved.fetched_at, persist=False)
            log.info("restored last good bundle", extra=self._fields(saved.bundle))
        elif self.bootstrap is not None:
            # Not persisted and no last_refresh: it was never fetched, so staleness stays "unknown".
            self.current = self.bootstrap
            self._trust.set_peer(self.bootstrap)
            self._record_gauges(self.bootstrap)

    async def refresh_once(self) -> bool:
        """One fetch; returns whether a bundle was accepted (unchanged roots count as success)."""
        try:
            candidate = await self.source.fetch(self.current)
            policy.check_candidate(self.current, candidate)
        except BundleRejectedError as exc:
            self._reject(str(exc), exc.reason)
            return False
        except Exception as exc:  # a bug must not kill the poller or the old bundle
            log.exception("bundle refresh of %s failed unexpectedly", self.trust_domain)
            self._reject(str(exc), policy.INTERNAL)
            return False
        self._install(candidate, self._clock.now(), persist=True)
        self.failures, self.last_error = 0, ""
        return True

    def _install(self, bundle: TrustBundle, fetched_at: dt.datetime, *, persist: bool) -> None:
        changed = self.current is None or self.current.fingerprints() != bundle.fingerprints()
        if persist:
            # Disk before TrustStore: what we hand out must survive a restart (the authority's rule too).
            self._last_good.save(bundle, fetched_at)
        self.current, self.last_refresh = bundle, fetched_at
        self._trust.set_peer(bundle)
        self._record_gauges(bundle)
        self._telemetry.bundle_last_refresh.labels(trust_domain=str(self.trust_domain)).set(fetched_at.timestamp())
        if changed and persist:
            log.info("peer bundle updated", extra=self._fields(bundle))

    def _record_gauges(self, bundle: TrustBundle) -> None:
        td = str(self.trust_domain)
        self._telemetry.bundle_roots.labels(trust_domain=td).set(len(bundle.roots))
        self._telemetry.bundle_sequence.labels(trust_domain=td).set(bundle.sequence)

    def _reject(self, message: str, reason: str) -> None:
        self.failures += 1
        self.last_error = message
        self._telemetry.bundle_refresh_failures.labels(trust_domain=str(self.trust_domain), reason=reason).inc()
        kept = f"keeping sequence {self.current.sequence}" if self.current else "no bundle yet"
        log.warning("bundle refresh of %s rejected (%s): %s; %s", self.trust_domain, reason, message, kept,
                    extra={"trust_domain": str(self.trust_domain), "reason": reason, "failures": self.failures})

    def next_delay(self) -> dt.timedelta:
        if self.failures:
            return backoff_delay(self.failures, self.refresh_interval)
        return self.refresh_interval

    async def run(self) -> None:
        """Poll forever; a file source is also re-read as soon as its stat() changes."""
        while True:
            await self.refresh_once()
            await self._wait(self.next_delay())

    async def _wait(self, delay: dt.timedelta) -> None:
        """Sleep ``delay`` on the clock in WATCH_INTERVAL slices, ending early when the file source changed.

        Ends when the clock reaches the deadline or when the slices slept add up to ``delay`` (the
        latter keeps a clock that only sleeps, never moving ``now``, from waiting forever).
        """
        deadline = self._clock.now() + delay
        slept = dt.timedelta(0)
        while slept < delay and (left := deadline - self._clock.now()) > dt.timedelta(0):
            step = min(left, WATCH_INTERVAL)
            await self._clock.sleep(step)
            slept += step
            if self.source.has_changed():
                return

    def _fields(self, bundle: TrustBundle) -> dict[str, object]:
        return {"trust_domain": str(self.trust_domain), "sequence": bundle.sequence, "roots": len(bundle.roots),
                "source": self.source.description}


class Federation:
    """The component that runs every peer poller; peers gone from the configuration are forgotten."""

    name = "federation"

    def __init__(self, peers: Sequence[PeerSettings], trust: TrustStore, last_good: LastGoodStore,
                 telemetry: Telemetry, clock: Clock, *, source_factory: SourceFactory | None = None) -> None:
        self._trust = trust
        self._last_good = last_good
        self.pollers: dict[TrustDomain, PeerPoller] = {}
        self._tasks: list[asyncio.Task[None]] = []
        for peer in peers:
            td = TrustDomain(peer.trust_domain)
            poller = PeerPoller(td, _Deferred(), trust, last_good, telemetry, clock,
                                refresh_override=peer.refresh_hint, bootstrap=_bootstrap(peer, td))
            factory = source_factory or (lambda p, roots: build_source(p, clock, roots))
            poller.source = factory(peer, poller.authenticating_bundle)
            self.pollers[td] = poller

    def poller(self, trust_domain: TrustDomain | str) -> PeerPoller:
        td = trust_domain if isinstance(trust_domain, TrustDomain) else TrustDomain(trust_domain)
        return self.pollers[td]

    async def start(self) -> None:
        for gone in (self._last_good.trust_domains() | set(self._trust.peers())) - set(self.pollers):
            log.info("peer %s is no longer configured; forgetting its bundle", gone)
            self._last_good.delete(gone)
            self._trust.remove_peer(gone)
        for poller in self.pollers.values():
            poller.restore()
            self._tasks.append(asyncio.create_task(poller.run(), name=f"federation-{poller.trust_domain}"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()


class _Deferred:
    """Placeholder until the real source exists (it needs the poller's roots provider)."""

    description = "unset"

    async def fetch(self, current: TrustBundle | None) -> TrustBundle:
        raise BundleRejectedError("source not configured", policy.UNREACHABLE)

    def has_changed(self) -> bool:
        return False


def _bootstrap(peer: PeerSettings, td: TrustDomain) -> TrustBundle | None:
    """The operator's bootstrap bundle for ``https_spiffe`` peers.

    Raises:
        ConfigError-like CAServiceError: if the file cannot be read or holds no valid CA roots; start-up
            must fail loudly rather than run a peer that can never authenticate.
    """
    if peer.profile is not BundleProfile.HTTPS_SPIFFE or peer.bootstrap_bundle is None:
        return None
    path = Path(peer.bootstrap_bundle)
    try:
        return policy.load_bootstrap(path.read_bytes(), td)
    except OSError as exc:
        raise CAServiceError(f"cannot read the bootstrap bundle {path} of {td}: {exc.strerror}") from None
    except BundleRejectedError as exc:
        raise CAServiceError(f"the bootstrap bundle {path} of {td} is not usable: {exc}") from None
