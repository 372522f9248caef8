"""Building the Istio CA API from settings (called by ``app.build_app``; the only place its parts meet).

Kept apart from app.py so that the assembly there stays one call:
``istio = build_istio_ca(settings, app.authority, app.registry, ...)``, then
``SdsComponent(..., services=[istio.service.register])``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from ca_service.adapters.issuance_journal import IssuanceJournal
from ca_service.clock import Clock
from ca_service.config import Settings
from ca_service.rpc.impersonation import ImpersonationPolicy, KubernetesPodDirectory, PodDirectory
from ca_service.rpc.istio_ca import IstioCAService
from ca_service.rpc.token_review import KubernetesTokenAuthenticator, KubernetesTokenReviewer, TokenReviewer
from ca_service.services.admission import InFlightLimit, RateLimiter
from ca_service.services.authority import Authority
from ca_service.services.csr_signing import CsrSigner, ThreadCsrSigner
from ca_service.services.issuance_ledger import IssuanceLedger, IssuanceRecord
from ca_service.services.issuer import IssuedSvid
from ca_service.services.workloads import WorkloadCert, WorkloadRegistry
from ca_service.telemetry import Telemetry

log = logging.getLogger(__name__)


@dataclass
class IstioCA:
    service: IstioCAService
    ledger: IssuanceLedger
    journal: IssuanceJournal


def kubernetes_clients(settings: Settings) -> dict[str, Any]:
    """One API client per configured cluster ID (kubeconfig, or in-cluster config when it is null)."""
    from ca_service.kube.client import build_api_client  # the kubernetes package only when clusters are set

    return {cluster.cluster_id: build_api_client(cluster.kubeconfig) for cluster in settings.istio_ca.clusters}


def build_istio_ca(settings: Settings, authority: Authority, registry: WorkloadRegistry, telemetry: Telemetry,
                   clock: Clock, *, api_clients: dict[str, Any] | None = None,
                   reviewers: dict[str, TokenReviewer] | None = None,
                   pods: dict[str, PodDirectory] | None = None, signer: CsrSigner | None = None) -> IstioCA:
    """The API with its shared state; ``api_clients``/``reviewers``/``pods``/``signer`` override (tests, bench)."""
    ica = settings.istio_ca
    clients = api_clients if api_clients is not None else (kubernetes_clients(settings) if ica.clusters else {})
    if reviewers is None:
        reviewers = {cid: KubernetesTokenReviewer(c) for cid, c in clients.items()}
    if pods is None:
        pods = {cid: KubernetesPodDirectory(c) for cid, c in clients.items()}
    token_authenticator = KubernetesTokenAuthenticator(
        reviewers, audiences=ica.token_audiences, trust_domain=settings.domain, cache_ttl=ica.review_cache_ttl,
        clock=clock, telemetry=telemetry) if reviewers else None
    # Zero series for what the alerts watch: a counter series born at its first failure has no earlier
    # sample, and Prometheus's increase() would not count that failure.
    for code in ("OK", "UNAVAILABLE", "INTERNAL"):
        telemetry.istio_ca_requests.labels(code)
    for result in ("accepted", "rejected", "error") if token_authenticator is not None else ():
        telemetry.token_reviews.labels(result)
    journal = IssuanceJournal(settings.issued_dir, on_error=telemetry.issuance_journal_errors.inc)
    ledger = IssuanceLedger(ica.audit_capacity, journal)
    restored = journal.load(ledger, clock.now())
    if restored:
        log.info("issuance ledger restored from its journal", extra={"records": restored})
    if signer is None:
        # Measured with the Go load generator (bench/istio_ca.py, README "Herds"): on a quiet machine the
        # loop beat a thread (659 vs 558/s), on a busy one the thread beat the loop (528 vs 324/s, 475 vs
        # 300/s); the thread's worst run was 449/s, the loop's 249/s.  The steadier one signs.
        signer = ThreadCsrSigner(authority)
    service = IstioCAService(
        authority=authority, token_authenticator=token_authenticator,
        impersonation=ImpersonationPolicy(ica.trusted_node_accounts, settings.domain, pods, clock=clock,
                                           node_ttl=ica.review_cache_ttl, telemetry=telemetry),
        signer=signer,
        in_flight=InFlightLimit(ica.max_in_flight),
        rate_limiter=RateLimiter(ica.rate_limit_per_identity, ica.rate_limit_burst), ledger=ledger,
        allowed_key_types=ica.allowed_key_types, telemetry=telemetry, clock=clock)
    registry.subscribe(lambda cert: _record_sds(ledger, cert, clock))
    # Our listeners' own certificates (SDS TLS, side-port, bundle endpoint) are in the audit too.
    authority.issuer.observe_serving(lambda svid: _record_serving(ledger, svid, clock))
    return IstioCA(service, ledger, journal)


def _record_serving(ledger: IssuanceLedger, svid: IssuedSvid, clock: Clock) -> None:
    ledger.record(IssuanceRecord(serial=svid.serial, spiffe_id=str(svid.spiffe_id), caller="ca-service",
                                 method="internal", path="serving", not_after=svid.not_after,
                                 issuer=svid.issuer_key_id, issued_at=clock.now()))


def _record_sds(ledger: IssuanceLedger, cert: WorkloadCert, clock: Clock) -> None:
    svid = cert.svid
    ledger.record(IssuanceRecord(serial=svid.serial, spiffe_id=str(cert.spiffe_id), caller=cert.node_id[:256],
                                 method="sds", path="sds", not_after=svid.not_after, issuer=svid.issuer_key_id,
                                 issued_at=clock.now()))
