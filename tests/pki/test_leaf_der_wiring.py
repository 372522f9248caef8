"""Templated leaves accepted by independent checkers (openssl -x509_strict, pkilint, py-spiffe), and the
``ca.leaf_encoder`` switch: the template is the default path, ``builder`` and uncovered inputs use the builder."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

import profiles as p
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from spiffe.svid.x509_svid import X509Svid

from ca_service.config import Settings, load_settings
from ca_service.errors import ConfigError
from ca_service.pki.certs import der_to_pem
from ca_service.pki.keys import KeyAlgorithm, generate_private_key, private_key_to_pem
from ca_service.pki.leaf_der import LeafTemplate
from ca_service.pki.templates import IssuerProfile, LeafEncoder, build_svid_for
from ca_service.services.authority import Authority
from ca_service.storage.directory import DirectoryStore
from tests.clock import FakeClock

from .conftest import NOW, WORKLOAD, cached_hierarchy
from .test_leaf_der import NOT_AFTER, NOT_BEFORE, SERIAL, profile

PEM = serialization.Encoding.PEM
BIN = Path(sys.executable).parent
# pkilint checks URIs with a web-only validator, so every spiffe:// URI is reported (see tests/test_cli.py).
PKILINT_FALSE_POSITIVE = "pkix.invalid_uri_syntax"


def _templated_chain(signer: KeyAlgorithm, leaf: KeyAlgorithm, tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    """A templated leaf under ``signer``'s hierarchy, as leaf.pem, key.pem, intermediate.pem, root.pem."""
    h = cached_hierarchy(signer)
    template = profile(signer).template
    assert template is not None
    key = generate_private_key(leaf)
    der = template.build(key.public_key(), str(WORKLOAD), serial=SERIAL, not_before=NOT_BEFORE, not_after=NOT_AFTER)
    cert = x509.load_der_x509_certificate(der)
    p.assert_is_svid(cert, h.signing, str(WORKLOAD))
    # The PEM the daemon sends (der_to_pem), not cryptography's: the checkers below read what Envoy gets.
    files = {"leaf.pem": der_to_pem(der), "key.pem": private_key_to_pem(key),
             "intermediate.pem": h.signing.public_bytes(PEM), "root.pem": h.root.public_bytes(PEM)}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return tmp_path / "leaf.pem", tmp_path / "key.pem", tmp_path / "intermediate.pem", tmp_path / "root.pem"


def _openssl_verify(leaf: Path, intermediate: Path, root: Path, purpose: str) -> subprocess.CompletedProcess[str]:
    # -attime: the hierarchy is built at NOW (2030), so verify at that instant.
    return subprocess.run(["openssl", "verify", "-x509_strict", "-purpose", purpose, "-attime",
                           str(int(NOW.timestamp())), "-CAfile", str(root), "-untrusted", str(intermediate),
                           str(leaf)], capture_output=True, text=True, check=False, timeout=30)


def _pkilint(*args: str) -> list[str]:
    proc = subprocess.run([str(BIN / args[0]), "lint", "-f", "JSON", "-s", "WARNING", *args[1:]],
                          capture_output=True, text=True, check=False, timeout=120)
    assert proc.stdout.strip(), f"pkilint produced no report: {proc.stderr}"
    return [f["code"] for r in json.loads(proc.stdout)["results"] for f in r["finding_descriptions"]
            if f["code"] != PKILINT_FALSE_POSITIVE]


CHAINS = [(KeyAlgorithm.EC_P256, KeyAlgorithm.EC_P256), (KeyAlgorithm.EC_P384, KeyAlgorithm.EC_P256),
          (KeyAlgorithm.RSA_2048, KeyAlgorithm.EC_P256), (KeyAlgorithm.RSA_3072, KeyAlgorithm.RSA_2048),
          (KeyAlgorithm.EC_P256, KeyAlgorithm.RSA_2048)]


@pytest.mark.parametrize(("signer", "leaf"), CHAINS, ids=lambda a: a.value)
def test_independent_checkers_accept_a_templated_leaf(signer: KeyAlgorithm, leaf: KeyAlgorithm,
                                                      tmp_path: Path) -> None:
    leaf_pem, key_pem, intermediate, root = _templated_chain(signer, leaf, tmp_path)
    for purpose in ("sslclient", "sslserver"):
        proc = _openssl_verify(leaf_pem, intermediate, root, purpose)
        assert proc.returncode == 0 and proc.stdout.strip().endswith(": OK"), proc.stdout + proc.stderr
    assert _pkilint("lint_pkix_cert", str(leaf_pem)) == []
    assert _pkilint("lint_pkix_signer_signee_cert_chain", str(intermediate), str(leaf_pem)) == []
    svid = X509Svid.parse(leaf_pem.read_bytes() + intermediate.read_bytes(), key_pem.read_bytes())
    assert str(svid.spiffe_id) == str(WORKLOAD)


def test_openssl_rejects_a_templated_leaf_whose_signature_is_altered(tmp_path: Path) -> None:
    leaf_pem, _, intermediate, root = _templated_chain(KeyAlgorithm.RSA_2048, KeyAlgorithm.EC_P256, tmp_path)
    der = bytearray(x509.load_pem_x509_certificate(leaf_pem.read_bytes()).public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01  # the last octet of an RSA signature
    leaf_pem.write_bytes(x509.load_der_x509_certificate(bytes(der)).public_bytes(PEM))
    assert _openssl_verify(leaf_pem, intermediate, root, "sslclient").returncode != 0


# ---------------------------------------------------------------- the switch


def _count_template_builds(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    original = LeafTemplate.build

    def counting(self: LeafTemplate, *args: object, **kwargs: object) -> x509.Certificate:
        calls.append(1)
        return original(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(LeafTemplate, "build", counting)
    return calls


def _issue(issuer: IssuerProfile, **kwargs: object) -> x509.Certificate:
    key = generate_private_key().public_key()
    return build_svid_for(key, WORKLOAD, issuer, now=NOW, ttl=dt.timedelta(hours=1), **kwargs)  # type: ignore[arg-type]


def test_the_template_is_the_default_leaf_encoder(monkeypatch: pytest.MonkeyPatch) -> None:
    issuer = profile(KeyAlgorithm.EC_P256)  # building the cached hierarchy issues a leaf too
    calls = _count_template_builds(monkeypatch)
    leaf = _issue(issuer)
    assert calls == [1]
    p.assert_is_svid(leaf, cached_hierarchy(KeyAlgorithm.EC_P256).signing, str(WORKLOAD))
    assert load_settings(environ={}).ca.leaf_encoder is LeafEncoder.TEMPLATE


def test_the_builder_encoder_never_uses_the_template(monkeypatch: pytest.MonkeyPatch) -> None:
    issuer = profile(KeyAlgorithm.EC_P256)
    calls = _count_template_builds(monkeypatch)
    leaf = _issue(issuer, encoder=LeafEncoder.BUILDER)
    assert calls == []
    p.assert_is_svid(leaf, cached_hierarchy(KeyAlgorithm.EC_P256).signing, str(WORKLOAD))


def test_a_signer_without_a_template_falls_back_to_the_builder() -> None:
    issuer = dataclasses.replace(profile(KeyAlgorithm.EC_P256), template=None)
    p.assert_is_svid(_issue(issuer), cached_hierarchy(KeyAlgorithm.EC_P256).signing, str(WORKLOAD))


def test_an_expired_signer_is_refused_by_the_builder_on_the_template_path() -> None:
    # notAfter clamps to the issuer's, before notBefore: the template hands it back and the builder refuses.
    issuer = profile(KeyAlgorithm.EC_P256)
    with pytest.raises(ValueError, match="not valid after"):
        build_svid_for(generate_private_key().public_key(), WORKLOAD, issuer, now=issuer.not_after + dt.timedelta(
            days=1), ttl=dt.timedelta(hours=1))


def test_the_leaf_encoder_is_read_from_the_config_and_checked(tmp_path: Path) -> None:
    config = tmp_path / "ca.yaml"
    config.write_text("ca: {leaf_encoder: builder}\n")
    assert load_settings(config, environ={}).ca.leaf_encoder is LeafEncoder.BUILDER
    config.write_text("ca: {leaf_encoder: fast}\n")
    with pytest.raises(ConfigError, match="leaf_encoder"):
        load_settings(config, environ={})


@pytest.mark.parametrize(("encoder", "template_calls"), [(LeafEncoder.TEMPLATE, 1), (LeafEncoder.BUILDER, 0)])
def test_the_authority_issues_through_the_configured_encoder(
    encoder: LeafEncoder, template_calls: int, settings: Settings, clock: FakeClock, monkeypatch: pytest.MonkeyPatch,
) -> None:
    ca = dataclasses.replace(settings.ca, leaf_encoder=encoder)
    authority = Authority(DirectoryStore(settings.data_dir / "state"), settings.domain, ca, clock)
    authority.load_or_bootstrap()
    calls = _count_template_builds(monkeypatch)
    svid = authority.issue_svid(WORKLOAD, generate_private_key().public_key())
    assert len(calls) == template_calls
    p.assert_is_svid(svid.chain[0], svid.chain[1], str(WORKLOAD))
