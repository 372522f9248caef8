"""Real ``ca-service serve`` replicas on the Kubernetes backend (subprocesses, tests/faults/daemon.py's
``Daemon``), each with its own data directory and replica id, sharing one state Secret and one Lease."""

from __future__ import annotations

import json
import re
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from kubernetes import client

from ca_service.kube.store import record_data
from ca_service.rotation.state import AuthorityState
from ca_service.storage.codec import decode_state
from tests.faults.daemon import FAST, Daemon

T = TypeVar("T")
SECRET = "ca-service-state"
LEASE = "ca-service-leader"
# Short leases so a killed leader is replaced in seconds: 3 s lease, give up after 2 s, retry every 0.5 s.
LEASE_TIMINGS = {"lease_duration": "3s", "renew_deadline": "2s", "retry_period": "500ms"}
ISTIO_ON = {"cacerts_secret": {"enabled": True, "namespace": "istio-system"},
            "root_cert_configmap": {"enabled": True},
            "trust_bundle_configmap": {"enabled": True, "namespace": "istio-system"}}


def replica_config(path: Path, kubeconfig: Path, namespace: str, replica: str, *,
                   istio: bool | dict[str, Any] = False,
                   rotation: dict[str, Any] | None = None, **sections: Any) -> Path:
    doc: dict[str, Any] = {**FAST, **sections}
    doc["storage"] = {"backend": "kubernetes", "kubernetes": {
        "namespace": namespace, "secret_name": SECRET, "kubeconfig": str(kubeconfig), "replica_id": replica,
        "lease_name": LEASE, **LEASE_TIMINGS}}
    switches = istio if isinstance(istio, dict) else ISTIO_ON if istio else {}
    doc["istiod"] = {**FAST.get("istiod", {}), **switches}
    doc["rotation"] = {**FAST["rotation"], **(rotation or {})}
    path.write_text(json.dumps(doc))
    return path


class Replica(Daemon):
    def __init__(self, tmp: Path, name: str, config: Path) -> None:
        data = tmp / name / "data"
        data.mkdir(parents=True)
        self.name = name
        super().__init__(data, config)
        self.sds = ""

    def wait_ready(self, timeout: float = 60, *, crash_expected: bool = False) -> bool:
        ready = super().wait_ready(timeout, crash_expected=crash_expected)
        found = re.search(rb"SDS listening address=(\S+)", self.output)
        assert found, self.output.decode()[-3000:]
        self.sds = found[1].decode()
        return ready

    def detail(self) -> dict[str, str]:
        """``/readyz?verbose`` detail: who leads as this replica sees it, and its own name."""
        try:
            with urllib.request.urlopen(self.url + "/readyz?verbose", timeout=5) as response:
                body = response.read()
        except urllib.error.HTTPError as exc:
            body = exc.read()
        return dict(json.loads(body).get("detail") or {})

    def metric(self, name: str) -> str:
        with urllib.request.urlopen(self.url + "/metrics", timeout=5) as response:
            text = response.read().decode()
        return "\n".join(line for line in text.splitlines() if line.startswith(name))


def start_replicas(tmp: Path, configs: dict[str, Path]) -> list[Replica]:
    """Start every replica at once (they race for the create), then wait for each to be ready."""
    replicas = [Replica(tmp, name, config) for name, config in configs.items()]
    try:
        for replica in replicas:
            replica.wait_ready()
    except BaseException:
        stop_all(replicas)
        raise
    return replicas


def stop_all(replicas: list[Replica]) -> None:
    for replica in replicas:
        if replica.proc.poll() is None:
            replica.kill()


def read_state(api: client.ApiClient, namespace: str) -> AuthorityState:
    secret = client.CoreV1Api(api).read_namespaced_secret(SECRET, namespace)
    return decode_state(record_data(secret.data))


def leader_of(api: client.ApiClient, namespace: str) -> str:
    return str(client.CoordinationV1Api(api).read_namespaced_lease(LEASE, namespace).spec.holder_identity or "")


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = 60, every: float = 0.05) -> T:
    """Poll ``probe`` until it returns something truthy; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = probe()
        except (client.ApiException, OSError):
            value = None  # an API blip or a replica going down: probe again
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every)
