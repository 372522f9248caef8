"""Hostile and malformed CSRs each get INVALID_ARGUMENT, and the server keeps serving."""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from tests.rpc.istio_fixtures import IstioStack, Kube, create, csr_pem, istio_settings, new_key, start_stack

SHA256 = hashes.SHA256()
ARMOURED_GARBAGE = "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"


def _build(key: object = None, *, names: list[x509.GeneralName] | None = None,
           extra: list[tuple[x509.ExtensionType, bool]] = (), subject: list[x509.NameAttribute] = (),  # type: ignore[assignment]
           digest: hashes.HashAlgorithm | None = SHA256) -> str:
    key = key or new_key()
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(list(subject)))
    if names is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    for ext, critical in extra:
        builder = builder.add_extension(ext, critical=critical)
    return builder.sign(key, digest).public_bytes(serialization.Encoding.PEM).decode()  # type: ignore[arg-type]


def _tampered() -> str:
    der = bytearray(x509.load_pem_x509_csr(_build().encode()).public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0xFF
    return x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM).decode()


def _certificate() -> str:
    key = new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _uri(value: str) -> x509.GeneralName:
    return x509.UniformResourceIdentifier(value)


def hostile(own: str) -> dict[str, Callable[[], str]]:
    me = _uri(own)
    return {
        "an empty CSR": lambda: "",
        "text that is not PEM": lambda: "hello, CA",
        "NUL bytes": lambda: "\x00" * 64,
        "PEM armour around garbage": lambda: ARMOURED_GARBAGE,
        "bare base64 DER without armour": lambda: base64.b64encode(
            x509.load_pem_x509_csr(_build().encode()).public_bytes(serialization.Encoding.DER)).decode(),
        "a certificate instead of a CSR": _certificate,
        "a CSR of 40 KB": lambda: _build() + "A" * 40_000,
        "a CSR whose signature does not verify": _tampered,
        "a P-521 key": lambda: _build(ec.generate_private_key(ec.SECP521R1())),
        "an RSA-1024 key": lambda: _build(rsa.generate_private_key(public_exponent=65537, key_size=1024)),
        "a DSA key": lambda: _build(dsa.generate_private_key(2048)),
        "an Ed25519 key": lambda: _build(ed25519.Ed25519PrivateKey.generate(), digest=None),
        "a CA request": lambda: _build(names=[me], extra=[(x509.BasicConstraints(ca=True, path_length=None), True)]),
        "a DNS SAN": lambda: _build(names=[me, x509.DNSName("evil.example")]),
        "an IP SAN": lambda: _build(names=[me, x509.IPAddress(ipaddress.ip_address("10.0.0.1"))]),
        "an email SAN": lambda: _build(names=[x509.RFC822Name("root@example.com")]),
        "another identity's URI": lambda: _build(names=[_uri("spiffe://cluster.local/ns/istio-system/sa/istiod")]),
        "our URI twice": lambda: _build(names=[me, me]),
        "our path in another trust domain": lambda: _build(names=[_uri(own.replace("cluster.local", "evil.local"))]),
        "a non-SPIFFE URI": lambda: _build(names=[_uri("https://evil.example/")]),
        "an unknown critical extension": lambda: _build(names=[me], extra=[(x509.OCSPNoCheck(), True)]),
        "an unknown non-critical extension": lambda: _build(names=[me], extra=[(x509.OCSPNoCheck(), False)]),
        "a keyUsage with certificate signing": lambda: _build(names=[me], extra=[(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False), True)]),
        "a Common Name": lambda: _build(subject=[x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]),
    }


async def test_every_hostile_csr_gets_invalid_argument_and_the_server_stays_up(tmp_path: Path, kube: Kube) -> None:
    # One identity sends all of them: lift its rate limit, which counts before the CSR is looked at.
    istio = await start_stack(istio_settings(tmp_path, kube.cluster.kubeconfig, rate_limit_burst=1000))
    try:
        await _hostile_csrs_are_refused(istio, kube)
    finally:
        await istio.component.stop()


async def _hostile_csrs_are_refused(istio: IstioStack, kube: Kube) -> None:
    ns = kube.cluster.fresh_namespace("csr")
    workload = kube.workload(ns)
    own = f"spiffe://cluster.local{workload.path}"
    cases = hostile(own)
    assert len(cases) >= 20
    async with istio.channel() as channel:
        for case, make in cases.items():
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await create(channel, make(), token=workload.token)
            assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT, case
        chain = await create(channel, csr_pem(new_key(), own), token=workload.token)
    assert len(chain) == 3
    assert istio.metric("ca_istio_ca_requests_total", code="INVALID_ARGUMENT") == len(cases)
