"""IssuedChainVerifier: verify_svid's answer for every leaf, the full path verifier only once per signer."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ca_service.pki import verify as verify_module
from ca_service.pki.identity import SpiffeId
from ca_service.pki.keys import KeyAlgorithm, PrivateKey, generate_private_key
from ca_service.pki.leaf_der import tlv
from ca_service.pki.templates import IssuerProfile, build_svid
from ca_service.pki.verify import ChainVerificationError, IssuedChainVerifier, verify_svid

from .conftest import NOW, WORKLOAD, Hierarchy, build_hierarchy, cached_hierarchy

Chain = tuple[x509.Certificate, list[x509.Certificate], list[x509.Certificate], dt.datetime]


def _warm(h: Hierarchy) -> IssuedChainVerifier:
    verifier = IssuedChainVerifier()
    assert verifier.verify(h.leaf, [h.signing], [h.root], now=NOW) == WORKLOAD
    return verifier


def _leaf(h: Hierarchy, *, issuer_key: object = None, spiffe_id: SpiffeId = WORKLOAD,
          ttl: dt.timedelta = dt.timedelta(hours=1)) -> x509.Certificate:
    return build_svid(generate_private_key().public_key(), spiffe_id, issuer=h.signing,
                      issuer_key=issuer_key or h.signing_key, now=NOW, ttl=ttl)  # type: ignore[arg-type]


def _same_name_intermediate(h: Hierarchy) -> tuple[x509.Certificate, PrivateKey]:
    """Another intermediate with the very same subject, under another root: a name match is not enough."""
    other = build_hierarchy()
    key = generate_private_key()
    cert = (x509.CertificateBuilder().subject_name(h.signing.subject).issuer_name(other.root.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(NOW - dt.timedelta(hours=1)).not_valid_after(NOW + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(other.root_key, hashes.SHA256()))
    return cert, key


def _under_another_name(h: Hierarchy) -> x509.Certificate:
    """Signed with our intermediate's very key, but naming another issuer: a good signature is not enough."""
    renamed = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "not our intermediate")]))
               .issuer_name(h.root.subject).public_key(h.signing_key.public_key())  # type: ignore[arg-type]
               .serial_number(x509.random_serial_number())
               .not_valid_before(NOW - dt.timedelta(hours=1)).not_valid_after(NOW + dt.timedelta(days=30))
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(h.signing_key.public_key()),  # type: ignore[arg-type]
                              critical=False)
               .sign(h.root_key, hashes.SHA256()))  # type: ignore[arg-type]
    return build_svid(generate_private_key().public_key(), WORKLOAD, issuer=renamed, issuer_key=h.signing_key,
                      now=NOW, ttl=dt.timedelta(hours=1))


def _algorithms_disagree(h: Hierarchy) -> x509.Certificate:
    """Signed by our intermediate's key, but the TBS names ecdsa-with-SHA256 while the certificate says
    (and the signature uses) SHA-384: the inner and outer signature algorithms must agree."""
    template = IssuerProfile.of(h.signing, h.signing_key).template
    assert template is not None
    tbs = template.tbs(generate_private_key().public_key(), str(WORKLOAD), serial=x509.random_serial_number(),
                       not_before=NOW - dt.timedelta(minutes=5), not_after=NOW + dt.timedelta(hours=1))
    signature = h.signing_key.sign(tbs, ec.ECDSA(hashes.SHA384()))  # type: ignore[call-arg, arg-type]
    ecdsa_with_sha384 = bytes.fromhex("300a06082a8648ce3d040303")
    return x509.load_der_x509_certificate(tlv(0x30, tbs + ecdsa_with_sha384 + tlv(0x03, b"\x00" + signature)))


def _under_same_name(h: Hierarchy) -> x509.Certificate:
    cert, key = _same_name_intermediate(h)
    return build_svid(generate_private_key().public_key(), WORKLOAD, issuer=cert, issuer_key=key, now=NOW,
                      ttl=dt.timedelta(hours=1))


BAD: dict[str, Callable[[Hierarchy], Chain]] = {
    "expired leaf": lambda h: (h.leaf, [h.signing], [h.root], NOW + dt.timedelta(days=2)),
    "leaf not yet valid": lambda h: (h.leaf, [h.signing], [h.root], NOW - dt.timedelta(hours=1)),
    "roots of another CA": lambda h: (h.leaf, [h.signing], [build_hierarchy().root], NOW),
    "no intermediate": lambda h: (h.leaf, [], [h.root], NOW),
    "no roots": lambda h: (h.leaf, [h.signing], [], NOW),
    "a CA as the leaf": lambda h: (h.signing, [h.signing], [h.root], NOW),
    "signed by another key under our intermediate's name": lambda h: (
        _leaf(h, issuer_key=generate_private_key()), [h.signing], [h.root], NOW),
    "signed by a same-named intermediate of another root": lambda h: (
        _under_same_name(h), [h.signing], [h.root], NOW),
    "signed by our intermediate's key under another issuer name": lambda h: (
        _under_another_name(h), [h.signing], [h.root], NOW),
    "inner and outer signature algorithms differ": lambda h: (_algorithms_disagree(h), [h.signing], [h.root], NOW),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_warm_verifier_refuses_what_verify_svid_refuses(case: str) -> None:
    h = cached_hierarchy(KeyAlgorithm.EC_P256)
    leaf, tail, roots, now = BAD[case](h)
    with pytest.raises(ChainVerificationError):
        verify_svid(leaf, tail, roots, now=now)
    with pytest.raises(ChainVerificationError):
        _warm(h).verify(leaf, tail, roots, now=now)


@pytest.mark.parametrize("algorithm", [KeyAlgorithm.EC_P256, KeyAlgorithm.EC_P384, KeyAlgorithm.RSA_2048],
                         ids=lambda a: a.value)
def test_a_warm_verifier_accepts_what_verify_svid_accepts(algorithm: KeyAlgorithm) -> None:
    h = cached_hierarchy(algorithm)
    verifier = _warm(h)
    for n in range(5):
        spiffe_id = SpiffeId.parse(f"spiffe://cluster.local/ns/ns-{n}/sa/sa-{n}")
        leaf = _leaf(h, spiffe_id=spiffe_id, ttl=dt.timedelta(minutes=5 + n))
        now = NOW + dt.timedelta(seconds=n)
        assert verifier.verify(leaf, [h.signing], [h.root], now=now) == verify_svid(leaf, [h.signing], [h.root],
                                                                                      now=now) == spiffe_id


def test_the_full_verifier_runs_once_per_path_and_again_after_recheck(monkeypatch: pytest.MonkeyPatch) -> None:
    h = cached_hierarchy(KeyAlgorithm.EC_P256)
    full: list[dt.datetime] = []
    real = verify_module.verify_svid

    def counting(leaf: x509.Certificate, tail: object, roots: object, *, now: dt.datetime) -> SpiffeId:
        full.append(now)
        return real(leaf, tail, roots, now=now)  # type: ignore[arg-type]

    monkeypatch.setattr(verify_module, "verify_svid", counting)
    verifier = IssuedChainVerifier(recheck=dt.timedelta(minutes=1))
    for seconds in (0, 1, 30, 59):
        verifier.verify(_leaf(h), [h.signing], [h.root], now=NOW + dt.timedelta(seconds=seconds))
    assert full == [NOW]
    later = NOW + dt.timedelta(seconds=61)
    verifier.verify(_leaf(h), [h.signing], [h.root], now=later)
    assert full == [NOW, later]
    # A new root set (a root rotation adds B) is a new path: verified in full at once.
    other = build_hierarchy().root
    verifier.verify(_leaf(h), [h.signing], [h.root, other], now=later)
    assert len(full) == 3


def test_a_leaf_naming_another_identity_than_expected_is_refused_cold_and_warm() -> None:
    h = cached_hierarchy(KeyAlgorithm.EC_P256)
    other = SpiffeId.parse("spiffe://cluster.local/ns/other/sa/other")
    with pytest.raises(ChainVerificationError, match=re.escape(f"not {other}")):
        IssuedChainVerifier().verify(_leaf(h), [h.signing], [h.root], now=NOW, expected=other)
    verifier = _warm(h)
    with pytest.raises(ChainVerificationError, match=re.escape(f"not {other}")):
        verifier.verify(_leaf(h), [h.signing], [h.root], now=NOW, expected=other)
    assert verifier.verify(_leaf(h), [h.signing], [h.root], now=NOW, expected=WORKLOAD) == WORKLOAD


def test_equal_but_distinct_certificate_objects_find_the_same_path(monkeypatch: pytest.MonkeyPatch) -> None:
    # The last path is matched by identity; equal certificates loaded again must still be found (by
    # value), not verified in full once more, and not mistaken for another path.
    h = cached_hierarchy(KeyAlgorithm.EC_P256)
    full: list[dt.datetime] = []
    real = verify_module.verify_svid
    monkeypatch.setattr(verify_module, "verify_svid", lambda leaf, tail, roots, *, now: (
        full.append(now), real(leaf, tail, roots, now=now))[1])
    verifier = IssuedChainVerifier()
    verifier.verify(_leaf(h), [h.signing], [h.root], now=NOW)
    other = build_hierarchy()
    verifier.verify(other.leaf, [other.signing], [other.root], now=NOW)  # now the last path is another one
    reloaded = [x509.load_der_x509_certificate(c.public_bytes(serialization.Encoding.DER)) for c in (h.signing, h.root)]
    verifier.verify(_leaf(h), reloaded[:1], reloaded[1:], now=NOW)
    assert len(full) == 2
