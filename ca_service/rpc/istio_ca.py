"""The Istio CA API: ``istio.v1.auth.IstioCertificateService/CreateCertificate`` for istio-agent and ztunnel.

Per call, in this order (cert-manager istio-csr's, plus herd protection)::

    in-flight cap → authenticate (peer certificate or TokenReview) → ImpersonatedIdentity → listener
    policy → per-identity rate limit → parse + check the CSR → resolve the TTL → sign → verify the chain
    against the current roots → record in the issuance ledger → reply

Nothing of the request body is looked at before the caller is authenticated.  Every refusal gets an
opaque status message (rpc/status.py); the log gets the cause.  The response is the leaf, the
intermediate(s), and the whole root bundle (every current root, a root being rotated in included) as
the single last element, as istio-agent expects.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Sequence
from typing import Any

import grpc
from google.protobuf import json_format  # type: ignore[import-untyped]  # no types-protobuf in the venv

from ca_service.clock import Clock
from ca_service.config import GrpcListener, ListenerPolicy
from ca_service.errors import CAServiceError, CSRRejectedError, OverloadedError
from ca_service.pki.certs import der_to_pem
from ca_service.pki.csr import CsrKeyType, InvalidCSRError, resolve_ttl
from ca_service.rpc.authn import (
    Authenticator,
    AuthenticatorChain,
    CallCredentials,
    Caller,
    PeerCertificateAuthenticator,
    authenticate,
    check_policy,
    verified_peer_certificate,
)
from ca_service.rpc.generated.istio.v1.auth import ca_pb2, ca_pb2_grpc
from ca_service.rpc.impersonation import ImpersonationPolicy
from ca_service.rpc.status import abort_with, status_for
from ca_service.services.admission import InFlightLimit, RateLimiter
from ca_service.services.authority import Authority, IssuedSvid
from ca_service.services.csr_signing import CsrOrder, CsrSigner
from ca_service.services.issuance_ledger import IssuanceLedger, IssuanceRecord
from ca_service.telemetry import Telemetry

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]
RPC = "CreateCertificate"


class IstioCAServicer(ca_pb2_grpc.IstioCertificateServiceServicer):  # type: ignore[misc]
    """One per listener (its authenticators and policy); admission, signer and ledger are shared."""

    def __init__(self, *, authority: Authority, authenticator: Authenticator, policy: ListenerPolicy,
                 impersonation: ImpersonationPolicy, signer: CsrSigner, in_flight: InFlightLimit,
                 rate_limiter: RateLimiter, ledger: IssuanceLedger, allowed_key_types: Collection[CsrKeyType],
                 telemetry: Telemetry, clock: Clock, peer_certificate_verified: bool) -> None:
        self._authority = authority
        self._authenticator = authenticator
        self._policy = policy
        self._impersonation = impersonation
        self._signer = signer
        self._in_flight = in_flight
        self._rate_limiter = rate_limiter
        self._ledger = ledger
        self._allowed_key_types = frozenset(allowed_key_types)
        self._telemetry = telemetry
        self._clock = clock
        self._peer_certificate_verified = peer_certificate_verified

    async def CreateCertificate(self, request: ca_pb2.IstioCertificateRequest,
                                context: Context) -> ca_pb2.IstioCertificateResponse:
        started = time.perf_counter()
        try:
            self._in_flight.enter()
        except OverloadedError as exc:
            await self._refuse(context, exc)
        try:
            chain = await self._create(request, context)
        except CAServiceError as exc:
            await self._refuse(context, exc)
        finally:
            self._in_flight.leave()
        self._telemetry.istio_ca_requests.labels("OK").inc()
        self._telemetry.istio_ca_latency.observe(time.perf_counter() - started)
        return ca_pb2.IstioCertificateResponse(cert_chain=chain)

    async def _create(self, request: ca_pb2.IstioCertificateRequest, context: Context) -> list[str]:
        caller = await self._caller(context)
        metadata = json_format.MessageToDict(request.metadata) if request.HasField("metadata") else {}
        entitled = await self._impersonation.entitled(caller, metadata)
        check_policy(self._policy, caller)
        self._rate_limiter.acquire(str(entitled), time.monotonic())
        settings = self._authority.settings
        ttl = resolve_ttl(request.validity_duration, default=settings.workload_ttl, maximum=settings.max_workload_ttl)
        now = self._clock.now()
        # The CSR is parsed and checked by the signer (off the loop in the daemon's thread mode).
        issued = await self._signer.sign(CsrOrder(request.csr, entitled, self._allowed_key_types, ttl, now))
        svid, bundle = issued.svid, issued.bundle
        self._record(svid, caller, now)
        log.info("certificate issued", extra={"spiffe_id": str(entitled), "caller": str(caller.spiffe_id),
                                              "method": caller.method, "serial": svid.serial,
                                              "not_after": svid.not_after.isoformat()})
        return chain_for(svid, bundle.to_pem())

    async def _caller(self, context: Context) -> Caller:
        credentials = CallCredentials(
            node_id=context.peer(), peer_certificate_pem=self._peer_certificate(context),
            invocation_metadata={k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)},
            peer=context.peer())
        return await authenticate(self._authenticator, credentials)

    def _peer_certificate(self, context: Context) -> bytes | None:
        return verified_peer_certificate(context.auth_context(), verified=self._peer_certificate_verified)

    def _record(self, svid: IssuedSvid, caller: Caller, now: Any) -> None:
        self._ledger.record(IssuanceRecord(
            serial=svid.serial, spiffe_id=str(svid.spiffe_id), caller=str(caller.spiffe_id),
            method=caller.method, path="istio-ca", not_after=svid.not_after, issuer=svid.issuer_key_id,
            issued_at=now))

    async def _refuse(self, context: Context, exc: CAServiceError) -> None:
        code = status_for(exc)[0]
        self._telemetry.istio_ca_requests.labels(code.name).inc()
        self._telemetry.istio_ca_rejections.labels(_reason(exc)).inc()
        await abort_with(context, exc, rpc=RPC)


def _reason(exc: CAServiceError) -> str:
    """A bounded label: the CSR rule, or the error class."""
    if isinstance(exc, CSRRejectedError | InvalidCSRError):
        return exc.rule
    return type(exc).__name__.removesuffix("Error").lower()


def chain_for(svid: IssuedSvid, roots_pem: bytes) -> list[str]:
    """``cert_chain``: one PEM per certificate of the chain, then every root in a single last element.

    Made from the leaf's DER and the signer's shared tail PEMs: ``Certificate.public_bytes`` re-encodes
    the certificate on every call (11 µs apiece).
    """
    return [der_to_pem(svid.leaf_der).decode(), *(pem.decode() for pem in svid.tail_pems), roots_pem.decode()]


class IstioCAService:
    """Shared state of the API on every listener; :meth:`register` adds it to one listener's server."""

    def __init__(self, *, authority: Authority, token_authenticator: Authenticator | None,
                 impersonation: ImpersonationPolicy, signer: CsrSigner, in_flight: InFlightLimit,
                 rate_limiter: RateLimiter, ledger: IssuanceLedger, allowed_key_types: Sequence[CsrKeyType],
                 telemetry: Telemetry, clock: Clock) -> None:
        self._authority = authority
        self._token_authenticator = token_authenticator
        self._shared = dict(impersonation=impersonation, signer=signer, in_flight=in_flight,
                            rate_limiter=rate_limiter, ledger=ledger, telemetry=telemetry, clock=clock)
        self._allowed_key_types = tuple(allowed_key_types)

    def register(self, server: grpc.aio.Server, listener: GrpcListener) -> None:
        verified = listener.tls.enabled and listener.tls.require_client_cert
        authenticators: list[Authenticator] = []
        if verified:
            authenticators.append(PeerCertificateAuthenticator())  # a renewal: no TokenReview needed
        if self._token_authenticator is not None:
            authenticators.append(self._token_authenticator)
        servicer = IstioCAServicer(
            authority=self._authority, authenticator=AuthenticatorChain(authenticators), policy=listener.policy,
            allowed_key_types=self._allowed_key_types, peer_certificate_verified=verified,
            **self._shared)  # type: ignore[arg-type]
        ca_pb2_grpc.add_IstioCertificateServiceServicer_to_server(servicer, server)
