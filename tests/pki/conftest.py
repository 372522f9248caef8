"""A CA hierarchy built straight from the pure templates, at a fixed instant."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import pytest
from cryptography import x509

from ca_service.pki.identity import SpiffeId, TrustDomain
from ca_service.pki.keys import KeyAlgorithm, PrivateKey, generate_private_key
from ca_service.pki.templates import CAKind, build_intermediate, build_root, build_svid

NOW = dt.datetime(2030, 1, 1, 12, 0, tzinfo=dt.UTC)
TD = TrustDomain("cluster.local")
WORKLOAD = SpiffeId.parse("spiffe://cluster.local/ns/default/sa/web")


@dataclass(frozen=True)
class Hierarchy:
    root: x509.Certificate
    root_key: PrivateKey
    signing: x509.Certificate
    signing_key: PrivateKey
    istiod: x509.Certificate
    istiod_key: PrivateKey
    leaf: x509.Certificate
    leaf_key: PrivateKey


def build_hierarchy(algorithm: KeyAlgorithm = KeyAlgorithm.EC_P256, *, now: dt.datetime = NOW,
                    leaf_ttl: dt.timedelta = dt.timedelta(hours=24)) -> Hierarchy:
    root_key = generate_private_key(algorithm)
    root = build_root(root_key, TD, now=now, ttl=dt.timedelta(days=3650))
    signing_key = generate_private_key(algorithm)
    signing = build_intermediate(signing_key.public_key(), TD, issuer=root, issuer_key=root_key, now=now,
                                 ttl=dt.timedelta(days=30))
    istiod_key = generate_private_key(algorithm)
    istiod = build_intermediate(istiod_key.public_key(), TD, issuer=root, issuer_key=root_key, now=now,
                                ttl=dt.timedelta(days=365), kind=CAKind.ISTIOD_INTERMEDIATE)
    leaf_key = generate_private_key(algorithm)
    leaf = build_svid(leaf_key.public_key(), WORKLOAD, issuer=signing, issuer_key=signing_key, now=now,
                      ttl=leaf_ttl)
    return Hierarchy(root, root_key, signing, signing_key, istiod, istiod_key, leaf, leaf_key)


_CACHE: dict[KeyAlgorithm, Hierarchy] = {}


def cached_hierarchy(algorithm: KeyAlgorithm) -> Hierarchy:
    # RSA-3072 generation is slow; the profile tests only read the certificates.
    if algorithm not in _CACHE:
        _CACHE[algorithm] = build_hierarchy(algorithm)
    return _CACHE[algorithm]


@pytest.fixture(params=list(KeyAlgorithm), ids=[a.value for a in KeyAlgorithm])
def hierarchy(request: pytest.FixtureRequest) -> Hierarchy:
    return cached_hierarchy(request.param)


@pytest.fixture
def ec_hierarchy() -> Hierarchy:
    return cached_hierarchy(KeyAlgorithm.EC_P256)
