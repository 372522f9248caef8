"""Certificate templates: root, signing intermediate, istiod plug-in intermediate, workload X509-SVID.

Every profile follows the SPIFFE X509-SVID spec and RFC 5280 as DESIGN.md "Trust model" lists them.
Pure functions: the caller passes ``now``; nothing here reads a clock or does I/O.
"""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ca_service.pki.identity import SpiffeId, TrustDomain
from ca_service.pki.keys import PrivateKey, PublicKey, key_id, signature_hash
from ca_service.pki.leaf_der import LeafTemplate, TemplateNotApplicable

# Backdating notBefore absorbs clock skew between us and the relying party; Istio and SPIRE both
# backdate by a few minutes for the same reason.
DEFAULT_BACKDATE = dt.timedelta(minutes=5)
ORGANIZATION = "ca-service"


class LeafEncoder(enum.StrEnum):
    """How a workload leaf is encoded (``ca.leaf_encoder``); both give the same DER bytes."""

    TEMPLATE = "template"  # per-signer pre-encoded DER (pki/leaf_der.py): the fast path
    BUILDER = "builder"  # cryptography's CertificateBuilder: the reference path


class CAKind(enum.StrEnum):
    """What a CA certificate is for; also the ``kind`` label of the expiry metrics."""

    ROOT = "root"
    INTERMEDIATE = "intermediate"
    ISTIOD_INTERMEDIATE = "istiod_intermediate"


def _require_aware(now: dt.datetime) -> None:
    if now.tzinfo is None:
        raise ValueError("now must be an aware datetime (UTC)")


def _ca_subject(kind: CAKind, trust_domain: TrustDomain, serial: int) -> x509.Name:
    # The serial in the CN keeps names of A and B distinct during a rotation, so tools that index
    # by subject (openssl -CApath, istiod logs) never confuse the two generations.
    titles = {
        CAKind.ROOT: "root CA",
        CAKind.INTERMEDIATE: "signing CA",
        CAKind.ISTIOD_INTERMEDIATE: "istiod CA",
    }
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, trust_domain.name),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{titles[kind]} {format(serial, 'x')[:12]}"),
        ]
    )


def _ca_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=False, content_commitment=False, key_encipherment=False, data_encipherment=False,
        key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
    )


def _clamp(
    not_before: dt.datetime, not_after: dt.datetime, issuer: x509.Certificate
) -> tuple[dt.datetime, dt.datetime]:
    """A certificate never outlives its issuer, nor starts before it (RFC 5280 path validity)."""
    return max(not_before, issuer.not_valid_before_utc), min(not_after, issuer.not_valid_after_utc)


def build_root(
    key: PrivateKey, trust_domain: TrustDomain, *, now: dt.datetime, ttl: dt.timedelta,
    backdate: dt.timedelta = DEFAULT_BACKDATE,
) -> x509.Certificate:
    """Self-signed root: CA:TRUE (critical), keyCertSign+cRLSign (critical), SKI=AKI, no EKU."""
    _require_aware(now)
    serial = x509.random_serial_number()
    name = _ca_subject(CAKind.ROOT, trust_domain, serial)
    ski = x509.SubjectKeyIdentifier(key_id(key.public_key()))
    builder = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).serial_number(serial).public_key(key.public_key())
        .not_valid_before(now - backdate).not_valid_after(now + ttl)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_ca_usage(), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(trust_domain.id))]),
                       critical=False)
    )
    return builder.sign(key, signature_hash(key))


def build_intermediate(
    public_key: PublicKey, trust_domain: TrustDomain, *, issuer: x509.Certificate, issuer_key: PrivateKey,
    now: dt.datetime, ttl: dt.timedelta, kind: CAKind = CAKind.INTERMEDIATE,
    backdate: dt.timedelta = DEFAULT_BACKDATE,
) -> x509.Certificate:
    """Intermediate CA signed by ``issuer``: CA:TRUE pathlen 0, keyCertSign+cRLSign, no EKU.

    ``pathlen:0`` because both the SDS signer and istiod sign leaves only; a stolen intermediate key
    then cannot mint further CAs.  The URI SAN names the trust domain, as SPIRE's intermediates do.
    """
    _require_aware(now)
    if kind is CAKind.ROOT:
        raise ValueError("build_intermediate cannot build a root; use build_root")
    serial = x509.random_serial_number()
    not_before, not_after = _clamp(now - backdate, now + ttl, issuer)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_ca_subject(kind, trust_domain, serial)).issuer_name(issuer.subject)
        .serial_number(serial).public_key(public_key)
        .not_valid_before(not_before).not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_ca_usage(), critical=True)
        .add_extension(x509.SubjectKeyIdentifier(key_id(public_key)), critical=False)
        .add_extension(_aki(issuer), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(trust_domain.id))]),
                       critical=False)
    )
    return builder.sign(issuer_key, signature_hash(issuer_key))


def _aki(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


@dataclass(frozen=True)
class IssuerProfile:
    """What every leaf signed by one issuer repeats: its name, AKI, validity window, key and digest.

    Computed once per signer (not per leaf): parsing the issuer's name and extensions for every leaf
    cost about 10% of an issuance.
    """

    name: x509.Name
    aki: x509.AuthorityKeyIdentifier
    not_before: dt.datetime
    not_after: dt.datetime
    key: PrivateKey
    digest: hashes.SHA256 | hashes.SHA384
    # None when the signer's key has no template (then every leaf goes through the builder).
    template: LeafTemplate | None = None

    @classmethod
    def of(cls, issuer: x509.Certificate, issuer_key: PrivateKey) -> IssuerProfile:
        name, aki, digest = issuer.subject, _aki(issuer), signature_hash(issuer_key)
        try:
            template: LeafTemplate | None = LeafTemplate.for_signer(name, aki, issuer_key, digest, _LEAF_EXTENSIONS)
        except TemplateNotApplicable:
            template = None
        return cls(name, aki, issuer.not_valid_before_utc, issuer.not_valid_after_utc, issuer_key, digest,
                   template)


def _leaf_usage(is_rsa: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=is_rsa, data_encipherment=False,
        key_agreement=False, key_cert_sign=False, crl_sign=False, encipher_only=False, decipher_only=False,
    )


# Extension values are immutable; building them once saves their validation on every leaf.
_LEAF_USAGE = {False: _leaf_usage(False), True: _leaf_usage(True)}
_LEAF_EKU = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
_LEAF_BASIC = x509.BasicConstraints(ca=False, path_length=None)
_EMPTY_NAME = x509.Name([])
# The constant leaf extensions (value, critical) in order, per "leaf key is RSA": the builder adds
# them and the DER template pre-encodes them from this one table.
_LEAF_EXTENSIONS: dict[bool, tuple[tuple[x509.ExtensionType, bool], ...]] = {
    is_rsa: ((_LEAF_BASIC, True), (_LEAF_USAGE[is_rsa], True), (_LEAF_EKU, False)) for is_rsa in (False, True)}


def build_svid(
    public_key: PublicKey, spiffe_id: SpiffeId, *, issuer: x509.Certificate, issuer_key: PrivateKey,
    now: dt.datetime, ttl: dt.timedelta, backdate: dt.timedelta = DEFAULT_BACKDATE,
) -> x509.Certificate:
    """Workload X509-SVID signed by ``issuer``; see :func:`build_svid_for`."""
    return build_svid_for(public_key, spiffe_id, IssuerProfile.of(issuer, issuer_key), now=now, ttl=ttl,
                          backdate=backdate)


def build_svid_for(
    public_key: PublicKey, spiffe_id: SpiffeId, issuer: IssuerProfile, *, now: dt.datetime, ttl: dt.timedelta,
    backdate: dt.timedelta = DEFAULT_BACKDATE, encoder: LeafEncoder = LeafEncoder.TEMPLATE,
    dns_names: Sequence[str] = (),
) -> x509.Certificate:
    """Workload X509-SVID with a fresh serial and the validity :func:`leaf_validity` gives; see
    :func:`build_svid_der_for`."""
    not_before, not_after = leaf_validity(issuer, now=now, ttl=ttl, backdate=backdate)
    return x509.load_der_x509_certificate(build_svid_der_for(
        public_key, spiffe_id, issuer, serial=x509.random_serial_number(), not_before=not_before,
        not_after=not_after, encoder=encoder, dns_names=dns_names))


def leaf_validity(issuer: IssuerProfile, *, now: dt.datetime, ttl: dt.timedelta,
                  backdate: dt.timedelta = DEFAULT_BACKDATE) -> tuple[dt.datetime, dt.datetime]:
    """A leaf's (notBefore, notAfter): ``now - backdate`` to ``now + ttl``, clamped to the issuer's own
    validity, in whole seconds and UTC, so exactly what a parser reads back from the leaf.

    The issuer keeps these next to the leaf it signed (``IssuedSvid.not_after``) instead of parsing them
    back out of the DER, and a signing storm computes them once for every leaf of the batch.
    """
    _require_aware(now)
    # DER times have whole seconds; both encoders drop the fraction, as this does.  Dropping it is a floor,
    # which commutes with max/min and with adding whole seconds: with whole-second durations, flooring
    # ``now`` first gives the same times for half the datetime objects (the CSR path's 1%).  _whole floors
    # the issuer's bounds too, should one carry a fraction.
    base = now if ttl.microseconds or backdate.microseconds else _whole(now)
    return _whole(max(base - backdate, issuer.not_before)), _whole(min(base + ttl, issuer.not_after))


def _whole(when: dt.datetime) -> dt.datetime:
    """``when`` in UTC without its fraction of a second."""
    if when.tzinfo is dt.UTC and not when.microsecond:
        return when
    return when.astimezone(dt.UTC).replace(microsecond=0)


def build_svid_der_for(
    public_key: PublicKey, spiffe_id: SpiffeId, issuer: IssuerProfile, *, serial: int, not_before: dt.datetime,
    not_after: dt.datetime, encoder: LeafEncoder = LeafEncoder.TEMPLATE, dns_names: Sequence[str] = (),
    spki: bytes | None = None,
) -> bytes:
    """Workload X509-SVID as Certificate DER (``dns_names``: extra DNS SANs of a serving certificate; the
    SPIFFE spec allows other SAN types next to the one URI SAN).

    Empty subject with exactly one URI SAN (marked critical because the subject is empty, RFC 5280
    4.2.1.6), CA:FALSE, keyUsage digitalSignature (+keyEncipherment for RSA keys, which TLS 1.2 RSA key
    transport needs), EKU serverAuth+clientAuth, SKI/AKI.  ``serial`` and the validity are the caller's
    (the issuer's: x509.random_serial_number draws the serial, :func:`leaf_validity` gives the validity,
    clamped to the issuer's, in whole seconds and UTC, so that what the caller keeps equals what is encoded).
    ``encoder`` picks the DER template or the builder; both give the same bytes, and whatever the
    template does not cover (see :meth:`LeafTemplate.tbs`) goes to the builder, which then decides.
    DER, not a loaded certificate: the caller PEM-encodes it for the wire, and ``Certificate.public_bytes``
    would encode it all over again.  ``spki``: the key's SubjectPublicKeyInfo as OpenSSL writes it, if the
    caller holds it (see :meth:`LeafTemplate.tbs`; the builder encodes the key itself).
    """
    if not spiffe_id.path:
        raise ValueError(f"{spiffe_id} names a trust domain, not a workload")
    # The template encodes the workload profile (one URI SAN); serving certificates with DNS SANs are rare
    # (one per listener per half-life) and take the builder.
    if encoder is LeafEncoder.TEMPLATE and issuer.template is not None and not dns_names:
        try:
            return issuer.template.build(public_key, str(spiffe_id), serial=serial, not_before=not_before,
                                         not_after=not_after, spki=spki)
        except TemplateNotApplicable:
            pass
    return build_leaf_with_builder(public_key, str(spiffe_id), issuer, serial=serial, not_before=not_before,
                                   not_after=not_after, dns_names=dns_names).public_bytes(serialization.Encoding.DER)


def build_leaf_with_builder(
    public_key: PublicKey, uri: str, issuer: IssuerProfile, *, serial: int, not_before: dt.datetime,
    not_after: dt.datetime, dns_names: Sequence[str] = (),
) -> x509.Certificate:
    """The reference encoding of a workload leaf, on ``cryptography``'s CertificateBuilder."""
    is_rsa = not hasattr(public_key, "curve")
    builder = (
        x509.CertificateBuilder()
        .subject_name(_EMPTY_NAME).issuer_name(issuer.name)
        .serial_number(serial).public_key(public_key)
        .not_valid_before(not_before).not_valid_after(not_after)
    )
    for extension, critical in _LEAF_EXTENSIONS[is_rsa]:
        builder = builder.add_extension(extension, critical=critical)
    builder = (
        builder
        .add_extension(x509.SubjectKeyIdentifier(key_id(public_key)), critical=False)
        .add_extension(issuer.aki, critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri),
                                                     *(x509.DNSName(name) for name in dns_names)]), critical=True)
    )
    return builder.sign(issuer.key, issuer.digest)
