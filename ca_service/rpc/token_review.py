"""Kubernetes service-account JWT authentication (``authorization: Bearer <token>``) by TokenReview.

istio-agent sends its projected token (audience ``istio-ca``) and ``ClusterID`` metadata (lower-cased
``clusterid`` on the wire); the ClusterID picks the API server that reviews the token.  We require what
istiod requires (authenticated, group ``system:serviceaccounts``, username
``system:serviceaccount:<ns>:<sa>``) and, unlike istiod, that the reviewed audiences intersect ours.

Positive reviews are cached by token hash for ``review_cache_ttl`` but never past the token's ``exp``
(read from the unverified payload: it can only shorten the cache, never extend trust); negative ones are
not cached, so a caller that fixes its token is not locked out.  A review that cannot be made (the API
server down or timing out, RBAC without ``tokenreviews create``) judged nothing: it is a
:class:`~ca_service.errors.NotReadyError` (UNAVAILABLE, retry later), not a refusal.  Reviews run in a
thread: the Kubernetes client blocks.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime as dt
import hashlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from ca_service.clock import Clock
from ca_service.errors import AuthenticationError, CAServiceError, NotReadyError
from ca_service.pki.identity import SpiffeId, TrustDomain
from ca_service.rpc.authn import CallCredentials, Caller
from ca_service.services.expiring_cache import ExpiringCache
from ca_service.services.single_flight import SingleFlight
from ca_service.telemetry import Telemetry

log = logging.getLogger(__name__)

SA_GROUP = "system:serviceaccounts"
SA_PREFIX = "system:serviceaccount:"
POD_NAME_EXTRA = "authentication.kubernetes.io/pod-name"
POD_UID_EXTRA = "authentication.kubernetes.io/pod-uid"
T = TypeVar("T")
# A JWT larger than this is not a Kubernetes token (they are ~1 KB); refuse before hashing or sending.
MAX_TOKEN_BYTES = 16 * 1024
# Bound on cached reviews (one per live token): a pod has one token, so this covers 50k pods.
MAX_CACHED_REVIEWS = 50_000


@dataclass(frozen=True)
class KubernetesCaller(Caller):
    """A caller authenticated by TokenReview: which cluster vouched for it, and its pod when the token is bound."""

    cluster_id: str = ""
    pod_name: str | None = None
    pod_uid: str | None = None  # the bound pod's, as the review vouched for it (a pod of the same name may replace it)


@dataclass(frozen=True)
class ReviewStatus:
    """The parts of a TokenReview ``status`` we decide on."""

    authenticated: bool
    username: str = ""
    groups: tuple[str, ...] = ()
    audiences: tuple[str, ...] = ()
    extra: Mapping[str, Sequence[str]] = field(default_factory=dict)
    error: str = ""


class TokenReviewer(Protocol):
    """One cluster's TokenReview API (blocking; called from a thread); raises NotReadyError when the review
    cannot be made."""

    def review(self, token: str, audiences: Sequence[str]) -> ReviewStatus: ...


class KubernetesTokenReviewer:
    """TokenReview through the official client of one cluster."""

    def __init__(self, api_client: Any) -> None:
        from kubernetes import client

        from ca_service.kube.client import REQUEST_TIMEOUT, unavailable_on_failure

        self._api = client.AuthenticationV1Api(api_client)
        self._client = client
        self._timeout = REQUEST_TIMEOUT  # no review may hold a worker thread (and the CSR it gates) for long
        self._unavailable = unavailable_on_failure

    def review(self, token: str, audiences: Sequence[str]) -> ReviewStatus:
        """Raises: NotReadyError: the review could not be made (API server down or slow, RBAC)."""
        body = self._client.V1TokenReview(spec=self._client.V1TokenReviewSpec(token=token, audiences=list(audiences)))
        with self._unavailable("TokenReview"):
            status = self._api.create_token_review(body, _request_timeout=self._timeout).status
        user = status.user
        return ReviewStatus(
            authenticated=bool(status.authenticated), username=(user and user.username) or "",
            groups=tuple((user and user.groups) or ()), audiences=tuple(status.audiences or ()),
            extra=dict((user and user.extra) or {}), error=status.error or "")


def token_expiry(token: str) -> dt.datetime | None:
    """``exp`` of a JWT's payload, *unverified*: used only to cut a cache entry short, never to trust anything."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        exp = json.loads(base64.urlsafe_b64decode(payload)).get("exp")
    except (ValueError, binascii.Error, AttributeError):
        return None
    if not isinstance(exp, int) or isinstance(exp, bool):
        return None
    try:
        return dt.datetime.fromtimestamp(exp, dt.UTC)
    except (OverflowError, OSError, ValueError):
        return None


def identity_of(status: ReviewStatus, audiences: Sequence[str]) -> tuple[str, str, str | None, str | None]:
    """``(namespace, service account, pod name, pod UID)`` of a positive review (the pod's for a pod-bound token).

    Raises:
        AuthenticationError: not authenticated, not a service account, or reviewed for none of ``audiences``.
    """
    if not status.authenticated:
        raise AuthenticationError(f"TokenReview: not authenticated ({status.error[:200]!r})")
    if SA_GROUP not in status.groups:
        raise AuthenticationError(f"TokenReview: {status.username[:200]!r} is not in group {SA_GROUP}")
    parts = status.username.removeprefix(SA_PREFIX).split(":") if status.username.startswith(SA_PREFIX) else []
    if len(parts) != 2 or not all(parts):
        raise AuthenticationError(f"TokenReview: {status.username[:200]!r} is not a service account username")
    # An API server that ignores spec.audiences answers with its own: ours must be among them.
    if not set(status.audiences) & set(audiences):
        raise AuthenticationError(f"TokenReview: token audiences {list(status.audiences)[:5]!r} are not "
                                  f"{list(audiences)!r}")
    pods, uids = status.extra.get(POD_NAME_EXTRA) or (), status.extra.get(POD_UID_EXTRA) or ()
    return parts[0], parts[1], (pods[0] if pods else None), (uids[0] if uids else None)


class KubernetesTokenAuthenticator:
    """The ``authorization: Bearer`` authenticator; clusters by ClusterID, the first one when none is sent."""

    def __init__(self, clusters: Mapping[str, TokenReviewer], *, audiences: Sequence[str], trust_domain: TrustDomain,
                 cache_ttl: dt.timedelta, clock: Clock, telemetry: Telemetry,
                 max_cached: int = MAX_CACHED_REVIEWS) -> None:
        if not clusters:
            raise ValueError("KubernetesTokenAuthenticator needs at least one cluster")
        self._clusters = dict(clusters)
        self._default_cluster = next(iter(self._clusters))
        self._audiences = tuple(audiences)
        self._trust_domain = trust_domain
        self._cache_ttl = cache_ttl
        self._clock = clock
        self._telemetry = telemetry
        self._cache: ExpiringCache[bytes, KubernetesCaller] = ExpiringCache(max_cached)
        # Concurrent calls with one token (a pod's renewal burst) share one review.
        self._pending: SingleFlight[bytes, KubernetesCaller] = SingleFlight()

    async def authenticate(self, call: CallCredentials) -> Caller | None:
        header = call.invocation_metadata.get("authorization")
        if header is None:
            return None
        token = _bearer(header)
        cluster_id = call.invocation_metadata.get("clusterid") or self._default_cluster
        if cluster_id not in self._clusters:
            raise AuthenticationError(f"unknown ClusterID {cluster_id[:100]!r}")
        key = hashlib.sha256(f"{cluster_id}\0{token}".encode()).digest()
        cached = self._cache.get(key, self._clock.now())
        if cached is not None:
            self._telemetry.token_review_cache_hits.inc()
            return cached
        if self._pending.running(key):
            self._telemetry.token_review_cache_hits.inc()
        # A caller that goes away does not cancel the review the others wait for.
        return await self._pending.run(key, lambda: self._review_and_remember(key, cluster_id, token, call.peer))

    async def _review_and_remember(self, key: bytes, cluster_id: str, token: str, peer: str) -> KubernetesCaller:
        caller = await self._review(cluster_id, token, peer)
        self._remember(key, caller, token)
        return caller

    async def _review(self, cluster_id: str, token: str, peer: str) -> KubernetesCaller:
        try:
            # A review that could not be made (API server down, timed out, RBAC without tokenreviews create)
            # judged nothing: the caller hears "retry later" (UNAVAILABLE), not "rejected".
            status = await ask_cluster(cluster_id, "TokenReview", self._clusters[cluster_id].review, token,
                                       self._audiences)
        except CAServiceError:
            self._telemetry.token_reviews.labels("error").inc()
            raise
        try:
            namespace, service_account, pod, pod_uid = identity_of(status, self._audiences)
        except AuthenticationError:
            self._telemetry.token_reviews.labels("rejected").inc()
            raise
        self._telemetry.token_reviews.labels("accepted").inc()
        spiffe_id = SpiffeId.for_service_account(self._trust_domain, namespace, service_account)
        return KubernetesCaller(spiffe_id, peer, "kubernetes-jwt", namespace, service_account,
                                cluster_id=cluster_id, pod_name=pod, pod_uid=pod_uid)

    def _remember(self, key: bytes, caller: KubernetesCaller, token: str) -> None:
        now = self._clock.now()
        until = now + self._cache_ttl
        exp = token_expiry(token)
        if exp is not None:
            until = min(until, exp)
        self._cache.put(key, caller, until, now)


async def ask_cluster(cluster: str, what: str, read: Callable[..., T], *args: Any) -> T:
    """``read(*args)`` on one cluster's API, in a thread (the Kubernetes client blocks).

    Raises:
        NotReadyError: the API could not be asked (down, timed out, refused us): retry later (UNAVAILABLE).
        CAServiceError: ``read`` failed some other way: a bug (INTERNAL, its traceback in the log).
    """
    try:
        return await asyncio.to_thread(read, *args)
    except NotReadyError as exc:
        raise NotReadyError(f"cluster {cluster!r}: {exc}") from exc
    except Exception as exc:
        raise CAServiceError(f"{what} in cluster {cluster!r} failed unexpectedly") from exc


def _bearer(header: str) -> str:
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AuthenticationError("authorization metadata is not 'Bearer <token>'")
    if len(token) > MAX_TOKEN_BYTES:
        raise AuthenticationError(f"bearer token of {len(token)} bytes is too large")
    return token
