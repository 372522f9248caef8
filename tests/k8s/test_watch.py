"""The state Secret's watch against the real API server: delivery, resume after 410, and an API outage."""

from __future__ import annotations

import asyncio

from ca_service.kube.client import build_api_client
from ca_service.kube.store import KubernetesStore
from ca_service.kube.watch import SecretWatch
from ca_service.storage.base import AUTHORITY_RECORD, Record
from ca_service.storage.codec import STATE_KEY
from tests.kube import Cluster
from tests.waiting import wait_for


def _pair(k8s: Cluster, ns: str) -> tuple[KubernetesStore, list[Record], SecretWatch]:
    writer = KubernetesStore(build_api_client(k8s.kubeconfig), ns, "state")
    seen: list[Record] = []
    return writer, seen, SecretWatch(build_api_client(k8s.kubeconfig), ns, "state", seen.append)


def _payloads(seen: list[Record]) -> list[bytes]:
    return [r.data[STATE_KEY] for r in seen]


async def test_the_watch_delivers_another_writers_commit(k8s: Cluster) -> None:
    ns = k8s.fresh_namespace()
    writer, seen, watch = _pair(k8s, ns)
    first = writer.write(AUTHORITY_RECORD, {STATE_KEY: b"1"}, expected_version=None)
    await watch.start()
    try:
        await wait_for(lambda: _payloads(seen) == [b"1"], "the initial list")
        second = await asyncio.to_thread(writer.write, AUTHORITY_RECORD, {STATE_KEY: b"2"},
                                         expected_version=first.version)
        # The bound is generous on purpose (a loaded CI machine); the watch delivers in milliseconds.
        await wait_for(lambda: _payloads(seen) == [b"1", b"2"], "the second commit", timeout=5)
        assert seen[-1].version == second.version and seen[-1].name == AUTHORITY_RECORD
    finally:
        await watch.stop()


async def test_the_watch_does_not_redeliver_the_version_its_owner_already_holds(k8s: Cluster) -> None:
    ns = k8s.fresh_namespace()
    writer = KubernetesStore(build_api_client(k8s.kubeconfig), ns, "state")
    first = writer.write(AUTHORITY_RECORD, {STATE_KEY: b"1"}, expected_version=None)
    seen: list[Record] = []
    watch = SecretWatch(build_api_client(k8s.kubeconfig), ns, "state", seen.append, known_version=first.version)
    await watch.start()
    try:
        await wait_for(lambda: watch.watch.lists == 1 and watch.watch.resource_version is not None, "the list")
        await asyncio.to_thread(writer.write, AUTHORITY_RECORD, {STATE_KEY: b"2"}, expected_version=first.version)
        await wait_for(lambda: len(seen) == 1, "the second commit")
        assert _payloads(seen) == [b"2"]
    finally:
        await watch.stop()


async def test_the_watch_survives_the_api_server_stopping_and_resyncs_after(private_k8s: Cluster) -> None:
    """One private cluster for two facts (each costs a cluster start): the outage, then 410 Gone."""
    ns = private_k8s.fresh_namespace()
    writer, seen, watch = _pair(private_k8s, ns)
    first = writer.write(AUTHORITY_RECORD, {STATE_KEY: b"1"}, expected_version=None)
    await watch.start()
    try:
        await wait_for(lambda: _payloads(seen) == [b"1"], "the initial list")
        argv = await asyncio.to_thread(private_k8s.stop_apiserver)
        await wait_for(lambda: watch.watch.failures >= 2, "the watch to notice the outage", timeout=30)
        await asyncio.to_thread(private_k8s.start_apiserver, argv)
        await asyncio.to_thread(writer.write, AUTHORITY_RECORD, {STATE_KEY: b"2"}, expected_version=first.version)
        await wait_for(lambda: _payloads(seen) == [b"1", b"2"], "the commit after the outage", timeout=30)
    finally:
        await watch.stop()
    # The restarted API server filled its watch cache from a list at the current revision; a watch
    # from revision 1, older than that, is answered 410 Gone (what a long outage does to a real watch).
    late: list[Record] = []
    relisting = SecretWatch(build_api_client(private_k8s.kubeconfig), ns, "state", late.append)
    relisting.watch.resource_version = "1"
    await relisting.start()
    try:
        await wait_for(lambda: _payloads(late) == [b"2"], "the relist after 410", timeout=15)
        assert relisting.watch.lists == 1
    finally:
        await relisting.stop()

