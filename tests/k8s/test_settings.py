"""Kubernetes settings: lease timings validated together, the replica's identity, the store behind the port."""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path

import pytest

from ca_service.app import build_store
from ca_service.config import ConfigError, Settings, load_settings, replica_id, validate
from ca_service.kube.store import KubernetesStore
from ca_service.settings import KubernetesStorageSettings, StorageBackend, StorageSettings
from tests.kube import Cluster


def test_lease_timings_that_let_a_stale_leader_overlap_a_new_one_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(environ={}, overrides={"data_dir": str(tmp_path), "storage": {"kubernetes": {
            "lease_duration": "10s", "renew_deadline": "10s"}}})
    assert any(p.startswith("storage.kubernetes: lease timings") for p in info.value.problems)


def test_the_replica_id_is_configured_else_the_pod_name_else_the_hostname() -> None:
    s = Settings()
    assert replica_id(s, {"POD_NAME": "ca-service-7f9c-abcde"}) == "ca-service-7f9c-abcde"
    assert replica_id(s, {})  # the hostname
    named = dataclasses.replace(s, storage=StorageSettings(kubernetes=KubernetesStorageSettings(replica_id="r1")))
    assert replica_id(named, {"POD_NAME": "p"}) == "r1"


def test_the_defaults_are_client_gos() -> None:
    k = KubernetesStorageSettings()
    assert (k.lease_duration, k.renew_deadline, k.retry_period) == (
        dt.timedelta(seconds=15), dt.timedelta(seconds=10), dt.timedelta(seconds=2))


def test_the_kubernetes_backend_builds_a_store_on_the_configured_secret(k8s: Cluster) -> None:
    s = dataclasses.replace(Settings(), storage=StorageSettings(
        backend=StorageBackend.KUBERNETES,
        kubernetes=KubernetesStorageSettings(namespace="ns1", secret_name="state1", kubeconfig=k8s.kubeconfig)))
    store = build_store(s)
    assert isinstance(store, KubernetesStore)
    assert store.describe() == "kubernetes secret ns1/state1"
    assert validate(s) == []


def test_the_kubernetes_example_config_is_valid(tmp_path: Path) -> None:
    example = Path(__file__).resolve().parents[2] / "config" / "kubernetes.yaml"
    s = load_settings(example, environ={}, overrides={"data_dir": str(tmp_path)})
    assert s.storage.backend is StorageBackend.KUBERNETES
