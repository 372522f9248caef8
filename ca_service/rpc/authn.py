"""Caller authentication for the gRPC listeners, behind one :class:`Authenticator` interface.

An authenticator looks at what the transport knows about a call (:class:`CallCredentials`) and
answers with a :class:`Caller`, with ``None`` when the call carries no credential of its kind, or raises
:class:`AuthenticationError` when it carries one that is bad.  A listener chains the authenticators
it is configured for; a later Kubernetes TokenReview authenticator reads the ``authorization``
bearer token from ``CallCredentials.invocation_metadata`` and fits the same slot.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from cryptography import x509

from ca_service.config import ListenerPolicy
from ca_service.errors import AuthenticationError, InvalidRequestError, PolicyViolationError
from ca_service.pki.certs import spiffe_id_of
from ca_service.pki.identity import SpiffeId, TrustDomain

log = logging.getLogger(__name__)

# Istio sidecar node id: sidecar~<ip>~<pod>.<namespace>~<namespace>.svc.cluster.local
# Kubernetes object names (DNS-1123): one path segment each, so "a/b" can never smuggle in another identity.
_K8S_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_ISTIO_NODE_ID = re.compile(r"^sidecar~[^~]*~[^~]+\.(?P<ns>[^.~]+)~(?P<ns2>[^.~]+)\.svc\.[^~]+$")


@dataclass(frozen=True)
class CallCredentials:
    """What the transport tells us about one call; nothing in here is trusted until an authenticator says so."""

    node_id: str
    node_metadata: Mapping[str, Any] = field(default_factory=dict)
    # PEM of the client certificate, present only when the TLS layer verified it against our client CAs.
    peer_certificate_pem: bytes | None = None
    invocation_metadata: Mapping[str, str] = field(default_factory=dict)
    peer: str = ""


@dataclass(frozen=True)
class Caller:
    """An authenticated caller: the identity SVIDs are issued for and the node they are cached under."""

    spiffe_id: SpiffeId
    node_id: str
    method: str
    namespace: str | None = None
    service_account: str | None = None


class Authenticator(Protocol):
    async def authenticate(self, call: CallCredentials) -> Caller | None:
        """The caller, ``None`` if the call has no credential of this kind.

        Raises:
            AuthenticationError: the credential is present but not acceptable.
            NotReadyError: the credential could not be judged now (the API that reviews it failed).
        """
        ...


class NodeMetadataAuthenticator:
    """Istio style: ``NAMESPACE`` + ``SERVICE_ACCOUNT`` from the Envoy node (namespace falls back to node.id).

    Only ever configured on a listener whose socket is private to the workload: anyone who can
    connect can claim any identity here.
    """

    def __init__(self, trust_domain: TrustDomain) -> None:
        self._trust_domain = trust_domain

    async def authenticate(self, call: CallCredentials) -> Caller | None:
        namespace = _text(call.node_metadata.get("NAMESPACE")) or _namespace_from_node_id(call.node_id)
        service_account = _text(call.node_metadata.get("SERVICE_ACCOUNT"))
        if not _K8S_NAME.match(namespace) or not _K8S_NAME.match(service_account):
            raise AuthenticationError(
                f"node {call.node_id!r} lacks valid NAMESPACE/SERVICE_ACCOUNT metadata (namespace={namespace!r}, "
                f"service_account={service_account!r})"
            )
        try:
            spiffe_id = SpiffeId.for_service_account(self._trust_domain, namespace, service_account)
        except InvalidRequestError as exc:
            raise AuthenticationError(f"node {call.node_id!r}: {exc}") from None
        return Caller(spiffe_id, call.node_id, "node-metadata", namespace, service_account)


class PeerCertificateAuthenticator:
    """The SPIFFE ID of the client certificate the TLS layer verified."""

    async def authenticate(self, call: CallCredentials) -> Caller | None:
        if call.peer_certificate_pem is None:
            return None
        try:
            spiffe_id = spiffe_id_of(x509.load_pem_x509_certificate(call.peer_certificate_pem))
        except (ValueError, InvalidRequestError) as exc:
            raise AuthenticationError(f"client certificate of {call.peer} has no usable SPIFFE ID: {exc}") from None
        k8s = spiffe_id.kubernetes
        namespace, service_account = k8s if k8s else (None, None)
        return Caller(spiffe_id, call.node_id, "peer-certificate", namespace, service_account)


class AuthenticatorChain:
    """Tries each authenticator in order; the first that recognises a credential decides."""

    def __init__(self, authenticators: Sequence[Authenticator]) -> None:
        self._authenticators = tuple(authenticators)

    async def authenticate(self, call: CallCredentials) -> Caller | None:
        for authenticator in self._authenticators:
            caller = await authenticator.authenticate(call)
            if caller is not None:
                return caller
        return None


async def authenticate(authenticator: Authenticator, call: CallCredentials) -> Caller:
    """Like ``authenticator.authenticate`` but a call without any accepted credential is an error."""
    if not call.node_id:
        raise InvalidRequestError("the first request of a stream must carry node.id")
    caller = await authenticator.authenticate(call)
    if caller is None:
        raise AuthenticationError(f"no credential this listener accepts (peer {call.peer}, node {call.node_id!r})")
    return caller


def verified_peer_certificate(auth_context: Mapping[str, Iterable[bytes]], *, verified: bool) -> bytes | None:
    """The client certificate (PEM) of a gRPC call, from ``context.auth_context()``; None unless the
    listener requires and verifies client certificates (only then may the certificate be believed)."""
    if not verified:
        return None
    values = list(auth_context.get("x509_pem_cert") or [])
    return bytes(values[0]) if values else None


def check_policy(policy: ListenerPolicy, caller: Caller) -> None:
    """Apply a listener's allow-lists (empty list = no restriction).

    Raises:
        PolicyViolationError: the caller's namespace or SPIFFE ID is not allowed on this listener.
    """
    if policy.allowed_namespaces and caller.namespace not in policy.allowed_namespaces:
        raise PolicyViolationError(f"{caller.spiffe_id}: namespace {caller.namespace!r} not allowed on this listener")
    patterns = policy.allowed_spiffe_ids
    if patterns and not any(fnmatch.fnmatchcase(str(caller.spiffe_id), p) for p in patterns):
        raise PolicyViolationError(f"{caller.spiffe_id} not allowed on this listener")


def _text(value: Any) -> str:
    return value.strip() if isinstance(value, str) else ""


def _namespace_from_node_id(node_id: str) -> str:
    match = _ISTIO_NODE_ID.match(node_id)
    return match.group("ns") if match else ""
