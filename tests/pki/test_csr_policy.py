"""The Istio CA API's CSR rules: each refusal names its rule; TTLs are resolved as istiod does."""

from __future__ import annotations

import datetime as dt
import ipaddress

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa

from ca_service.pki.csr import CsrKeyType, CSRRejectedError, InvalidCSRError, check_csr, parse_csr, resolve_ttl
from ca_service.pki.keys import generate_private_key

from .conftest import WORKLOAD

DAY = dt.timedelta(days=1)


def _csr(names: list[x509.GeneralName], *, critical_extra: bool = False) -> x509.CertificateSigningRequest:
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    if critical_extra:
        builder = builder.add_extension(x509.OCSPNoCheck(), critical=True)
    return builder.sign(generate_private_key(), hashes.SHA256())


URI = x509.UniformResourceIdentifier(str(WORKLOAD))


@pytest.mark.parametrize(("names", "rule"), [
    ([URI, x509.DNSName("evil.example")], "san-dns"),
    ([URI, x509.IPAddress(ipaddress.ip_address("10.0.0.1"))], "san-ip"),
    ([x509.RFC822Name("a@b.example"), URI], "san-email"),
    ([x509.UniformResourceIdentifier("spiffe://cluster.local/ns/kube-system/sa/admin")], "san-uri"),
    ([URI, URI], "san-uri"),
    ([URI, x509.RegisteredID(x509.ObjectIdentifier("1.2.3.4"))], "san-other"),
])
def test_a_csr_naming_anything_but_the_caller_is_refused_by_the_rule_it_breaks(
        names: list[x509.GeneralName], rule: str) -> None:
    with pytest.raises(CSRRejectedError) as caught:
        check_csr(_csr(names), WORKLOAD)
    assert caught.value.rule == rule
    assert f"rule: {rule}" in str(caught.value)


def test_an_unknown_critical_extension_is_refused_by_its_own_rule() -> None:
    with pytest.raises(CSRRejectedError) as caught:
        check_csr(_csr([URI], critical_extra=True), WORKLOAD)
    assert caught.value.rule == "critical-extension"


def test_rsa_4096_is_accepted_by_default_but_not_when_the_allow_list_leaves_it_out() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=4096)
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, hashes.SHA256())
    check_csr(csr, WORKLOAD)
    with pytest.raises(CSRRejectedError) as caught:
        check_csr(csr, WORKLOAD, allowed_algorithms={CsrKeyType.EC_P256})
    assert caught.value.rule == "key-type"


def test_an_oversized_or_garbage_csr_is_invalid_before_parsing() -> None:
    with pytest.raises(InvalidCSRError) as big:
        parse_csr("A" * 40_000)
    assert big.value.rule == "csr-size"
    with pytest.raises(InvalidCSRError) as garbage:
        parse_csr("-----BEGIN CERTIFICATE REQUEST-----\nnot base64\n-----END CERTIFICATE REQUEST-----\n")
    assert garbage.value.rule == "csr-syntax"


@pytest.mark.parametrize(("requested", "expected"), [(0, DAY), (-5, DAY), (3600, dt.timedelta(hours=1)),
                                                     (2 * 86400, 2 * DAY)])
def test_a_requested_validity_up_to_the_maximum_is_granted_and_zero_or_less_means_the_default(
        requested: int, expected: dt.timedelta) -> None:
    assert resolve_ttl(requested, default=DAY, maximum=2 * DAY) == expected


@pytest.mark.parametrize("requested", [2 * 86400 + 1, 2**63 - 1])
def test_a_requested_validity_above_the_maximum_is_refused_not_capped(requested: int) -> None:
    with pytest.raises(InvalidCSRError) as caught:
        resolve_ttl(requested, default=DAY, maximum=2 * DAY)
    assert caught.value.rule == "ttl"
