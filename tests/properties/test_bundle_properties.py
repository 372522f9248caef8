"""SPIFFE bundle documents from a peer: every input either parses to exactly the roots the spec
allows or is refused with InvalidRequestError (load_bootstrap: BundleRejectedError); nothing else escapes."""

from __future__ import annotations

import base64
import datetime as dt
import json
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given
from hypothesis import strategies as st

from ca_service.errors import InvalidRequestError
from ca_service.federation.policy import load_bootstrap
from ca_service.pki.bundle import parse_jwks
from ca_service.pki.certs import is_ca
from ca_service.pki.identity import TrustDomain
from ca_service.pki.keys import KeyAlgorithm
from ca_service.rotation.minting import bootstrap_state
from tests.properties.profiles import DEFAULT, SLOW, SLOW_TIMEOUT

TD = TrustDomain("eu.example")
NOW = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
_STATE = bootstrap_state(TD, algorithm=KeyAlgorithm.EC_P256, root_ttl=dt.timedelta(days=365),
                         intermediate_ttl=dt.timedelta(days=30), istiod_ttl=dt.timedelta(days=60), now=NOW)
ROOT = _STATE.bundle().roots[0]


def _leaf() -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "leaf")])
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(NOW).not_valid_after(NOW + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))


def _b64(cert: x509.Certificate) -> str:
    return base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()


ROOT_B64, LEAF_B64 = _b64(ROOT), _b64(_leaf())
JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False),
                         st.text(max_size=20))
JSON_ANY = st.recursive(JSON_SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                              st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                        max_leaves=12)
X5C = st.one_of(st.just([ROOT_B64]), st.just([LEAF_B64]), st.just([ROOT_B64, ROOT_B64]), st.just([]),
                st.just([ROOT_B64[:-4]]), st.just(ROOT_B64), st.lists(st.text(max_size=12), max_size=2), JSON_ANY)
ENTRY = st.fixed_dictionaries({}, optional={
    "use": st.one_of(st.just("x509-svid"), st.just("jwt-svid"), JSON_ANY), "x5c": X5C,
    "kid": st.text(max_size=4), "kty": st.sampled_from(["EC", "RSA"]), "extra": JSON_ANY})
DOCUMENT = st.fixed_dictionaries({}, optional={
    "keys": st.one_of(st.lists(ENTRY, max_size=4), JSON_ANY),
    "spiffe_sequence": st.one_of(st.integers(-3, 2**64), st.booleans(), st.floats(), st.text(max_size=3)),
    "spiffe_refresh_hint": st.one_of(st.integers(-3, 2**40), st.booleans(), st.floats(), st.none()),
})
INPUTS = st.one_of(DOCUMENT.map(lambda d: json.dumps(d).encode()), st.binary(max_size=200),
                   JSON_ANY.map(lambda d: json.dumps(d).encode()),
                   DOCUMENT.map(lambda d: json.dumps(d).encode()).flatmap(
                       lambda raw: st.integers(0, max(len(raw) - 1, 0)).map(lambda i: raw[:i])))


def spec_roots(doc: Any) -> list[x509.Certificate] | None:
    """The roots the SPIFFE Trust Domain and Bundle spec allows from ``doc``; None: the document must be refused."""
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        return None
    roots = []
    for key in doc["keys"]:
        if not isinstance(key, dict):
            return None
        if key.get("use") != "x509-svid":
            continue
        x5c = key.get("x5c")
        if "kid" in key or not isinstance(x5c, list) or len(x5c) != 1 or x5c[0] not in (ROOT_B64, LEAF_B64):
            return None
        if x5c[0] == LEAF_B64:
            return None
        roots.append(ROOT)
    sequence, hint = doc.get("spiffe_sequence", 0), doc.get("spiffe_refresh_hint", 300)
    if type(sequence) is not int or sequence < 0 or type(hint) is not int or hint <= 0:
        return None
    return roots or None


def check_bundle(raw: bytes) -> None:
    try:
        doc = json.loads(raw)
    except ValueError:
        doc = None
    try:
        bundle = parse_jwks(raw, TD)
    except InvalidRequestError:
        assert spec_roots(doc) is None, f"refused a bundle the spec allows: {raw[:200]!r}"
        return
    expected = spec_roots(doc)
    assert expected is not None, f"accepted a bundle the spec forbids: {raw[:200]!r}"
    assert list(bundle.roots) == [ROOT] and all(is_ca(r) for r in bundle.roots)
    assert bundle.sequence == doc.get("spiffe_sequence", 0) and bundle.trust_domain == TD


def check_bootstrap(raw: bytes) -> None:
    try:
        bundle = load_bootstrap(raw, TD)
    except InvalidRequestError:
        return
    assert bundle.roots and all(is_ca(r) for r in bundle.roots)


@DEFAULT
@given(INPUTS)
def test_a_bundle_document_parses_to_exactly_the_allowed_roots_or_is_refused(raw: bytes) -> None:
    check_bundle(raw)


@DEFAULT
@given(INPUTS)
def test_a_bootstrap_bundle_is_a_ca_bundle_or_a_rejection(raw: bytes) -> None:
    check_bootstrap(raw)


@pytest.mark.slow
@pytest.mark.timeout(SLOW_TIMEOUT)
@SLOW
@given(INPUTS)
def test_ten_thousand_bundle_documents_are_judged_as_the_spec_does(raw: bytes) -> None:
    check_bundle(raw)
    check_bootstrap(raw)
