"""KubernetesStore against the real API server: compare-and-swap, create-if-absent, clear RBAC errors."""

from __future__ import annotations

import asyncio
import base64
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from kubernetes import client

from ca_service.errors import ConflictError, StorageError
from ca_service.kube.client import MANAGED_BY, build_api_client
from ca_service.kube.store import KubernetesStore
from ca_service.services.authority import Authority
from ca_service.storage.base import AUTHORITY_RECORD
from ca_service.storage.codec import STATE_KEY
from tests.kube import Cluster


def _store(k8s: Cluster, namespace: str, secret: str = "ca-service-state") -> KubernetesStore:
    return KubernetesStore(build_api_client(k8s.kubeconfig), namespace, secret)


def test_a_record_is_created_read_back_and_labelled_as_ours(k8s: Cluster) -> None:
    ns = k8s.fresh_namespace()
    store = _store(k8s, ns)
    assert store.read(AUTHORITY_RECORD) is None
    written = store.write(AUTHORITY_RECORD, {STATE_KEY: b"{\"a\": 1}", "x": b"\x00\xff"}, expected_version=None)
    read = store.read(AUTHORITY_RECORD)
    assert read is not None and read.data == {STATE_KEY: b"{\"a\": 1}", "x": b"\x00\xff"}
    assert read.version == written.version
    with k8s.api_client() as api:
        secret = client.CoreV1Api(api).read_namespaced_secret("ca-service-state", ns)
    assert secret.metadata.labels[MANAGED_BY] == "ca-service"
    assert secret.metadata.resource_version == written.version
    assert base64.b64decode(secret.data["x"]) == b"\x00\xff"  # the Secret's keys are the record's keys


def test_a_write_with_a_stale_resource_version_is_refused_and_overwrites_nothing(k8s: Cluster) -> None:
    store = _store(k8s, k8s.fresh_namespace())
    first = store.write(AUTHORITY_RECORD, {STATE_KEY: b"1"}, expected_version=None)
    second = store.write(AUTHORITY_RECORD, {STATE_KEY: b"2"}, expected_version=first.version)
    with pytest.raises(ConflictError, match="conflict: update secrets/ca-service-state"):
        store.write(AUTHORITY_RECORD, {STATE_KEY: b"stale"}, expected_version=first.version)
    current = store.read(AUTHORITY_RECORD)
    assert current is not None and current.data == {STATE_KEY: b"2"} and current.version == second.version


def test_create_if_absent_refuses_when_the_record_exists(k8s: Cluster) -> None:
    store = _store(k8s, k8s.fresh_namespace())
    store.write(AUTHORITY_RECORD, {STATE_KEY: b"1"}, expected_version=None)
    with pytest.raises(ConflictError):
        store.write(AUTHORITY_RECORD, {STATE_KEY: b"2"}, expected_version=None)


def test_an_update_of_a_deleted_record_is_a_conflict(k8s: Cluster) -> None:
    ns = k8s.fresh_namespace()
    store = _store(k8s, ns)
    first = store.write(AUTHORITY_RECORD, {STATE_KEY: b"1"}, expected_version=None)
    with k8s.api_client() as api:
        client.CoreV1Api(api).delete_namespaced_secret("ca-service-state", ns)
    with pytest.raises(ConflictError, match="deleted"):
        store.write(AUTHORITY_RECORD, {STATE_KEY: b"2"}, expected_version=first.version)


def test_of_two_concurrent_creates_exactly_one_wins_and_the_other_gets_a_conflict(k8s: Cluster) -> None:
    ns = k8s.fresh_namespace()
    stores = [_store(k8s, ns) for _ in range(2)]
    barrier = threading.Barrier(2)

    def create(i: int) -> str:
        barrier.wait()
        try:
            stores[i].write(AUTHORITY_RECORD, {STATE_KEY: f"replica-{i}".encode()}, expected_version=None)
            return f"won-{i}"
        except ConflictError:
            return "conflict"

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(create, range(2)))
    assert sorted(results)[0] == "conflict" and sorted(results)[1].startswith("won-")
    winner = next(r for r in results if r.startswith("won-")).removeprefix("won-")
    current = stores[0].read(AUTHORITY_RECORD)
    assert current is not None and current.data == {STATE_KEY: f"replica-{winner}".encode()}


async def test_two_replicas_bootstrapping_together_end_with_one_ca(k8s: Cluster, settings, clock) -> None:  # type: ignore[no-untyped-def]
    ns = k8s.fresh_namespace()
    authorities = [Authority(_store(k8s, ns), settings.domain, settings.ca, clock) for _ in range(2)]

    def bootstrap(authority: Authority) -> bool:
        try:
            return authority.load_or_bootstrap()[1]
        except ConflictError:
            authority.load()  # the loser takes the winner's CA
            return False

    created = await asyncio.gather(*(asyncio.to_thread(bootstrap, a) for a in authorities))
    assert sorted(created) == [False, True]
    assert authorities[0].bundle().to_pem() == authorities[1].bundle().to_pem()
    assert authorities[0].signer().serial == authorities[1].signer().serial


def test_a_missing_namespace_is_named_in_the_error_of_the_first_write(k8s: Cluster) -> None:
    store = _store(k8s, "no-such-namespace-here")
    # The API answers a get in a missing namespace like any missing Secret; the bootstrap's create says why.
    assert store.read(AUTHORITY_RECORD) is None
    with pytest.raises(StorageError, match="^namespace no-such-namespace-here does not exist "
                                           r"\(cannot create secrets/ca-service-state\)") as info:
        store.write(AUTHORITY_RECORD, {STATE_KEY: b"1"}, expected_version=None)
    assert not isinstance(info.value, ConflictError)


def test_a_token_allowed_only_to_get_is_told_it_cannot_update_or_create(k8s: Cluster) -> None:
    ns = k8s.fresh_namespace()
    admin = _store(k8s, ns)
    first = admin.write(AUTHORITY_RECORD, {STATE_KEY: b"1"}, expected_version=None)
    limited = KubernetesStore(k8s.limited_client(ns, [{"apiGroups": [""], "resources": ["secrets"],
                                                        "verbs": ["get"]}]), ns, "ca-service-state")
    assert limited.read(AUTHORITY_RECORD) == admin.read(AUTHORITY_RECORD)
    with pytest.raises(StorageError) as update:
        limited.write(AUTHORITY_RECORD, {STATE_KEY: b"2"}, expected_version=first.version)
    assert not isinstance(update.value, ConflictError)
    assert str(update.value).startswith(
        f"forbidden: cannot update secrets/ca-service-state in namespace {ns}: ")
    other = KubernetesStore(limited._core.api_client, ns, "other")
    with pytest.raises(StorageError, match=f"^forbidden: cannot create secrets/other in namespace {ns}: "):
        other.write(AUTHORITY_RECORD, {STATE_KEY: b"2"}, expected_version=None)
    current = admin.read(AUTHORITY_RECORD)
    assert current is not None and current.data == {STATE_KEY: b"1"}


def test_an_unreachable_api_server_is_a_storage_error() -> None:
    configuration = client.Configuration()
    configuration.host = "https://127.0.0.1:1"  # nothing listens on port 1
    with pytest.raises(StorageError, match=r"^cannot reach the Kubernetes API server to get secrets/s in namespace ns"):
        KubernetesStore(client.ApiClient(configuration), "ns", "s").read(AUTHORITY_RECORD)


def test_a_missing_kubeconfig_is_a_clear_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(StorageError, match="cannot load the Kubernetes kubeconfig"):
        build_api_client(tmp_path / "nope")


def test_a_deposed_writers_commit_is_refused_and_it_recovers_by_reloading(k8s: Cluster, settings, clock) -> None:  # type: ignore[no-untyped-def]
    ns = k8s.fresh_namespace()
    leader, stale = (Authority(_store(k8s, ns), settings.domain, settings.ca, clock) for _ in range(2))
    leader.load_or_bootstrap()
    stale.load()
    leader.commit(leader.state.replace(extra={"by": "leader"}))
    with pytest.raises(ConflictError):  # fencing: its resourceVersion is from before the leader's commit
        stale.commit(stale.state.replace(extra={"by": "stale"}))
    assert stale.load() is not None and stale.state.extra == {"by": "leader"}
    assert stale.state.revision == leader.state.revision == 1
