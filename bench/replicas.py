"""Replica fan-out: time from a leader's commit to the last SDS push ACKed on every replica.

Three real daemons (``python -m ca_service serve``) on the Kubernetes backend share one state Secret on
a real kube-apiserver (``../shared/k8s/test-cluster``, as the tests use).  Each replica serves ``N``
Envoy-like streams (bench/sds_loadgen.py).  The leader commits a bundle change (a forced root rotation
publishes the new root: every ``ROOTCA`` stream of every replica gets a push); the figures are the time
from the admin request to the last ACK on the leader's own streams, and on the followers' streams, which
see the commit through their watch of the Secret.  One round: a root rotation cannot be forced twice
while the first one runs.
"""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.common import ROOT, Result
from bench.sds_loadgen import LoadGenerator
from bench.startup import _env

NAMES = ("r0", "r1", "r2")


class Replica:
    def __init__(self, tmp: Path, name: str, kubeconfig: Path, namespace: str) -> None:
        data = tmp / name
        config = tmp / f"{name}.yaml"
        config.write_text(json.dumps({
            "storage": {"backend": "kubernetes", "kubernetes": {
                "namespace": namespace, "kubeconfig": str(kubeconfig), "replica_id": name}},
            "ca": {"signing_workers": 0}, "bundle_endpoint": {"enabled": False}}))
        argv = [sys.executable, "-m", "ca_service", "--config", str(config), "--data-dir", str(data), "serve",
                "--grpc-address", "127.0.0.1:0", "--http-address", "127.0.0.1:0"]
        self.name, self.data = name, data
        self.proc = subprocess.Popen(argv, env=_env(), cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                     text=True)
        self.address = self.url = ""
        self._lines: queue.Queue[dict[str, Any]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:  # keep draining, or the daemon blocks on a full pipe
            try:
                self._lines.put(json.loads(raw))
            except ValueError:
                continue

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while not (self.address and self.url):
            doc = self._lines.get(timeout=max(0.01, deadline - time.monotonic()))
            if doc.get("msg") == "SDS listening":
                self.address = str(doc["address"])
            elif doc.get("msg") == "HTTP side-port listening":
                self.url = str(doc["url"]).rstrip("/")

    def leader(self) -> str:
        with urllib.request.urlopen(f"{self.url}/readyz?verbose", timeout=10) as response:
            return str(json.loads(response.read()).get("detail", {}).get("leader", ""))

    def rotate_root(self) -> None:
        token = (self.data / "admin-token").read_text().strip()
        body = json.dumps({"scope": "root", "reason": "bench: replica fan-out"}).encode()
        request = urllib.request.Request(f"{self.url}/admin/v1/rotate", data=body, method="POST", headers={
            "Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            response.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def _leader(replicas: list[Replica], timeout: float = 60) -> Replica:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        name = replicas[0].leader()
        if name:
            return next(r for r in replicas if r.name == name)
        time.sleep(0.2)
    raise TimeoutError("no replica took the leader lease")


def measure(kubeconfig: Path, namespace: str, streams: int, tmp: Path) -> dict[str, float]:
    replicas = [Replica(tmp, name, kubeconfig, namespace) for name in NAMES]
    loads: dict[str, LoadGenerator] = {}
    try:
        for replica in replicas:
            replica.wait_ready()
        leader = _leader(replicas)
        for replica in replicas:
            loads[replica.name] = LoadGenerator(replica.address, streams, processes=1)
        for load in loads.values():
            load.mark("ROOTCA")
        started = time.time()
        leader.rotate_root()
        committed = time.time()
        last = {name: load.wait_all_acked("ROOTCA") for name, load in loads.items()}
        followers = [t for name, t in last.items() if name != leader.name]
        return {"streams_per_replica": float(streams), "replicas": float(len(replicas)),
                "commit_request_s": committed - started,
                "leader_last_ack_s": last[leader.name] - started,
                "followers_last_ack_s": max(followers) - started,
                "last_replica_push_s": max(last.values()) - started}
    finally:
        for load in loads.values():
            load.close()
        for replica in replicas:
            replica.close()


def run(quick: bool) -> Result:
    from tests.kube import Cluster

    streams = 100 if quick else 1000
    result = Result("replicas")
    with tempfile.TemporaryDirectory(prefix="ca-bench-replicas-") as tmp_name:
        tmp = Path(tmp_name)
        cluster = Cluster(tmp / "cluster")
        cluster.up()
        try:
            namespace = cluster.fresh_namespace("bench")
            result.metrics.update(measure(cluster.kubeconfig, namespace, streams, tmp))
        finally:
            cluster.down()
    result.target("a commit reaches every replica's streams within 2 s", "last_replica_push_s", "<", 2.0)
    result.notes.append(f"3 replicas x {streams} streams ({streams // 2} nodes) on one machine; one round "
                        "(a forced root rotation publishes the new root); followers see the commit through "
                        "their watch of the state Secret")
    return result
