"""Certificate profiles: every SPIFFE X509-SVID / RFC 5280 MUST on every certificate kind and key type,
and proof that each assertion helper rejects a deliberately wrong certificate."""

from __future__ import annotations

import datetime as dt
import types
from collections.abc import Callable

import profiles as p
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID

from ca_service.pki.identity import SpiffeId
from ca_service.pki.keys import KeyAlgorithm, PrivateKey, generate_private_key, key_id
from ca_service.pki.templates import DEFAULT_BACKDATE, build_intermediate, build_root, build_svid

from .conftest import NOW, TD, WORKLOAD, Hierarchy, build_hierarchy

LEAF_RULES: dict[str, Callable[[Hierarchy], object]] = {
    "a leaf has exactly one URI SAN, the workload's SPIFFE ID":
        lambda h: p.check_exactly_one_uri_san(h.leaf) == str(WORKLOAD) or pytest.fail("wrong URI SAN"),
    "a leaf has no DNS/IP/email SANs": lambda h: p.check_no_other_sans(h.leaf),
    "a leaf is CA:FALSE": lambda h: p.check_ca_false(h.leaf),
    "a leaf keyUsage is critical with digitalSignature and without keyCertSign/cRLSign":
        lambda h: p.check_leaf_key_usage(h.leaf),
    "a leaf has EKU serverAuth and clientAuth": lambda h: p.check_server_and_client_auth(h.leaf),
    "a leaf has an empty subject and therefore a critical SAN":
        lambda h: (len(h.leaf.subject) == 0 or pytest.fail("subject not empty"),
                   p.check_san_critical_if_subject_empty(h.leaf)),
    "a leaf SKI identifies its key": lambda h: p.check_ski_matches_key(h.leaf),
    "a leaf AKI names the signing intermediate": lambda h: p.check_aki_names_issuer(h.leaf, h.signing),
    "a leaf serial is positive and at most 20 octets": lambda h: p.check_serial(h.leaf),
    "a leaf lies within its issuer's validity": lambda h: p.check_within_issuer(h.leaf, h.signing),
    "a leaf notBefore is backdated": lambda h: p.check_backdated(h.leaf, NOW),
    "a leaf is signed by the signing intermediate": lambda h: p.check_signed_by(h.leaf, h.signing),
}


@pytest.mark.parametrize("rule", list(LEAF_RULES))
def test_workload_svid_profile(rule: str, hierarchy: Hierarchy) -> None:
    LEAF_RULES[rule](hierarchy)


def _cas(h: Hierarchy) -> dict[str, tuple[x509.Certificate, x509.Certificate | None, int | None]]:
    return {"root": (h.root, None, None), "signing": (h.signing, h.root, 0), "istiod": (h.istiod, h.root, 0)}


CA_RULES: dict[str, Callable[[x509.Certificate, x509.Certificate | None, int | None], None]] = {
    "a CA is CA:TRUE with critical basicConstraints": lambda c, i, n: p.check_ca_true(c),
    "a CA keyUsage is critical with keyCertSign and cRLSign": lambda c, i, n: p.check_ca_key_usage(c),
    "a CA carries no EKU": lambda c, i, n: p.check_no_eku(c),
    "a CA has the expected pathlen (none for a root, 0 for intermediates)":
        lambda c, i, n: p.check_path_length(c, n),
    "a CA SKI identifies its key": lambda c, i, n: p.check_ski_matches_key(c),
    "a CA AKI names its issuer (itself for a root)": lambda c, i, n: p.check_aki_names_issuer(c, i or c),
    "a CA serial is positive and at most 20 octets": lambda c, i, n: p.check_serial(c),
    "a CA is signed by its issuer (itself for a root)": lambda c, i, n: p.check_signed_by(c, i or c),
    "a CA notBefore is backdated": lambda c, i, n: p.check_backdated(c, NOW),
}


@pytest.mark.parametrize("kind", ["root", "signing", "istiod"])
@pytest.mark.parametrize("rule", list(CA_RULES))
def test_ca_profile(rule: str, kind: str, hierarchy: Hierarchy) -> None:
    cert, issuer, pathlen = _cas(hierarchy)[kind]
    CA_RULES[rule](cert, issuer, pathlen)


def test_the_whole_profiles_hold_for_every_kind(hierarchy: Hierarchy) -> None:
    p.assert_is_ca(hierarchy.root)
    p.assert_is_ca(hierarchy.signing, hierarchy.root, path_length=0)
    p.assert_is_ca(hierarchy.istiod, hierarchy.root, path_length=0)
    p.assert_is_svid(hierarchy.leaf, hierarchy.signing, str(WORKLOAD))


def test_the_key_type_of_each_certificate_is_the_one_asked_for() -> None:
    h = build_hierarchy(KeyAlgorithm.EC_P384)
    assert h.leaf.public_key().curve.name == "secp384r1"  # type: ignore[union-attr]
    assert isinstance(h.leaf.signature_hash_algorithm, hashes.SHA384)


def test_leaf_not_after_is_clamped_to_the_issuer_not_after() -> None:
    h = build_hierarchy(leaf_ttl=dt.timedelta(days=300))
    assert h.leaf.not_valid_after_utc == h.signing.not_valid_after_utc
    assert h.leaf.not_valid_after_utc < NOW + dt.timedelta(days=300)


def test_leaf_not_before_is_never_before_the_issuer_not_before() -> None:
    h = build_hierarchy()
    # A leaf issued right after the intermediate: backdating would reach before the issuer's notBefore.
    key = generate_private_key()
    leaf = build_svid(key.public_key(), WORKLOAD, issuer=h.signing, issuer_key=h.signing_key,
                      now=h.signing.not_valid_before_utc + dt.timedelta(seconds=1), ttl=dt.timedelta(hours=1))
    assert leaf.not_valid_before_utc == h.signing.not_valid_before_utc


def test_leaf_not_before_is_backdated_by_the_default_amount(ec_hierarchy: Hierarchy) -> None:
    assert ec_hierarchy.leaf.not_valid_before_utc == NOW - DEFAULT_BACKDATE


def test_a_trust_domain_id_cannot_be_issued_as_a_workload_svid(ec_hierarchy: Hierarchy) -> None:
    with pytest.raises(ValueError, match="names a trust domain"):
        build_svid(generate_private_key().public_key(), TD.id, issuer=ec_hierarchy.signing,
                   issuer_key=ec_hierarchy.signing_key, now=NOW, ttl=dt.timedelta(hours=1))


def test_a_naive_now_is_refused() -> None:
    with pytest.raises(ValueError, match="aware"):
        build_root(generate_private_key(), TD, now=dt.datetime(2030, 1, 1), ttl=dt.timedelta(days=1))


# ---------------------------------------------------------------- negative cases: the helpers bite


def _hand_built(issuer: x509.Certificate, issuer_key: PrivateKey, *, ca: bool = False,
                uris: tuple[str, ...] = (str(WORKLOAD),), dns: tuple[str, ...] = (),
                usage: x509.KeyUsage | None = None, usage_critical: bool = True, eku: bool = True,
                san_critical: bool = True, ski: bool = True, aki: bool = True, serial: int = 12345,
                not_after: dt.datetime | None = None, pathlen: int | None = None) -> x509.Certificate:
    key = generate_private_key()
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
    names += [x509.DNSName(d) for d in dns]
    usage = usage or x509.KeyUsage(True, False, False, False, False, ca, ca, False, False)
    builder = (
        x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(issuer.subject)
        .serial_number(serial).public_key(key.public_key())
        .not_valid_before(NOW - dt.timedelta(minutes=5)).not_valid_after(not_after or NOW + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=pathlen), critical=True)
        .add_extension(usage, critical=usage_critical)
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=san_critical)
    if eku:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    if ski:
        builder = builder.add_extension(x509.SubjectKeyIdentifier(key_id(key.public_key())), critical=False)
    if aki:
        issuer_ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_ski), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


_KU_CERT_SIGN = x509.KeyUsage(True, False, False, False, False, True, False, False, False)
_KU_CRL_SIGN = x509.KeyUsage(True, False, False, False, False, False, True, False, False)
_KU_NO_DS = x509.KeyUsage(False, False, True, False, False, False, False, False, False)

BAD_LEAVES: dict[str, tuple[dict[str, object], Callable[[x509.Certificate, x509.Certificate], None]]] = {
    "a leaf with two URI SANs is rejected":
        ({"uris": (str(WORKLOAD), "spiffe://cluster.local/other")}, lambda c, i: p.check_exactly_one_uri_san(c)),
    "a leaf without a URI SAN is rejected":
        ({"uris": (), "dns": ("web",)}, lambda c, i: p.check_exactly_one_uri_san(c)),
    "a leaf with an extra DNS SAN is rejected": ({"dns": ("web.example",)}, lambda c, i: p.check_no_other_sans(c)),
    "a CA:TRUE leaf is rejected": ({"ca": True}, lambda c, i: p.check_ca_false(c)),
    "a leaf with keyCertSign is rejected": ({"usage": _KU_CERT_SIGN}, lambda c, i: p.check_leaf_key_usage(c)),
    "a leaf with cRLSign is rejected": ({"usage": _KU_CRL_SIGN}, lambda c, i: p.check_leaf_key_usage(c)),
    "a leaf without digitalSignature is rejected": ({"usage": _KU_NO_DS}, lambda c, i: p.check_leaf_key_usage(c)),
    "a leaf with a non-critical keyUsage is rejected":
        ({"usage_critical": False}, lambda c, i: p.check_leaf_key_usage(c)),
    "a leaf without EKU is rejected": ({"eku": False}, lambda c, i: p.check_server_and_client_auth(c)),
    "a leaf with an empty subject and a non-critical SAN is rejected":
        ({"san_critical": False}, lambda c, i: p.check_san_critical_if_subject_empty(c)),
    "a leaf without SKI is rejected": ({"ski": False}, lambda c, i: p.check_ski_matches_key(c)),
    "a leaf without AKI is rejected": ({"aki": False}, lambda c, i: p.check_aki_names_issuer(c, i)),
    "a leaf outliving its issuer is rejected":
        ({"not_after": NOW + dt.timedelta(days=400)}, lambda c, i: p.check_within_issuer(c, i)),
    "a CA with an EKU is rejected": ({"ca": True}, lambda c, i: p.check_no_eku(c)),
    "a CA without cRLSign is rejected": ({"ca": True, "usage": _KU_CERT_SIGN}, lambda c, i: p.check_ca_key_usage(c)),
    "a CA with the wrong pathlen is rejected": ({"ca": True, "pathlen": 3}, lambda c, i: p.check_path_length(c, 0)),
}


@pytest.mark.parametrize("case", list(BAD_LEAVES))
def test_helpers_reject_hand_built_wrong_certificates(case: str, ec_hierarchy: Hierarchy) -> None:
    kwargs, check = BAD_LEAVES[case]
    cert = _hand_built(ec_hierarchy.signing, ec_hierarchy.signing_key, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(AssertionError):
        check(cert, ec_hierarchy.signing)


def test_helpers_reject_a_certificate_signed_by_another_ca(ec_hierarchy: Hierarchy) -> None:
    other = build_hierarchy()
    cert = _hand_built(other.signing, other.signing_key)
    with pytest.raises(AssertionError):
        p.check_signed_by(cert, ec_hierarchy.signing)
    with pytest.raises(AssertionError):
        p.check_aki_names_issuer(cert, ec_hierarchy.signing)


def test_helpers_accept_a_correct_hand_built_leaf(ec_hierarchy: Hierarchy) -> None:
    # The control for the negative table: with no defect the same builder passes every check.
    cert = _hand_built(ec_hierarchy.signing, ec_hierarchy.signing_key)
    p.assert_is_svid(cert, ec_hierarchy.signing, str(WORKLOAD))


def test_intermediates_are_clamped_to_the_root() -> None:
    key = generate_private_key()
    root = build_root(key, TD, now=NOW, ttl=dt.timedelta(days=10))
    inter_key = generate_private_key()
    inter = build_intermediate(inter_key.public_key(), TD, issuer=root, issuer_key=key, now=NOW,
                               ttl=dt.timedelta(days=30))
    assert inter.not_valid_after_utc == root.not_valid_after_utc
    p.assert_is_ca(inter, root, path_length=0)


def test_every_svid_gets_a_fresh_serial(ec_hierarchy: Hierarchy) -> None:
    serials = {
        build_svid(generate_private_key().public_key(), SpiffeId.parse("spiffe://cluster.local/a"),
                   issuer=ec_hierarchy.signing, issuer_key=ec_hierarchy.signing_key, now=NOW,
                   ttl=dt.timedelta(hours=1)).serial_number
        for _ in range(20)
    }
    assert len(serials) == 20


@pytest.mark.parametrize("serial", [0, -1, 2**159, 2**200], ids=["zero", "negative", "21 octets", "26 octets"])
def test_check_serial_rejects_serials_outside_rfc_5280(serial: int) -> None:
    # cryptography refuses to build such certificates, so the helper is fed a stand-in with that serial.
    with pytest.raises(AssertionError):
        p.check_serial(types.SimpleNamespace(serial_number=serial))  # type: ignore[arg-type]


def test_check_serial_accepts_the_largest_20_octet_serial() -> None:
    p.check_serial(types.SimpleNamespace(serial_number=2**159 - 1))  # type: ignore[arg-type]
