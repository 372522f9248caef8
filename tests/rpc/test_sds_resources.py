"""The secret catalog without gRPC: what is built once and shared, and that a change still reaches the secret."""

from __future__ import annotations

from cryptography import x509

from ca_service.app import register_reactions
from ca_service.config import RotationSettings, Settings
from ca_service.pki.certs import certs_to_pem, fingerprint
from ca_service.pki.identity import SpiffeId
from ca_service.pki.keys import load_private_key, private_key_to_pem
from ca_service.rotation.planner import RotationPolicy
from ca_service.rotation.transitions import force_root
from ca_service.rpc.authn import Caller
from ca_service.rpc.sds_resources import SecretCatalog
from ca_service.services.authority import Authority
from ca_service.services.trust import TrustStore
from ca_service.services.workloads import WorkloadRegistry
from tests.clock import FakeClock
from tests.rpc.sds_fixtures import peer_bundle

A = Caller(SpiffeId.parse("spiffe://cluster.local/ns/default/sa/a"), "node-a", "node-metadata", "default", "a")
B = Caller(SpiffeId.parse("spiffe://cluster.local/ns/default/sa/b"), "node-b", "node-metadata", "default", "b")


def catalog_of(authority: Authority, clock: FakeClock) -> tuple[SecretCatalog, TrustStore, WorkloadRegistry]:
    trust = TrustStore(authority)
    register_reactions(authority.reactions, trust=trust)
    registry = WorkloadRegistry(authority, RotationSettings(), clock)
    return SecretCatalog(registry, trust), trust, registry


def roots_in(pem: bytes) -> set[bytes]:
    return {fingerprint(c) for c in x509.load_pem_x509_certificates(pem)}


def test_one_validation_context_is_shared_by_every_caller_while_the_bundles_stay(authority: Authority,
                                                                                  clock: FakeClock):
    catalog, _, _ = catalog_of(authority, clock)
    first = catalog.resolve(A, "ROOTCA")
    assert first is not None
    assert catalog.resolve(B, "ROOTCA") is first
    assert first.packed() is first.packed()


def test_a_new_peer_and_its_removal_change_the_validation_context(authority: Authority, clock: FakeClock):
    catalog, trust, _ = catalog_of(authority, clock)
    alone = catalog.resolve(A, "ROOTCA")
    trust.set_peer(peer_bundle("eu.cluster.local", clock.now()))
    federated = catalog.resolve(A, "ROOTCA")
    assert alone is not None and federated is not None
    assert federated.version != alone.version
    assert federated.secret.validation_context.HasField("custom_validator_config")
    (peer,) = trust.peers()
    trust.remove_peer(peer)
    back = catalog.resolve(A, "ROOTCA")
    assert back is not None and back.version == alone.version
    assert back.secret.validation_context.HasField("trusted_ca")


def test_a_root_rotation_publishes_the_new_root_in_rootca(authority: Authority, clock: FakeClock,
                                                          settings: Settings):
    catalog, _, _ = catalog_of(authority, clock)
    before = catalog.resolve(A, "ROOTCA")
    bundle_before = authority.bundle()
    assert authority.bundle() is bundle_before  # one object per state: what SDS compares first
    authority.commit(force_root(authority.state, clock.now(), RotationPolicy.from_settings(settings), reason="test"))
    after = catalog.resolve(A, "ROOTCA")
    assert before is not None and after is not None
    assert authority.bundle() is not bundle_before and authority.bundle().sequence == bundle_before.sequence + 1
    assert after.version != before.version and after.own_bundle_sequence == before.own_bundle_sequence + 1
    assert roots_in(after.secret.validation_context.trusted_ca.inline_bytes) == \
        roots_in(authority.bundle().to_pem()) > roots_in(before.secret.validation_context.trusted_ca.inline_bytes)


def test_the_svid_secret_carries_the_key_as_held_and_the_chain_leaf_first(authority: Authority, clock: FakeClock):
    catalog, _, registry = catalog_of(authority, clock)
    resolved = catalog.resolve(A, "default")
    cert = registry.get(A.node_id, A.spiffe_id)
    assert resolved is not None and cert is not None
    tls = resolved.secret.tls_certificate
    assert tls.private_key.inline_bytes == cert.key_pem
    assert private_key_to_pem(load_private_key(cert.key_pem)) == cert.key_pem  # unencrypted PKCS#8
    assert tls.certificate_chain.inline_bytes == certs_to_pem(cert.svid.chain)
