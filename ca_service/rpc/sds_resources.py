"""SDS resources: which secret a name means for a caller, whether the caller may have it, and its proto.

Names (DESIGN.md): ``default`` (the caller's SVID), ``ROOTCA`` and ``ALL`` (validation context of our
trust domain plus the federated ones), ``spiffe://<td>`` (one trust domain's bundle) and
``spiffe://<td>/<path>`` (that SVID, only for the caller it names).

Every resolved secret carries a content version (so a reconnect with ``initial_resource_versions``
or an unchanged re-resolve sends nothing) and the change keys it depends on (so a push reaches
exactly the streams that asked for what changed).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Hashable, Mapping
from dataclasses import dataclass

from envoy.config.core.v3 import base_pb2, extension_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_spiffe_validator_config_pb2 as spiffe_pb2
from google.protobuf import any_pb2  # type: ignore[import-untyped]  # no types-protobuf in the venv

from ca_service.errors import InvalidRequestError, NotFoundError, PolicyViolationError
from ca_service.pki.bundle import TrustBundle
from ca_service.pki.identity import SCHEME, SpiffeId, TrustDomain
from ca_service.rpc.authn import Caller
from ca_service.services.trust import TrustStore
from ca_service.services.workloads import BatchSigner, WorkloadCert, WorkloadRegistry

SECRET_TYPE_URL = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
SPIFFE_VALIDATOR = "envoy.tls.cert_validator.spiffe"
DEFAULT_NAME = "default"
ROOTCA_NAME = "ROOTCA"
ALL_NAME = "ALL"

# Change keys: a workload SVID of one node, one trust domain's bundle, or the set of trust domains.
ChangeKey = Hashable
TRUST_SET: ChangeKey = ("trust-set",)
_BundleItems = tuple[tuple[TrustDomain, TrustBundle], ...]


def svid_key(node_id: str, spiffe_id: SpiffeId) -> ChangeKey:
    return ("svid", node_id, spiffe_id)


def bundle_key(trust_domain: TrustDomain) -> ChangeKey:
    return ("bundle", trust_domain)


@dataclass(frozen=True)
class Resolved:
    """A secret as sent to one caller."""

    name: str
    version: str
    secret: secret_pb2.Secret
    keys: frozenset[ChangeKey]
    # The own-trust-domain bundle sequence this secret carries (0: none), for the root-rotation ACK gate.
    own_bundle_sequence: int = 0

    def packed(self) -> any_pb2.Any:
        """The secret as an ``Any``, packed once (a bundle's ``Resolved`` is shared by every stream).

        Callers put it into a response, which copies it; it is never changed in place.
        """
        return self._packed

    @functools.cached_property
    def _packed(self) -> any_pb2.Any:
        message = any_pb2.Any()
        message.Pack(self.secret)
        return message


class SecretCatalog:
    """Resolves secret names for authenticated callers from the workload registry and the trust store."""

    def __init__(self, registry: WorkloadRegistry, trust: TrustStore, *, signer: BatchSigner | None = None) -> None:
        self._registry = registry
        self._trust = trust
        self._signer = signer  # where :meth:`obtain` signs a first SVID; None: in process
        # name -> (the bundles it was built from, the secret): a bundle change pushes the same validation
        # context to every stream, so it is built once per change, not once per stream.  The trust store
        # hands out the same bundle objects until something changes, so the comparison is mostly identity.
        self._validations: dict[str, tuple[_BundleItems, Resolved]] = {}

    def keys_for(self, name: str) -> frozenset[ChangeKey]:
        """The change keys a name depends on even before it resolves (a peer not yet known waits on TRUST_SET)."""
        if name in (ROOTCA_NAME, ALL_NAME):
            return frozenset({TRUST_SET})
        if name.startswith(SCHEME):
            spiffe_id = _parse_name(name)
            if not spiffe_id.path:
                return frozenset({bundle_key(spiffe_id.trust_domain), TRUST_SET})
        return frozenset()

    def visible_names(self, caller: Caller) -> list[str]:
        """Every name this caller may subscribe to: what an empty (wildcard) request means."""
        names = [DEFAULT_NAME, ROOTCA_NAME, ALL_NAME]
        names += [str(td.id) for td in self._trust.bundles()]
        return names

    def resolve(self, caller: Caller, name: str) -> Resolved | None:
        """The secret ``name`` for ``caller``; ``None`` for a well-formed trust domain we do not (yet) know.

        A missing SVID is signed here, in the calling thread (tools and tests); the servicer uses :meth:`obtain`.

        Raises:
            NotFoundError: the name can never exist (not one of the forms above).
            PolicyViolationError: the name is an SVID the caller is not entitled to.
        """
        spiffe_id = self._svid_of(caller, name)
        if spiffe_id is None:
            return self._bundles_of(name)
        return self._svid(caller, name, self._registry.get_or_issue(caller.node_id, spiffe_id))

    async def obtain(self, caller: Caller, name: str) -> Resolved | None:
        """:meth:`resolve` for the event loop: a missing SVID is signed off the loop by the catalog's
        signer (the signing pool), batched with the other streams that connect in the same loop turn."""
        spiffe_id = self._svid_of(caller, name)
        if spiffe_id is None:
            return self._bundles_of(name)
        return self._svid(caller, name, await self._registry.obtain(caller.node_id, spiffe_id, signer=self._signer))

    def _svid_of(self, caller: Caller, name: str) -> SpiffeId | None:
        """The SVID ``name`` means for ``caller`` once the caller's entitlement is checked; None for a bundle."""
        if name in (ROOTCA_NAME, ALL_NAME):
            return None
        spiffe_id = caller.spiffe_id
        if name != DEFAULT_NAME:
            spiffe_id = _parse_name(name)
            if not spiffe_id.path:
                return None
            if spiffe_id != caller.spiffe_id:
                raise PolicyViolationError(f"{caller.spiffe_id} asked for the SVID of {spiffe_id}")
        if not spiffe_id.is_member_of(self._trust.own):
            # We sign only for our own trust domain; a federated caller gets bundles, never an SVID.
            raise PolicyViolationError(f"{spiffe_id} is not in trust domain {self._trust.own}")
        return spiffe_id

    def _bundles_of(self, name: str) -> Resolved | None:
        if name in (ROOTCA_NAME, ALL_NAME):
            return self._validation(name, self._trust.bundles())
        trust_domain = _parse_name(name).trust_domain
        bundle = self._trust.bundle(trust_domain)
        return None if bundle is None else self._validation(name, {trust_domain: bundle})

    def _svid(self, caller: Caller, name: str, cert: WorkloadCert) -> Resolved:
        return Resolved(name, _svid_version(cert), tls_certificate_secret(name, cert),
                        frozenset({svid_key(caller.node_id, cert.spiffe_id)}))

    def _validation(self, name: str, bundles: Mapping[TrustDomain, TrustBundle]) -> Resolved:
        items = tuple(bundles.items())
        cached = self._validations.get(name)
        if cached is not None and cached[0] == items:
            return cached[1]
        keys = {bundle_key(td) for td in bundles} | {TRUST_SET}
        own = bundles.get(self._trust.own)
        resolved = Resolved(name, _bundles_version(bundles), validation_secret(name, bundles), frozenset(keys),
                            own.sequence if own is not None else 0)
        self._validations[name] = (items, resolved)
        return resolved


def tls_certificate_secret(name: str, cert: WorkloadCert) -> secret_pb2.Secret:
    """``tls_certificate``: chain = leaf + intermediates (never the root), key as PKCS#8 PEM.

    Both as held: the registry keeps the key as the PKCS#8 PEM it was made as (parsing and re-encoding it
    per push cost a fifth of a re-issue push), and the chain's tail PEM is shared by the signer's SVIDs.
    """
    tls = common_pb2.TlsCertificate(
        certificate_chain=base_pb2.DataSource(inline_bytes=cert.svid.chain_pem()),
        private_key=base_pb2.DataSource(inline_bytes=cert.key_pem),
    )
    return secret_pb2.Secret(name=name, tls_certificate=tls)


def validation_secret(name: str, bundles: Mapping[TrustDomain, TrustBundle]) -> secret_pb2.Secret:
    """One trust domain: ``trusted_ca``.  Several: Envoy's SPIFFE validator with one entry per trust
    domain, so a peer's root can only vouch for its own trust domain (never one merged PEM)."""
    if len(bundles) == 1:
        (bundle,) = bundles.values()
        context = common_pb2.CertificateValidationContext(
            trusted_ca=base_pb2.DataSource(inline_bytes=bundle.to_pem()))
        return secret_pb2.Secret(name=name, validation_context=context)
    config = spiffe_pb2.SPIFFECertValidatorConfig(trust_domains=[
        spiffe_pb2.SPIFFECertValidatorConfig.TrustDomain(
            name=td.name, trust_bundle=base_pb2.DataSource(inline_bytes=bundle.to_pem()))
        for td, bundle in bundles.items()
    ])
    typed = any_pb2.Any()
    typed.Pack(config)
    context = common_pb2.CertificateValidationContext(
        custom_validator_config=extension_pb2.TypedExtensionConfig(name=SPIFFE_VALIDATOR, typed_config=typed))
    return secret_pb2.Secret(name=name, validation_context=context)


def _parse_name(name: str) -> SpiffeId:
    if not name.startswith(SCHEME):
        raise NotFoundError(f"unknown secret name {name!r}")
    try:
        return SpiffeId.parse(name)
    except InvalidRequestError as exc:
        raise NotFoundError(f"unknown secret name {name!r}: {exc}") from None


def _svid_version(cert: WorkloadCert) -> str:
    return f"{cert.generation}-{cert.svid.serial}"


def _bundles_version(bundles: Mapping[TrustDomain, TrustBundle]) -> str:
    digest = hashlib.sha256()
    for td, bundle in sorted(bundles.items()):
        digest.update(td.name.encode() + b"\0")
        for fp in sorted(bundle.fingerprints()):
            digest.update(fp)
    return digest.hexdigest()[:16]
