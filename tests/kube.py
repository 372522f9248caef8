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
import signal
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


    # ------------------------------------------------------------ stopping only the API server
    # `test-cluster down/up` would wipe etcd (and so every object and resourceVersion); these stop and
    # restart just the kube-apiserver process with its own command line, against the same etcd.

    @property
    def _pid_file(self) -> Path:
        return self.directory / "apiserver.pid"

    def stop_apiserver(self) -> list[str]:
        """Stop the kube-apiserver (SIGTERM, then SIGKILL after 10 s); returns its command line."""
        pid = int(self._pid_file.read_text())
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        if Path(f"/proc/{pid}").exists():
            os.kill(pid, signal.SIGKILL)
        return argv

    def start_apiserver(self, argv: list[str], timeout: float = 60) -> None:
        """Start the kube-apiserver again with ``argv``; its pid goes where `test-cluster down` looks for it."""
        with (self.directory / "logs" / "apiserver.log").open("ab") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self._pid_file.write_text(f"{proc.pid}\n")
        deadline = time.monotonic() + timeout
        while not self._ready():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"kube-apiserver did not come back (exit {proc.poll()})")
            time.sleep(0.2)

    def _ready(self) -> bool:
        token = (self.directory / "pki" / "admin.token").read_text().strip()
        with self.api_client() as api:
            host = api.configuration.host
        context = ssl.create_default_context(cafile=str(self.directory / "pki" / "serving.crt"))
        request = urllib.request.Request(f"{host}/readyz", headers={"Authorization": f"Bearer {token}"})
        try:
            with urllib.request.urlopen(request, context=context, timeout=2) as response:
                return bool(response.read() == b"ok")
        except OSError:
            return False

    # ------------------------------------------------------------ RBAC-limited identities

    def limited_client(self, namespace: str, rules: list[dict[str, Any]], name: str = "limited"):  # type: ignore[no-untyped-def]
        """An ApiClient authenticated as a new ServiceAccount granted only ``rules`` in ``namespace``
        (token from TokenRequest, since this cluster makes no token Secrets)."""
        from kubernetes import client

        with self.api_client() as api:
            core, rbac = client.CoreV1Api(api), client.RbacAuthorizationV1Api(api)
            core.create_namespaced_service_account(namespace, {"metadata": {"name": name}})
            rbac.create_namespaced_role(namespace, {"metadata": {"name": name}, "rules": rules})
            rbac.create_namespaced_role_binding(namespace, {
                "metadata": {"name": name},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
                "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}]})
            token = core.create_namespaced_service_account_token(
                name, namespace, {"spec": {"audiences": ["https://kubernetes.default.svc.cluster.local"],
                                           "expirationSeconds": 3600}}).status.token
            configuration = client.Configuration()
            configuration.host = api.configuration.host
            configuration.ssl_ca_cert = api.configuration.ssl_ca_cert
        configuration.api_key = {"authorization": f"Bearer {token}"}
        return client.ApiClient(configuration)


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
