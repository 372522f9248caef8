"""Where a peer's bundle comes from: a SPIFFE bundle endpoint (``https_spiffe`` / ``https_web``) or a file.

A source only fetches and parses; the poller decides whether the result is accepted.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import aiohttp
from cryptography import x509

from ca_service.clock import Clock
from ca_service.config import BundleProfile, PeerSettings
from ca_service.federation import policy
from ca_service.federation.policy import BundleRejectedError
from ca_service.federation.tls import (
    EndpointAuthenticationError,
    authenticate_endpoint,
    spiffe_client_context,
    web_client_context,
)
from ca_service.pki.bundle import TrustBundle
from ca_service.pki.identity import SpiffeId, TrustDomain

# A bundle is a handful of certificates; anything bigger is a broken or hostile endpoint.
MAX_BUNDLE_BYTES = 1 << 20
# Long enough for a slow WAN link, short enough that a hung peer does not stall its poller for long.
FETCH_TIMEOUT_SECONDS = 10.0


class BundleSource(Protocol):
    description: str

    async def fetch(self, current: TrustBundle | None) -> TrustBundle:
        """Fetch and parse the peer's bundle.

        Raises:
            BundleRejectedError: with the reason (unreachable, http_status, tls, endpoint_id,
                wrong_domain, unparsable, not_ca).
        """
        ...

    def has_changed(self) -> bool:
        """Cheap check whether a fetch now would see something new (only files can tell)."""
        ...


RootsProvider = Callable[[], TrustBundle]


class EndpointSource:
    """A peer's SPIFFE bundle endpoint over HTTPS.

    ``https_spiffe``: the server's SVID must verify against ``roots()`` — the peer's latest accepted
    bundle, the bootstrap bundle before the first fetch — and carry exactly ``endpoint_id``.
    ``https_web``: ordinary TLS with ``ca_file`` (or the system store) and hostname verification.
    """

    def __init__(self, trust_domain: TrustDomain, url: str, clock: Clock, *, profile: BundleProfile,
                 endpoint_id: SpiffeId | None = None, roots: RootsProvider | None = None,
                 ca_file: Path | None = None) -> None:
        if profile is BundleProfile.HTTPS_SPIFFE and (endpoint_id is None or roots is None):
            raise ValueError("https_spiffe needs the endpoint SPIFFE ID and the peer's roots")
        self.trust_domain = trust_domain
        self.url = url
        self.profile = profile
        self.description = f"{profile} {url}"
        self._clock = clock
        self._endpoint_id = endpoint_id
        self._roots = roots
        self._ca_file = ca_file
        self._auth_error: EndpointAuthenticationError | None = None

    def has_changed(self) -> bool:
        return False

    async def fetch(self, current: TrustBundle | None) -> TrustBundle:
        timeout = aiohttp.ClientTimeout(total=FETCH_TIMEOUT_SECONDS)
        # A fresh connection per fetch: every fetch re-authenticates the endpoint with the current roots.
        connector = aiohttp.TCPConnector(ssl=self._context(), force_close=True)
        self._auth_error = None
        try:
            async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session, \
                    session.get(self.url, allow_redirects=False) as resp:
                if resp.status != 200:
                    raise BundleRejectedError(f"{self.url} answered HTTP {resp.status}", policy.HTTP_STATUS)
                body = await resp.content.read(MAX_BUNDLE_BYTES + 1)
        except EndpointAuthenticationError as exc:
            # asyncio passes an exception from inside the handshake through unwrapped.
            raise BundleRejectedError(f"{self.url}: {exc}", exc.reason) from None
        except (aiohttp.ClientError, OSError) as exc:
            if self._auth_error is None:
                raise self._transport_error(exc) from None
            raise BundleRejectedError(f"{self.url}: {self._auth_error}", self._auth_error.reason) from None
        except TimeoutError as exc:
            raise self._transport_error(exc) from None
        if len(body) > MAX_BUNDLE_BYTES:
            raise BundleRejectedError(f"{self.url} sent more than {MAX_BUNDLE_BYTES} bytes", policy.UNPARSABLE)
        if not body.lstrip().startswith(b"{"):
            # An endpoint speaks SPIFFE JSON only; PEM here would mean a misconfigured URL.
            raise BundleRejectedError(f"{self.url} did not send a SPIFFE bundle (JSON)", policy.UNPARSABLE)
        return policy.parse_bundle_document(body, self.trust_domain, current=current)

    def _transport_error(self, exc: BaseException) -> BundleRejectedError:
        if isinstance(exc, aiohttp.ClientSSLError):
            return BundleRejectedError(f"TLS with {self.url} failed: {exc}", policy.TLS)
        return BundleRejectedError(f"cannot fetch {self.url}: {exc or type(exc).__name__}", policy.UNREACHABLE)

    def _context(self) -> ssl.SSLContext:
        if self.profile is not BundleProfile.HTTPS_SPIFFE:
            return web_client_context(self._ca_file)
        return spiffe_client_context(self._authenticate)

    def _authenticate(self, chain: list[x509.Certificate]) -> None:
        """Called inside the TLS handshake; the roots are read now, so a rotation is followed at once."""
        assert self._endpoint_id is not None and self._roots is not None
        try:
            authenticate_endpoint(chain, self._roots().roots, self._endpoint_id, now=self._clock.now())
        except EndpointAuthenticationError as exc:
            self._auth_error = exc  # the handshake error aiohttp raises does not carry our reason
            raise


class FileSource:
    """A bundle file (SPIFFE JSON or PEM) maintained by someone else (a mounted ConfigMap, an operator).

    Changes are noticed by comparing (inode, size, mtime_ns) of ``os.stat`` — one syscall per watch
    tick, and it catches both in-place writes and the rename-over / symlink swap that ConfigMap
    mounts do (stat follows the symlink).
    """

    def __init__(self, trust_domain: TrustDomain, path: Path) -> None:
        self.trust_domain = trust_domain
        self.path = path
        self.description = f"file {path}"
        self._seen: tuple[int, int, int] | None = None

    def _stamp(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def has_changed(self) -> bool:
        return self._stamp() != self._seen

    async def fetch(self, current: TrustBundle | None) -> TrustBundle:
        stamp = self._stamp()
        try:
            data = await asyncio.to_thread(self.path.read_bytes)
        except OSError as exc:
            self._seen = stamp
            raise BundleRejectedError(f"cannot read {self.path}: {exc.strerror}", policy.UNREACHABLE) from None
        # Remember the stamp even when the content is rejected: retrying an unchanged bad file is pointless.
        self._seen = stamp
        return policy.parse_bundle_document(data, self.trust_domain, current=current)


def build_source(peer: PeerSettings, clock: Clock, roots: RootsProvider | None) -> BundleSource:
    """The source for one configured peer (settings were validated by config.validate)."""
    td = TrustDomain(peer.trust_domain)
    if peer.profile is BundleProfile.STATIC:
        assert peer.bundle_file is not None
        return FileSource(td, peer.bundle_file)
    endpoint_id = SpiffeId.parse(peer.endpoint_spiffe_id) if peer.endpoint_spiffe_id else None
    return EndpointSource(td, peer.endpoint_url, clock, profile=peer.profile, endpoint_id=endpoint_id,
                          roots=roots, ca_file=peer.ca_file)
