"""The CSR path's two byte-level shortcuts give the verdicts of the parsers they skip.

``parse_csr`` decodes a plainly written PEM block itself instead of ``cryptography``'s PEM parser, and
``accept_csr`` recognises "exactly one subjectAltName holding exactly the entitled URI" from the bytes of
the request's attributes instead of parsing its extensions.  Each must accept only what the full path
accepts, with the same result, and must actually be taken for what istio-agent sends.
"""

from __future__ import annotations

import binascii
from collections.abc import Callable

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import AttributeOID, ExtendedKeyUsageOID, NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from ca_service.errors import InvalidRequestError
from ca_service.pki import csr as csr_module
from ca_service.pki.csr import accept_csr, canonical_spki, check_csr, parse_csr
from ca_service.pki.identity import SpiffeId
from ca_service.pki.leaf_der import tlv

from .conftest import WORKLOAD

KEY = ec.generate_private_key(ec.SECP256R1())
URI = x509.UniformResourceIdentifier(str(WORKLOAD))


def _csr(*, san: list[x509.GeneralName] | None = None, critical: bool = True,
         subject: list[x509.NameAttribute] | None = None, extra: x509.ExtensionType | None = None,
         password: bytes | None = None) -> x509.CertificateSigningRequest:
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(subject or []))
    if san is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=critical)
    if extra is not None:
        builder = builder.add_extension(extra, critical=False)
    if password is not None:
        builder = builder.add_attribute(AttributeOID.CHALLENGE_PASSWORD, password)
    return builder.sign(KEY, hashes.SHA256())


# ---------------------------------------------------------------- extensions read from bytes

VARIANTS: dict[str, Callable[[], x509.CertificateSigningRequest]] = {
    "the entitled URI, critical (istio-agent)": lambda: _csr(san=[URI]),
    "the entitled URI, not critical": lambda: _csr(san=[URI], critical=False),
    "no SAN": lambda: _csr(),
    "another URI": lambda: _csr(san=[x509.UniformResourceIdentifier("spiffe://cluster.local/ns/a/sa/b")]),
    "the URI twice": lambda: _csr(san=[URI, URI]),
    "the URI and a DNS name": lambda: _csr(san=[URI, x509.DNSName("evil.example")]),
    "the URI and another extension": lambda: _csr(
        san=[URI], extra=x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING])),
    "the URI and CA:FALSE": lambda: _csr(san=[URI], extra=x509.BasicConstraints(ca=False, path_length=None)),
    "the URI and CA:TRUE": lambda: _csr(san=[URI], extra=x509.BasicConstraints(ca=True, path_length=None)),
    "the URI and a challengePassword": lambda: _csr(san=[URI], password=b"secret"),
    "the URI, an Organization": lambda: _csr(san=[URI], subject=[x509.NameAttribute(NameOID.ORGANIZATION_NAME, "o")]),
    "the URI, a CN": lambda: _csr(san=[URI], subject=[x509.NameAttribute(NameOID.COMMON_NAME, "admin")]),
}
SHORTCUT_TAKEN = {"the entitled URI, critical (istio-agent)", "the entitled URI, not critical",
                  "the URI, an Organization", "the URI, a CN"}


def _verdict(csr: x509.CertificateSigningRequest, entitled: SpiffeId) -> object:
    try:
        accepted = accept_csr(csr, entitled)
    except Exception as exc:  # the verdict is the rule that refused it
        return type(exc).__name__, getattr(exc, "rule", None)
    return accepted.public_key.public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo), accepted.spki


def _shortcut_taken(csr: x509.CertificateSigningRequest, entitled: SpiffeId) -> bool:
    info = csr.tbs_certrequest_bytes
    _, end, _ = csr_module._spki_bounds(info)
    return csr_module._requests_only(info, end, str(entitled))


@pytest.mark.parametrize("case", list(VARIANTS))
def test_reading_the_attributes_from_bytes_gives_the_full_checks_verdict(
        case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    csr = VARIANTS[case]()
    other = SpiffeId.parse("spiffe://cluster.local/ns/other/sa/x")
    fast = [_verdict(csr, entitled) for entitled in (WORKLOAD, other)]
    assert _shortcut_taken(csr, WORKLOAD) is (case in SHORTCUT_TAKEN)
    assert not _shortcut_taken(csr, other)
    monkeypatch.setattr(csr_module, "_requests_only", lambda *_: False)
    assert fast == [_verdict(csr, entitled) for entitled in (WORKLOAD, other)]


_ENTITLED_URI = tlv(0x86, str(WORKLOAD).encode())
_NAMES = {"entitled": _ENTITLED_URI, "entitled-upper": tlv(0x86, str(WORKLOAD).upper().encode()),
          "entitled-longer": tlv(0x86, str(WORKLOAD).encode() + b"x"),
          "other": tlv(0x86, b"spiffe://cluster.local/ns/a/sa/b"), "dns": tlv(0x82, b"evil.example")}
_CRITICAL = {"omitted": b"", "true": bytes.fromhex("0101ff")}
_SAN_OID, _BASIC_CA_FALSE = bytes.fromhex("0603551d11"), bytes.fromhex("300c0603551d13040530030101ff")
_EXTENSION_REQUEST = bytes.fromhex("06092a864886f70d01090e")
_CHALLENGE_PASSWORD = bytes.fromhex("06092a864886f70d010907") + tlv(0x31, tlv(0x0C, b"pw"))
_SPKI = KEY.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _signed_request(attributes: bytes) -> x509.CertificateSigningRequest:
    """A CSR (version 0, empty subject, KEY) with exactly these attribute bytes, signed by KEY."""
    info = tlv(0x30, bytes.fromhex("020100" "3000") + _SPKI + tlv(0xA0, attributes))
    signature = KEY.sign(info, ec.ECDSA(hashes.SHA256()))
    algorithm = bytes.fromhex("300a06082a8648ce3d040302")
    return x509.load_der_x509_csr(tlv(0x30, info + algorithm + tlv(0x03, b"\x00" + signature)))


@settings(max_examples=200, deadline=None)
@given(names=st.lists(st.sampled_from(list(_NAMES)), min_size=1, max_size=2),
       critical=st.sampled_from(list(_CRITICAL)), basic=st.sampled_from(["none", "before", "after"]),
       copies=st.integers(1, 2), password=st.booleans())
def test_the_bytes_shortcut_is_taken_exactly_for_the_entitled_san_alone(
        names: list[str], critical: str, basic: str, copies: int, password: bool) -> None:
    # Requests built attribute by attribute around what istio-agent sends: the shortcut must be taken for
    # that alone, and whatever it takes must pass the full extension checks as one SAN of the entitled URI.
    san = tlv(0x30, _SAN_OID + _CRITICAL[critical] + tlv(0x04, tlv(0x30, b"".join(_NAMES[n] for n in names))))
    extensions = {"none": san, "before": _BASIC_CA_FALSE + san, "after": san + _BASIC_CA_FALSE}[basic]
    request = tlv(0x30, _EXTENSION_REQUEST + tlv(0x31, tlv(0x30, extensions) * copies))
    # DER orders a SET OF by its elements' encodings.
    csr = _signed_request(b"".join(sorted([request, *([tlv(0x30, _CHALLENGE_PASSWORD)] if password else [])])))
    taken = _shortcut_taken(csr, WORKLOAD)
    assert taken is (names == ["entitled"] and basic == "none" and copies == 1 and not password)
    if taken:
        for ext in csr.extensions:  # the walk the shortcut replaces: raises for anything not allowed
            csr_module._check_extension(ext, WORKLOAD)
        assert [e.value for e in csr.extensions] == [x509.SubjectAlternativeName([URI])]
        assert accept_csr(csr, WORKLOAD).spki == _SPKI


def test_the_shortcut_refuses_a_uri_that_is_not_ascii() -> None:
    info = _signed_request(b"").tbs_certrequest_bytes
    assert not csr_module._requests_only(info, len(info), "spiffe://cluster.local/ns/é/sa/x")


def test_accept_csr_is_check_csr_and_canonical_spki_in_one() -> None:
    csr = _csr(san=[URI])
    accepted = accept_csr(csr, WORKLOAD)
    assert accepted.spki == canonical_spki(csr) is not None
    assert accepted.public_key.public_numbers() == check_csr(csr, WORKLOAD).public_numbers()  # type: ignore[union-attr]


# ---------------------------------------------------------------- PEM decoded without the pattern search

def _outcome(parse: Callable[[], x509.CertificateSigningRequest]) -> bytes | str:
    try:
        return parse().public_bytes(serialization.Encoding.DER)
    except (ValueError, x509.InvalidVersion, InvalidRequestError):
        return "refused"


PEM = _csr(san=[URI]).public_bytes(serialization.Encoding.PEM)
BODY = b"".join(PEM.splitlines()[1:-1])


def _wrapped(width: int, newline: bytes = b"\n", final: bytes = b"\n", body: bytes = BODY) -> bytes:
    lines = [body[i:i + width] for i in range(0, len(body), width)]
    return newline.join([b"-----BEGIN CERTIFICATE REQUEST-----", *lines,
                         b"-----END CERTIFICATE REQUEST-----"]) + final


def _mutated(data: bytes, where: int, byte: int, mode: int) -> bytes:
    where %= len(data)
    if mode == 0:
        return data[:where] + bytes((byte,)) + data[where + 1:]
    if mode == 1:
        return data[:where] + bytes((byte,)) + data[where:]
    return data[:where] + data[where + 1:]


@settings(max_examples=300, deadline=None)
@given(width=st.integers(1, 100), crlf=st.booleans(), final=st.sampled_from([b"", b"\n", b"\n\n", b" "]),
       where=st.integers(0, 2000), byte=st.sampled_from(b"\n\r \t=-+/AQgw0a:"), mode=st.integers(0, 3))
def test_whatever_the_pem_shortcut_decodes_the_pem_parser_decodes_the_same(
        width: int, crlf: bool, final: bytes, where: int, byte: int, mode: int) -> None:
    data = _wrapped(width, b"\r\n" if crlf else b"\n", final)
    if mode < 3:
        data = _mutated(data, where, byte, mode)
    der = csr_module._plain_pem_der(data)
    if der is not None:
        assert _outcome(lambda: x509.load_der_x509_csr(der)) == _outcome(lambda: x509.load_pem_x509_csr(data))
    assert _outcome(lambda: parse_csr(data)) == _outcome(lambda: x509.load_pem_x509_csr(data))


def test_the_pem_shortcut_is_taken_for_plain_blocks_of_any_line_width() -> None:
    for width in (64, 76, 40, len(BODY)):
        data = _wrapped(width)
        assert csr_module._plain_pem_der(data) == x509.load_pem_x509_csr(data).public_bytes(
            serialization.Encoding.DER)
    assert csr_module._plain_pem_der(PEM.rstrip(b"\n")) is not None


@pytest.mark.parametrize("data", [
    PEM.replace(b"\n", b"\r\n"),
    b"text before\n" + PEM,
    PEM + b"trailing text",
    PEM.replace(b"CERTIFICATE REQUEST", b"NEW CERTIFICATE REQUEST"),
    PEM + PEM,
], ids=["crlf", "leading-text", "trailing-text", "new-label", "two-blocks"])
def test_anything_but_a_plain_block_goes_to_the_pem_parser(data: bytes) -> None:
    assert csr_module._plain_pem_der(data) is None
    assert _outcome(lambda: parse_csr(data)) == _outcome(lambda: x509.load_pem_x509_csr(data))


def test_base64_with_stray_bits_after_its_data_is_left_to_the_pem_parser() -> None:
    # The last character before '=' padding carries unused low bits; binascii's strict mode ignores them.
    # (ECDSA signatures vary in length: draw CSRs until the DER is not a multiple of 3 bytes.)
    full = next(b for b in (binascii.b2a_base64(_csr(san=[URI]).public_bytes(serialization.Encoding.DER),
                                                newline=False) for _ in range(50)) if b.endswith(b"="))
    body = full.rstrip(b"=")
    pad = full[len(body):]
    last = body[-1:]
    alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    stray = bytes((alphabet[alphabet.index(last) ^ 1],))
    data = _wrapped(64, body=body[:-1] + stray + pad)
    assert binascii.a2b_base64(body[:-1] + stray + pad, strict_mode=True) == binascii.a2b_base64(full)
    assert csr_module._plain_pem_der(data) is None
    assert csr_module._plain_pem_der(_wrapped(64, body=full)) is not None
