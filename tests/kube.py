"""A real Kubernetes API server for tests: ``../shared/k8s/test-cluster`` (kube-apiserver v1.20.2 + etcd on loopback).

Not a fake: every Kubernetes test talks to the real API server.  The suite shares one cluster per session
(``k8s`` fixture, ~7 s to start); a test that stops or breaks the API server takes a private one
(``private_k8s``).  Tests use fresh names (namespaces, Secrets) per test: namespaces never finish
deleting on this server (no controller-manager).
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# CI has ../shared beside the checkout; a worktree elsewhere can point at it with CA_SERVICE_SHARED_DIR.
SHARED = Path(os.environ.get("CA_SERVICE_SHARED_DIR", ROOT.parent / "shared"))
TEST_CLUSTER = SHARED / "k8s" / "test-cluster"


@dataclass
class Cluster:
    """One running test cluster: its directory and admin kubeconfig (group system:masters)."""

    directory: Path

    @property
    def kubeconfig(self) -> Path:
        return self.directory / "kubeconfig"

    def up(self) -> None:
        if not TEST_CLUSTER.exists():
            raise RuntimeError(f"{TEST_CLUSTER} is missing: the suite needs ../shared/k8s beside the checkout")
        if shutil.which("etcd") is None:
            raise RuntimeError("etcd is not installed: run scripts/setup --test (installs Debian etcd-server)")
        proc = subprocess.run(["bash", str(TEST_CLUSTER), "up", str(self.directory)], capture_output=True,
                              text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"test-cluster up failed ({proc.returncode}): {proc.stderr[-2000:]}")

    def down(self) -> None:
        subprocess.run(["bash", str(TEST_CLUSTER), "down", str(self.directory)], capture_output=True, timeout=60)

    def api_client(self):  # type: ignore[no-untyped-def]
        """A ``kubernetes.client.ApiClient`` with the admin identity."""
        from kubernetes import config

        return config.new_client_from_config(config_file=str(self.kubeconfig))

    def fresh_namespace(self, prefix: str = "t") -> str:
        """Create and return a namespace with a name no other test uses."""
        from kubernetes import client

        name = f"{prefix}-{secrets.token_hex(4)}"
        with self.api_client() as api:
            client.CoreV1Api(api).create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
        return name


def _cluster(directory: Path) -> Iterator[Cluster]:
    cluster = Cluster(directory)
    try:
        cluster.up()
        yield cluster
    finally:
        cluster.down()  # stops exactly what `up` started, even if the test failed


@pytest.fixture(scope="session")
def k8s(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """The session's shared real API server."""
    yield from _cluster(tmp_path_factory.mktemp("k8s"))


@pytest.fixture
def private_k8s(tmp_path: Path) -> Iterator[Cluster]:
    """A real API server of this test's own (for tests that stop it or change cluster-wide objects)."""
    yield from _cluster(tmp_path / "k8s")
