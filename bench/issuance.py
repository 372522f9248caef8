"""Issuance in one process: the daemon's code path against a minimal loop on ``cryptography``.

* ``ours``: key generation (``generate_private_key``) + ``Authority.issue_svid`` + PEM of the chain and
  the PKCS#8 key — exactly what the daemon does for a ``default`` SDS resource.
* ``baseline``: the same certificate profile built by the shortest loop one can write directly on
  ``cryptography`` (issuer-derived values computed once, as any hand-tuned loop would).
* ``raw_sign``: bare ECDSA P-256 signatures over a 32-byte message, the physical reference.
"""

from __future__ import annotations

import datetime as dt

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from bench.common import START, Result, best_of, fresh_authority, rate
from ca_service.pki.identity import SpiffeId
from ca_service.pki.keys import generate_private_key, key_id, private_key_to_pem
from ca_service.pki.templates import CAKind
from ca_service.services.authority import Authority

SPIFFE_ID = "spiffe://cluster.local/ns/bench/sa/workload"
PEM = serialization.Encoding.PEM


def ours_once(authority: Authority, spiffe_id: SpiffeId, now: dt.datetime) -> tuple[bytes, bytes]:
    key = generate_private_key()
    svid = authority.issue_svid(spiffe_id, key.public_key(), now=now)
    return svid.chain_pem(), private_key_to_pem(key)


def make_baseline(authority: Authority, now: dt.datetime) -> tuple[object, ...]:
    signer = authority.signer(CAKind.INTERMEDIATE)
    assert signer.key is not None
    issuer_key = signer.key
    issuer_name = signer.cert.subject
    aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key())  # type: ignore[arg-type]
    intermediate_pem = signer.cert.public_bytes(PEM)
    san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(SPIFFE_ID)])
    usage = x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                          encipher_only=False, decipher_only=False)
    eku = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
    basic = x509.BasicConstraints(ca=False, path_length=None)
    not_before, not_after = now - dt.timedelta(minutes=5), now + dt.timedelta(hours=24)
    empty = x509.Name([])

    def once() -> tuple[bytes, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        pub = key.public_key()
        cert = (
            x509.CertificateBuilder().subject_name(empty).issuer_name(issuer_name)
            .serial_number(x509.random_serial_number()).public_key(pub)
            .not_valid_before(not_before).not_valid_after(not_after)
            .add_extension(basic, critical=True).add_extension(usage, critical=True)
            .add_extension(eku, critical=False)
            .add_extension(x509.SubjectKeyIdentifier(key_id(pub)), critical=False)
            .add_extension(aki, critical=False).add_extension(san, critical=True)
            .sign(issuer_key, hashes.SHA256())  # type: ignore[arg-type]
        )
        key_pem = key.private_bytes(PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        return cert.public_bytes(PEM) + intermediate_pem, key_pem

    return (once,)


def run(quick: bool) -> Result:
    seconds, rounds = (0.3, 1) if quick else (2.0, 3)
    authority = fresh_authority()
    spiffe_id = SpiffeId.parse(SPIFFE_ID)
    now = START
    (baseline_once,) = make_baseline(authority, now)
    sign_key = ec.generate_private_key(ec.SECP256R1())
    message = b"x" * 32

    def raw_sign() -> None:
        sign_key.sign(message, ec.ECDSA(hashes.SHA256()))

    # Interleave the three so that a burst of noise hits all of them alike; keep the best round of each.
    ours = baseline = raw = 0.0
    for _ in range(rounds):
        ours = max(ours, rate(lambda: ours_once(authority, spiffe_id, now), seconds=seconds))
        baseline = max(baseline, rate(baseline_once, seconds=seconds))  # type: ignore[operator]
        raw = max(raw, best_of(1, lambda: rate(raw_sign, seconds=seconds / 2)))
    result = Result("issuance")
    result.metrics.update({"ours_ops_s": ours, "baseline_ops_s": baseline, "raw_sign_ops_s": raw,
                           "ours_over_baseline": ours / baseline, "ours_over_raw_sign": ours / raw})
    result.target("in-process issuance >= 0.9x cryptography baseline", "ours_over_baseline", ">=", 0.9)
    return result
