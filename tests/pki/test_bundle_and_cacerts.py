"""Trust bundles (PEM, SPIFFE JWKS) and istiod's cacerts contract."""

from __future__ import annotations

import base64
import datetime as dt
import json
from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives import serialization

from ca_service.pki.bundle import InvalidBundleError, TrustBundle, parse_jwks
from ca_service.pki.cacerts import (
    CA_CERT,
    CA_KEY,
    CACERTS_FILES,
    CERT_CHAIN,
    ROOT_CERT,
    CacertsError,
    build_cacerts,
    check_cacerts,
)
from ca_service.pki.certs import certs_to_pem, load_certs
from ca_service.pki.keys import KeyAlgorithm, load_private_key, private_key_to_pem

from .conftest import NOW, TD, Hierarchy, build_hierarchy, cached_hierarchy


@pytest.mark.parametrize("algorithm", list(KeyAlgorithm), ids=[a.value for a in KeyAlgorithm])
def test_jwks_round_trip_keeps_roots_sequence_and_hint(algorithm: KeyAlgorithm) -> None:
    h = cached_hierarchy(algorithm)
    other = build_hierarchy()
    bundle = TrustBundle(TD, (h.root, other.root), 7, dt.timedelta(seconds=90))
    parsed = parse_jwks(bundle.to_json(), TD)
    assert parsed.roots == bundle.roots
    assert parsed.sequence == 7
    assert parsed.refresh_hint == dt.timedelta(seconds=90)


def test_jwks_entries_follow_the_spiffe_bundle_format(ec_hierarchy: Hierarchy) -> None:
    doc = TrustBundle(TD, (ec_hierarchy.root,), 3).to_jwks()
    (key,) = doc["keys"]
    assert key["use"] == "x509-svid"
    assert "kid" not in key
    assert len(key["x5c"]) == 1
    assert base64.b64decode(key["x5c"][0]) == ec_hierarchy.root.public_bytes(serialization.Encoding.DER)
    assert key["kty"] == "EC" and key["crv"] == "P-256"
    assert doc["spiffe_sequence"] == 3
    assert doc["spiffe_refresh_hint"] == 300


def test_pem_round_trip(ec_hierarchy: Hierarchy) -> None:
    other = build_hierarchy()
    bundle = TrustBundle(TD, (ec_hierarchy.root, other.root))
    assert tuple(load_certs(bundle.to_pem())) == bundle.roots


def test_sequence_moves_forward_only_when_roots_change(ec_hierarchy: Hierarchy) -> None:
    other = build_hierarchy()
    a = TrustBundle(TD, (ec_hierarchy.root,), 1)
    assert a.with_roots([ec_hierarchy.root]) is a
    ab = a.with_roots([ec_hierarchy.root, other.root])
    b = ab.with_roots([other.root])
    assert (a.sequence, ab.sequence, b.sequence) == (1, 2, 3)
    assert b.with_roots([other.root, other.root]).sequence == 3  # duplicates are not a change


def test_a_leaf_cannot_be_a_trust_anchor(ec_hierarchy: Hierarchy) -> None:
    with pytest.raises(InvalidBundleError, match="not a CA"):
        TrustBundle(TD, (ec_hierarchy.leaf,))


def _doc(h: Hierarchy, **changes: object) -> dict[str, object]:
    doc = TrustBundle(TD, (h.root,), 2).to_jwks()
    doc.update(changes)
    return doc


def _key(h: Hierarchy, **changes: object) -> dict[str, object]:
    key = dict(TrustBundle(TD, (h.root,)).to_jwks()["keys"][0])
    key.update(changes)
    return {k: v for k, v in key.items() if v is not None}


JWKS_REJECTIONS: dict[str, Callable[[Hierarchy], bytes]] = {
    "if it is not JSON, should reject": lambda h: b"{not json",
    "if there is no keys array, should reject": lambda h: b'{"spiffe_sequence": 1}',
    "if a key is not an object, should reject": lambda h: json.dumps(_doc(h, keys=["x"])).encode(),
    "if an x509-svid entry has a kid, should reject": lambda h: json.dumps(_doc(h, keys=[_key(h, kid="k1")])).encode(),
    "if x5c holds two certificates, should reject":
        lambda h: json.dumps(_doc(h, keys=[_key(h, x5c=_key(h)["x5c"] * 2)])).encode(),
    "if x5c is missing, should reject": lambda h: json.dumps(_doc(h, keys=[_key(h, x5c=None)])).encode(),
    "if x5c is not base64 DER, should reject": lambda h: json.dumps(_doc(h, keys=[_key(h, x5c=["!!"])])).encode(),
    "if x5c holds a leaf, should reject": lambda h: json.dumps(_doc(h, keys=[_key(h, x5c=[base64.b64encode(
        h.leaf.public_bytes(serialization.Encoding.DER)).decode()])])).encode(),
    "if there are only jwt-svid keys, should reject":
        lambda h: json.dumps(_doc(h, keys=[{"use": "jwt-svid", "kty": "EC", "kid": "a"}])).encode(),
    "if the sequence is negative, should reject": lambda h: json.dumps(_doc(h, spiffe_sequence=-1)).encode(),
    "if the sequence is not an integer, should reject": lambda h: json.dumps(_doc(h, spiffe_sequence="3")).encode(),
    "if the refresh hint is zero, should reject": lambda h: json.dumps(_doc(h, spiffe_refresh_hint=0)).encode(),
}


@pytest.mark.parametrize("case", list(JWKS_REJECTIONS))
def test_parse_jwks_rejections(case: str, ec_hierarchy: Hierarchy) -> None:
    with pytest.raises(InvalidBundleError, match=str(TD)):
        parse_jwks(JWKS_REJECTIONS[case](ec_hierarchy), TD)


def test_parse_jwks_skips_jwt_entries_next_to_x509_ones(ec_hierarchy: Hierarchy) -> None:
    doc = _doc(ec_hierarchy, keys=[{"use": "jwt-svid", "kid": "a", "kty": "EC"}, _key(ec_hierarchy)])
    assert parse_jwks(json.dumps(doc).encode(), TD).roots == (ec_hierarchy.root,)


# ---------------------------------------------------------------- cacerts


def _files(h: Hierarchy) -> dict[str, bytes]:
    return build_cacerts(h.istiod, h.istiod_key, [h.root], [h.root])


def test_built_cacerts_pass_istiods_checks(ec_hierarchy: Hierarchy) -> None:
    files = _files(ec_hierarchy)
    assert sorted(files) == sorted(CACERTS_FILES)
    check_cacerts(files, now=NOW)
    assert private_key_to_pem(load_private_key(files[CA_KEY])) == files[CA_KEY]  # unencrypted PKCS#8
    assert load_certs(files[CERT_CHAIN]) == [ec_hierarchy.istiod, ec_hierarchy.root]


def _with(h: Hierarchy, **changes: bytes) -> dict[str, bytes]:
    files = _files(h)
    files.update({k.replace("_", "-") + ".pem": v for k, v in changes.items()})
    return files


BROKEN_CACERTS: dict[str, tuple[Callable[[Hierarchy], dict[str, bytes]], str]] = {
    "if ca-cert.pem is missing, should reject":
        (lambda h: {k: v for k, v in _files(h).items() if k != CA_CERT}, "missing ca-cert.pem"),
    "if ca-key.pem is missing, should reject":
        (lambda h: {k: v for k, v in _files(h).items() if k != CA_KEY}, "missing ca-key.pem"),
    "if root-cert.pem is missing, should reject":
        (lambda h: {k: v for k, v in _files(h).items() if k != ROOT_CERT}, "missing root-cert.pem"),
    "if cert-chain.pem is missing, should reject":
        (lambda h: {k: v for k, v in _files(h).items() if k != CERT_CHAIN}, "missing cert-chain.pem"),
    "if the key file starts with a certificate, should reject":
        (lambda h: _with(h, ca_key=certs_to_pem([h.istiod]) + private_key_to_pem(h.istiod_key)), "first PEM block"),
    "if the key does not match ca-cert.pem, should reject":
        (lambda h: _with(h, ca_key=private_key_to_pem(h.signing_key)), "does not match"),
    "if ca-cert.pem is a leaf, should reject":
        (lambda h: build_cacerts(h.leaf, h.leaf_key, [h.signing, h.root], [h.root]), "not a CA"),
    "if the root is another CA's, should reject":
        (lambda h: _with(h, root_cert=certs_to_pem([build_hierarchy().root])), "does not verify"),
    "if cert-chain.pem does not start with ca-cert.pem, should reject":
        (lambda h: _with(h, cert_chain=certs_to_pem([h.signing, h.root])), "must start with"),
    "if a CA certificate carries an EKU, should reject":
        (lambda h: _with(h, root_cert=certs_to_pem([h.root, h.leaf])), "extended key usage"),
    "if ca-cert.pem is not PEM, should reject": (lambda h: _with(h, ca_cert=b"garbage"), "ca-cert.pem"),
}


@pytest.mark.parametrize("case", list(BROKEN_CACERTS))
def test_check_cacerts_rejects_broken_sets(case: str, ec_hierarchy: Hierarchy) -> None:
    make, fragment = BROKEN_CACERTS[case]
    with pytest.raises(CacertsError, match=fragment) as info:
        check_cacerts(make(ec_hierarchy), now=NOW)
    assert info.value.problems


def test_check_cacerts_rejects_an_expired_set(ec_hierarchy: Hierarchy) -> None:
    with pytest.raises(CacertsError, match="does not verify"):
        check_cacerts(_files(ec_hierarchy), now=NOW + dt.timedelta(days=366))


def test_sec1_and_pkcs1_key_headers_are_accepted() -> None:
    for algorithm, fmt in ((KeyAlgorithm.EC_P256, serialization.PrivateFormat.TraditionalOpenSSL),
                           (KeyAlgorithm.RSA_2048, serialization.PrivateFormat.TraditionalOpenSSL)):
        h = cached_hierarchy(algorithm)
        files = _files(h)
        files[CA_KEY] = h.istiod_key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())
        check_cacerts(files, now=NOW)
