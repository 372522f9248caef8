"""Three real daemon replicas on one state Secret (issue 12, "Done when"): one CA from a cold start, SDS on
every replica, and a forced root rotation that survives SIGKILL of the leader in its PUBLISHED and
SIGNING phases without one SDS client on any replica getting a leaf another connected client does
not yet trust (clients on one replica ACK slowly: the cluster-wide gate must wait for them)."""

from __future__ import annotations

import datetime as dt
import threading
from pathlib import Path

from kubernetes import client

from ca_service.pki.templates import CAKind
from ca_service.rotation.state import RootRotationPhase
from tests.k8s.replicas import (
    LEASE,
    Replica,
    leader_of,
    read_state,
    replica_config,
    start_replicas,
    stop_all,
    wait_for,
)
from tests.k8s.sds_fleet import Fleet, close_quietly
from tests.kube import Cluster

NAMES = ("r0", "r1", "r2")
# The slow replica's clients ACK a new bundle this late: longer than root_min_propagation (1 s), so a
# leader gating on its own streams only would sign under the new root while they still trust the old.
SLOW_ACK = 3.0


class RevisionWatch:
    """Reads the state Secret in a loop and records every revision seen, to check it never goes back."""

    def __init__(self, api: client.ApiClient, namespace: str) -> None:
        self.revisions: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(api, namespace), daemon=True)
        self._thread.start()

    def _run(self, api: client.ApiClient, namespace: str) -> None:
        while not self._stop.wait(0.05):
            try:
                self.revisions.append(read_state(api, namespace).revision)
            except (client.ApiException, OSError):
                continue

    def stop(self) -> list[int]:
        self._stop.set()
        self._thread.join(10)
        return self.revisions


def _configs(tmp: Path, k8s: Cluster, namespace: str) -> dict[str, Path]:
    # A root rotation must wait for the slow clients; a 2 s re-issue window leaves time to kill in SIGNING.
    rotation = {"reissue_window": "2s"}
    return {name: replica_config(tmp / f"{name}.yaml", k8s.kubeconfig, namespace, name, rotation=rotation)
            for name in NAMES}


def _by_name(replicas: list[Replica], name: str) -> Replica:
    return next(r for r in replicas if r.name == name)


def test_three_replicas_started_together_on_an_empty_cluster_end_with_one_ca_and_all_serve_sds(
        k8s: Cluster, tmp_path: Path) -> None:
    namespace = k8s.fresh_namespace("rep")
    replicas = start_replicas(tmp_path, _configs(tmp_path, k8s, namespace))
    fleet = Fleet()
    try:
        with k8s.api_client() as api:
            state = read_state(api, namespace)
            assert len(state.roots) == 1
            leader = wait_for("a leader", lambda: leader_of(api, namespace))
        assert leader in NAMES
        for replica in replicas:
            fleet.add(f"c-{replica.name}", [replica.sds])
        wait_for("every client connected", lambda: fleet.connected() == len(replicas))
        assert fleet.all_under(state.roots[0])
        # Each replica says who leads and who it is; exactly one reports itself leader in ca_leader.
        for replica in replicas:
            wait_for("the leader seen", lambda r=replica: r.detail().get("leader") == leader)  # type: ignore[misc]
            assert replica.detail()["replica"] == replica.name
        leading = [r.name for r in replicas if f'ca_leader{{replica="{r.name}"}} 1.0' in r.metric("ca_leader")]
        assert leading == [leader]
        assert fleet.violations == []
    finally:
        close_quietly(fleet)
        stop_all(replicas)


def test_the_leader_signs_under_a_new_root_only_after_the_slow_clients_of_another_replica_acked_it(
        k8s: Cluster, tmp_path: Path) -> None:
    namespace = k8s.fresh_namespace("rep")
    configs = _configs(tmp_path, k8s, namespace)
    replicas = start_replicas(tmp_path, {name: configs[name] for name in NAMES[:2]})
    fleet = Fleet()
    with k8s.api_client() as api:
        try:
            leader = wait_for("a leader", lambda: leader_of(api, namespace))
            for replica in replicas:
                for i in range(2):
                    fleet.add(f"{replica.name}-{i}", [replica.sds],
                              ack_delay=0.0 if replica.name == leader else SLOW_ACK)
            wait_for("every client connected", lambda: fleet.connected() == len(fleet.clients))
            status, body = _by_name(replicas, leader).rotate("root")
            assert status == 200, body
            wait_for("the rotation finished", lambda: read_state(api, namespace).root_rotation is None, timeout=90)
            final = read_state(api, namespace)
            wait_for("every client on the new root only", lambda: fleet.all_under(final.roots[0]), timeout=60)
            assert fleet.violations == []
        finally:
            close_quietly(fleet)
            stop_all(replicas)


def test_a_root_rotation_survives_sigkill_of_the_leader_in_published_and_in_signing(
        k8s: Cluster, tmp_path: Path) -> None:
    namespace = k8s.fresh_namespace("rep")
    replicas = start_replicas(tmp_path, _configs(tmp_path, k8s, namespace))
    fleet = Fleet()
    with k8s.api_client() as api:
        revisions = RevisionWatch(api, namespace)
        try:
            old_root = read_state(api, namespace).roots[0]
            first = wait_for("a leader", lambda: leader_of(api, namespace))
            slow = next(name for name in NAMES if name != first)
            addresses = {r.name: r.sds for r in replicas}
            for replica in replicas:
                # Home replica first, then the others: where a client reconnects when its replica dies.
                order = [replica.sds, *(a for n, a in addresses.items() if n != replica.name)]
                for i in range(2):
                    fleet.add(f"{replica.name}-{i}", order, ack_delay=SLOW_ACK if replica.name == slow else 0.0)
            wait_for("every client connected", lambda: fleet.connected() == len(fleet.clients))

            status, body = _by_name(replicas, first).rotate("root")
            assert status == 200, body
            assert _kill_leader(api, namespace, replicas, first) is RootRotationPhase.PUBLISHED

            wait_for("SIGNING", lambda: _phase(api, namespace) is RootRotationPhase.SIGNING, timeout=90, every=0.02)
            second = leader_of(api, namespace)
            assert second not in (first, "")
            assert _kill_leader(api, namespace, replicas, second) is RootRotationPhase.SIGNING

            wait_for("the rotation finished", lambda: read_state(api, namespace).root_rotation is None, timeout=120)
            final = read_state(api, namespace)
            assert len(final.roots) == 1 and final.roots[0] != old_root
            survivor = leader_of(api, namespace)
            assert survivor not in (first, second, "")
            wait_for("every client on the new root only", lambda: fleet.all_under(final.roots[0]), timeout=60)
            seen = revisions.stop()
            assert seen == sorted(seen), "the state revision went back"
            assert fleet.violations == []
            active = final.active(CAKind.INTERMEDIATE)
            active.cert.verify_directly_issued_by(final.roots[0])
        finally:
            revisions.stop()
            close_quietly(fleet)
            stop_all(replicas)


def _phase(api: client.ApiClient, namespace: str) -> RootRotationPhase | None:
    rotation = read_state(api, namespace).root_rotation
    return None if rotation is None else rotation.phase


def _kill_leader(api: client.ApiClient, namespace: str, replicas: list[Replica], name: str,
                 ) -> RootRotationPhase | None:
    """SIGKILL ``name``, then wait for another replica to take the lease: within the lease duration (3 s)
    after the kill, plus one retry period (0.5 s) and a scheduling allowance on a loaded machine.
    Returns the rotation phase the leader was killed in."""
    phase = _phase(api, namespace)
    killed_at = dt.datetime.now(dt.UTC)
    _by_name(replicas, name).kill()
    holder = wait_for("a new leader", lambda: (h := leader_of(api, namespace)) not in (name, "") and h, timeout=30)
    lease = client.CoordinationV1Api(api).read_namespaced_lease(LEASE, namespace)
    taken = lease.spec.acquire_time - killed_at
    assert taken < dt.timedelta(seconds=3 + 0.5 + 5), f"{holder} took the lease {taken} after the kill"
    return phase
