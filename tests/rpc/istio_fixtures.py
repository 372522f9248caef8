"""A real Istio CA API stack for tests: real kube-apiserver (TokenReview, TokenRequest), real grpc.aio over TLS.

Listeners: [0] TLS, token authentication (istio-agent's first contact); [1] mTLS (renewal with the
SVID; a token is accepted too).  Both serving certificates carry ``DNS_NAME``.
"""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ca_service.app import register_reactions
from ca_service.clock import Clock, SystemClock
from ca_service.config import RotationSettings, Settings, load_settings
from ca_service.rpc.generated.istio.v1.auth import ca_pb2, ca_pb2_grpc
from ca_service.rpc.istio_ca_wiring import IstioCA, build_istio_ca
from ca_service.rpc.sds_listeners import SdsComponent
from ca_service.services.authority import Authority
from ca_service.services.trust import TrustStore
from ca_service.services.workloads import WorkloadRegistry
from ca_service.storage.directory import DirectoryStore
from ca_service.telemetry import Telemetry
from tests.kube import Cluster

DNS_NAME = "ca-service.istio-system.svc"
CLUSTER_ID = "Kubernetes"
# Bounded wait for one RPC: a test fails instead of hanging.
RPC_TIMEOUT = 20.0


@dataclass
class Workload:
    namespace: str
    service_account: str
    token: str

    @property
    def path(self) -> str:
        return f"/ns/{self.namespace}/sa/{self.service_account}"


class Kube:
    """Service accounts, tokens and pods on the real API server."""

    def __init__(self, cluster: Cluster) -> None:
        from kubernetes import client

        self.cluster = cluster
        self._api = cluster.api_client()
        self.core = client.CoreV1Api(self._api)
        self._client = client

    def close(self) -> None:
        self._api.close()

    def service_account(self, namespace: str, name: str | None = None) -> str:
        name = name or f"sa-{secrets.token_hex(3)}"
        c = self._client
        self.core.create_namespaced_service_account(namespace, c.V1ServiceAccount(metadata=c.V1ObjectMeta(name=name)))
        return name

    def token(self, namespace: str, sa: str, *, audiences: tuple[str, ...] = ("istio-ca",), seconds: int = 3600,
              pod: str | None = None) -> str:
        c = self._client
        bound = None
        if pod is not None:
            uid = self.core.read_namespaced_pod(pod, namespace).metadata.uid
            bound = c.V1BoundObjectReference(kind="Pod", api_version="v1", name=pod, uid=uid)
        spec = c.V1TokenRequestSpec(audiences=list(audiences), expiration_seconds=seconds, bound_object_ref=bound)
        request = c.AuthenticationV1TokenRequest(spec=spec)
        return str(self.core.create_namespaced_service_account_token(sa, namespace, request).status.token)

    def workload(self, namespace: str, **kw: Any) -> Workload:
        sa = self.service_account(namespace)
        return Workload(namespace, sa, self.token(namespace, sa, **kw))

    def pod(self, namespace: str, sa: str, node: str, *, name: str | None = None) -> str:
        c = self._client
        name = name or f"pod-{secrets.token_hex(3)}"
        spec = c.V1PodSpec(node_name=node, service_account_name=sa, automount_service_account_token=False,
                           containers=[c.V1Container(name="app", image="example.invalid/app")])
        self.core.create_namespaced_pod(namespace, c.V1Pod(metadata=c.V1ObjectMeta(name=name), spec=spec))
        return name

    def delete_pod(self, namespace: str, name: str) -> None:
        """Gone at once (no kubelet runs here to finish a graceful deletion)."""
        self.core.delete_namespaced_pod(name, namespace, grace_period_seconds=0)


@dataclass
class IstioStack:
    settings: Settings
    authority: Authority
    registry: WorkloadRegistry
    telemetry: Telemetry
    component: SdsComponent
    istio: IstioCA

    def address(self, index: int = 0) -> str:
        return self.component.bound_addresses[index]

    @property
    def trust_domain(self) -> str:
        return self.settings.trust_domain

    def root_pem(self) -> bytes:
        return self.authority.bundle().to_pem()

    def channel(self, index: int = 0, *, identity: tuple[bytes, bytes] | None = None,
                name: str = DNS_NAME) -> grpc.aio.Channel:
        """A TLS channel that verifies the server against our root and ``name`` (istio-agent's caAddress host)."""
        key, chain = identity or (None, None)
        credentials = grpc.ssl_channel_credentials(self.root_pem(), private_key=key, certificate_chain=chain)
        return grpc.aio.secure_channel(self.address(index), credentials,
                                       options=[("grpc.ssl_target_name_override", name)])

    def metric(self, name: str, **labels: str) -> float:
        return self.telemetry.registry.get_sample_value(name, labels) or 0.0


def istio_settings(tmp_path: Path, kubeconfig: Path, **istio_ca: Any) -> Settings:
    tls = {"enabled": True, "dns_names": [DNS_NAME]}
    return load_settings(environ={}, overrides={
        "data_dir": str(tmp_path / "data"),
        "grpc": [{"address": "127.0.0.1:0", "tls": tls},
                 {"address": "127.0.0.1:0", "tls": {**tls, "require_client_cert": True}}],
        "istio_ca": {"clusters": [{"cluster_id": CLUSTER_ID, "kubeconfig": str(kubeconfig)}], **istio_ca},
    })


@pytest.fixture
def kube(k8s: Cluster) -> Iterator[Kube]:
    kube = Kube(k8s)
    yield kube
    kube.close()


async def start_stack(settings: Settings, *, clock: Clock | None = None, **overrides: Any) -> IstioStack:
    clock = clock or SystemClock()
    authority = Authority(DirectoryStore(settings.data_dir / "state"), settings.domain, settings.ca, clock)
    authority.load_or_bootstrap()
    telemetry = Telemetry()
    registry = WorkloadRegistry(authority, RotationSettings(), clock)
    istio = build_istio_ca(settings, authority, registry, telemetry, clock, **overrides)
    trust = TrustStore(authority)
    component = SdsComponent(settings.grpc, registry=registry, trust=trust, telemetry=telemetry,
                             grace=dt.timedelta(seconds=1), services=[istio.service.register])
    register_reactions(authority.reactions, trust=trust, sds=component)
    await component.start()
    return IstioStack(settings, authority, registry, telemetry, component, istio)


@pytest.fixture
async def istio(tmp_path: Path, k8s: Cluster) -> AsyncIterator[IstioStack]:
    stack = await start_stack(istio_settings(tmp_path, k8s.kubeconfig, trusted_node_accounts=["istio-system/ztunnel"]))
    try:
        yield stack
    finally:
        await stack.component.stop()


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def csr_pem(key: Any, uri: str | None = None) -> str:
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if uri is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]),
                                        critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


async def create(channel: grpc.aio.Channel, csr: str, *, token: str | None = None, cluster: str | None = CLUSTER_ID,
                 validity: int = 0, struct: dict[str, Any] | None = None) -> list[str]:
    metadata: list[tuple[str, str]] = []
    if token is not None:
        metadata.append(("authorization", f"Bearer {token}"))
    if cluster is not None:
        metadata.append(("clusterid", cluster))
    request = ca_pb2.IstioCertificateRequest(csr=csr, validity_duration=validity)
    if struct is not None:
        request.metadata.update(struct)
    stub = ca_pb2_grpc.IstioCertificateServiceStub(channel)
    response = await stub.CreateCertificate(request, metadata=metadata, timeout=RPC_TIMEOUT)
    return list(response.cert_chain)


def identity_pem(key: Any, chain: list[str]) -> tuple[bytes, bytes]:
    """(key PEM, chain PEM without the roots) as an istio-agent presents its SVID for renewal."""
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return key_pem, "".join(chain[:-1]).encode()


def pem_certs(text: str) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(text.encode())


