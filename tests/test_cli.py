"""The real console (``python -m ca_service``) in temporary directories, checked by independent tools:
openssl, py-spiffe and pkilint."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import profiles as p
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from spiffe.svid.errors import InvalidLeafCertificateError
from spiffe.svid.x509_svid import X509Svid

from ca_service.pki.bundle import parse_jwks
from ca_service.pki.cacerts import CACERTS_FILES, check_cacerts
from ca_service.pki.certs import load_certs
from ca_service.pki.identity import TrustDomain
from ca_service.pki.keys import load_private_key, private_key_to_pem
from tests.processes import read_until

REPO = Path(__file__).resolve().parents[1]
ID = "spiffe://cluster.local/ns/default/sa/web"
BIN = Path(sys.executable).parent


def run(data: Path, *args: str, env: dict[str, str] | None = None, check: bool = True,
        cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    full_env.pop("CA_SERVICE_CONFIG", None)
    proc = subprocess.run([sys.executable, "-m", "ca_service", "--data-dir", str(data), *args], capture_output=True,
                          text=True, env=full_env, timeout=60, cwd=cwd or data.parent)
    if check:
        assert proc.returncode == 0, f"ca-service {' '.join(args)} failed ({proc.returncode}): {proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("cli") / "data"
    run(data, "init")
    return data


@pytest.fixture(scope="module")
def issued(ca: Path) -> Path:
    out = ca.parent / "svid"
    run(ca, "issue", "--spiffe-id", ID, "--out", str(out), "--ttl", "1h")
    return out


def test_init_creates_and_a_second_init_leaves_the_ca_unchanged(tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = json.loads(run(data, "init", "--json").stdout)
    second = json.loads(run(data, "--json", "init").stdout)
    assert (first["created"], second["created"]) == (True, False)
    assert [c["serial"] for c in first["certificates"]] == [c["serial"] for c in second["certificates"]]
    assert stat.S_IMODE((data / "state").stat().st_mode) == 0o700
    assert stat.S_IMODE((data / "state" / "authority.json").stat().st_mode) == 0o600


def test_status_text_shows_every_certificate_with_time_left(ca: Path) -> None:
    out = run(ca, "status").stdout
    assert "trust domain  cluster.local" in out
    assert "held by ca-service" in out
    for kind in ("root", "intermediate", "istiod_intermediate"):
        assert f"\n{kind} " in out
    assert "29d 23h" in out  # the 30-day signing intermediate, just created


def test_status_json_is_machine_readable(ca: Path) -> None:
    report = json.loads(run(ca, "status", "--json").stdout)
    assert report["mode"] == "self-signed"
    rows = {c["kind"]: c for c in report["certificates"]}
    assert set(rows) == {"root", "intermediate", "istiod_intermediate"}
    for row in rows.values():
        assert {"subject", "serial", "key_id", "not_before", "not_after", "time_left", "state"} <= set(row)
        assert row["state"] == "active"
    assert 29 * 86400 < rows["intermediate"]["time_left_seconds"] <= 30 * 86400


def test_issue_writes_the_three_files_with_a_private_key_file(issued: Path) -> None:
    assert sorted(x.name for x in issued.iterdir()) == ["bundle.pem", "svid-key.pem", "svid.pem"]
    assert stat.S_IMODE((issued / "svid-key.pem").stat().st_mode) == 0o600
    chain = load_certs((issued / "svid.pem").read_bytes())
    assert len(chain) == 2, "svid.pem must hold leaf + intermediate"
    (root,) = load_certs((issued / "bundle.pem").read_bytes())
    p.assert_is_svid(chain[0], chain[1], ID)
    p.assert_is_ca(chain[1], root, path_length=0)
    lifetime = chain[0].not_valid_after_utc - chain[0].not_valid_before_utc
    assert lifetime.total_seconds() == 3600 + 300  # --ttl 1h plus the 5m backdate


def test_openssl_verify_x509_strict_accepts_the_issued_svid(issued: Path, tmp_path: Path) -> None:
    chain = load_certs((issued / "svid.pem").read_bytes())
    intermediate = tmp_path / "intermediate.pem"
    intermediate.write_bytes(chain[1].public_bytes(serialization.Encoding.PEM))
    proc = subprocess.run(["openssl", "verify", "-x509_strict", "-purpose", "sslclient", "-CAfile",
                           str(issued / "bundle.pem"), "-untrusted", str(intermediate), str(issued / "svid.pem")],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().endswith(": OK")


def test_openssl_verify_rejects_the_svid_against_another_root(issued: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    run(other, "init")
    root = run(other, "bundle").stdout
    (tmp_path / "other-root.pem").write_text(root)
    proc = subprocess.run(["openssl", "verify", "-x509_strict", "-CAfile", str(tmp_path / "other-root.pem"),
                           "-untrusted", str(issued / "svid.pem"), str(issued / "svid.pem")],
                          capture_output=True, text=True, check=False)
    assert proc.returncode != 0


def test_py_spiffe_accepts_the_issued_svid(issued: Path) -> None:
    svid = X509Svid.parse((issued / "svid.pem").read_bytes(), (issued / "svid-key.pem").read_bytes())
    assert str(svid.spiffe_id) == ID
    assert len(svid.cert_chain) == 2


def test_py_spiffe_rejects_a_ca_certificate_as_an_svid(ca: Path, tmp_path: Path) -> None:
    # The control: the same parser refuses what is not an X509-SVID leaf (our root).
    run(ca, "export-cacerts", "--dir", str(tmp_path / "c"))
    with pytest.raises(InvalidLeafCertificateError, match="CA flag"):
        X509Svid.parse((tmp_path / "c" / "ca-cert.pem").read_bytes(), (tmp_path / "c" / "ca-key.pem").read_bytes())


# pkilint validates URIs with the `validators` package, which knows only web schemes, so every
# spiffe:// URI is reported as `pkix.invalid_uri_syntax` (a false positive: RFC 3986 allows any scheme).
PKILINT_KNOWN_FALSE_POSITIVES = {("pkix.invalid_uri_syntax", "spiffe://")}


def _pkilint(*args: str) -> list[tuple[str, str]]:
    proc = subprocess.run([str(BIN / args[0]), "lint", "-f", "JSON", "-s", "WARNING", *args[1:]],
                          capture_output=True, text=True, check=False)
    assert proc.stdout.strip(), f"pkilint produced no report: {proc.stderr}"
    findings = [(f["code"], f.get("message") or "") for r in json.loads(proc.stdout)["results"]
                for f in r["finding_descriptions"]]
    return [(code, msg) for code, msg in findings
            if not any(code == fp and f'"{prefix}' in msg for fp, prefix in PKILINT_KNOWN_FALSE_POSITIVES)]


def _split(pem: Path, tmp_path: Path) -> list[Path]:
    out = []
    for i, cert in enumerate(load_certs(pem.read_bytes())):
        path = tmp_path / f"{pem.stem}-{i}.pem"
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        out.append(path)
    return out


def test_pkilint_rfc5280_finds_nothing_in_leaf_intermediate_or_root(issued: Path, tmp_path: Path) -> None:
    leaf, intermediate = _split(issued / "svid.pem", tmp_path)
    (root,) = _split(issued / "bundle.pem", tmp_path)
    for cert in (leaf, intermediate, root):
        assert _pkilint("lint_pkix_cert", str(cert)) == [], cert.name
    assert _pkilint("lint_pkix_signer_signee_cert_chain", str(intermediate), str(leaf)) == []
    assert _pkilint("lint_pkix_signer_signee_cert_chain", str(root), str(intermediate)) == []


def test_export_cacerts_writes_a_set_istiod_accepts(ca: Path, tmp_path: Path) -> None:
    out = tmp_path / "cacerts"
    run(ca, "export-cacerts", "--dir", str(out))
    files = {name: (out / name).read_bytes() for name in CACERTS_FILES}
    check_cacerts(files, now=dt.datetime.now(dt.UTC))
    assert private_key_to_pem(load_private_key(files["ca-key.pem"])) == files["ca-key.pem"]  # unencrypted PKCS#8
    ca_cert = x509.load_pem_x509_certificate(files["ca-cert.pem"])
    (root,) = load_certs(files["root-cert.pem"])
    p.assert_is_ca(ca_cert, root, path_length=0)
    assert load_certs(files["cert-chain.pem"]) == [ca_cert, root]
    assert stat.S_IMODE((out / "ca-key.pem").stat().st_mode) == 0o600
    assert not list(out.glob("*istio-generated*"))
    proc = subprocess.run(["openssl", "verify", "-x509_strict", "-CAfile", str(out / "root-cert.pem"),
                           "-untrusted", str(out / "cert-chain.pem"), str(out / "ca-cert.pem")],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_bundle_pem_and_spiffe_formats_agree(ca: Path) -> None:
    pem = run(ca, "bundle", "--format", "pem").stdout.encode()
    doc = run(ca, "bundle", "--format", "spiffe").stdout.encode()
    bundle = parse_jwks(doc, TrustDomain("cluster.local"))
    assert list(bundle.roots) == load_certs(pem)
    assert json.loads(doc)["keys"][0]["use"] == "x509-svid"
    assert run(ca, "bundle").stdout.encode() == pem


def test_a_bad_config_exits_2_listing_every_problem(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("trust_domain: Bad.Domain\nca: {workload_ttl: 40d, bogus: 1}\nnope: 2\n")
    proc = run(tmp_path / "data", "--config", str(config), "status", check=False)
    assert proc.returncode == 2
    for key in ("trust_domain:", "ca.workload_ttl:", "ca.bogus:", "nope:"):
        assert f"  - {key}" in proc.stderr, proc.stderr


def test_a_bad_env_override_exits_2(tmp_path: Path) -> None:
    proc = run(tmp_path / "data", "status", env={"CA_SERVICE_CA__WORKLOAD_TTL": "forever"}, check=False)
    assert proc.returncode == 2
    assert "ca.workload_ttl" in proc.stderr


def test_status_without_a_ca_exits_1_and_says_what_to_do(tmp_path: Path) -> None:
    proc = run(tmp_path / "data", "status", check=False)
    assert proc.returncode == 1
    assert "ca-service init" in proc.stderr


def test_issue_rejects_a_bad_spiffe_id_quoting_it(ca: Path, tmp_path: Path) -> None:
    proc = run(ca, "issue", "--spiffe-id", "spiffe://cluster.local/a/../b", "--out", str(tmp_path), check=False)
    assert proc.returncode == 1
    assert "'spiffe://cluster.local/a/../b'" in proc.stderr


def test_data_dir_comes_from_the_environment(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "CA_SERVICE_DATA_DIR": str(tmp_path / "env-data")}
    proc = subprocess.run([sys.executable, "-m", "ca_service", "init"], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "env-data" / "state" / "authority.json").exists()


def test_serve_starts_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = [sys.executable, "-m", "ca_service", "--data-dir", str(tmp_path / "data"), "serve",
            "--grpc-address", "127.0.0.1:0", "--http-address", "127.0.0.1:0", "--bundle-address", "127.0.0.1:0"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    try:
        seen = read_until(proc, b"ca-service ready")
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, (seen + rest).decode()
    assert b"ca-service stopped" in seen + rest
    assert (tmp_path / "data" / "state" / "authority.json").exists()
