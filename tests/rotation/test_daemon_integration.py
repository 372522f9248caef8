"""Integration: the real AsyncIOScheduler with second-scale TTLs, and a daemon SIGKILLed mid root rotation."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from ca_service.adapters.scheduler import RotationScheduler
from ca_service.clock import SystemClock
from ca_service.config import Settings, load_settings
from ca_service.errors import StorageError
from ca_service.pki.certs import fingerprint
from ca_service.pki.identity import SpiffeId
from ca_service.pki.templates import CAKind
from ca_service.rotation.planner import RotationPolicy
from ca_service.rotation.state import AuthorityState, SlotState
from ca_service.services.authority import Authority
from ca_service.services.reconciler import Reconciler
from ca_service.services.workloads import WorkloadRegistry
from ca_service.storage.base import AUTHORITY_RECORD
from ca_service.storage.codec import decode_state
from ca_service.storage.directory import DirectoryStore
from ca_service.telemetry import Telemetry

FAST = {
    "ca": {"root_ttl": "2h", "intermediate_ttl": "1h", "istiod_intermediate_ttl": "30m", "workload_ttl": "2s",
           "max_workload_ttl": "2s", "backdate": "200ms"},
    "istiod": {"max_workload_ttl": "2s"},
    "rotation": {"tick_interval": "100ms", "root_min_propagation": "2s", "root_ack_timeout": "30s",
                 "reissue_window": "1s", "misfire_grace": "5s"},
}


def fast_settings(tmp_path: Path) -> Settings:
    return load_settings(environ={}, overrides={**FAST, "data_dir": str(tmp_path / "data")})


async def test_the_real_scheduler_renews_svids_with_second_scale_ttls(tmp_path: Path) -> None:
    settings = fast_settings(tmp_path)
    clock = SystemClock()
    authority = Authority(DirectoryStore(settings.data_dir / "state"), settings.domain, settings.ca, clock)
    authority.load_or_bootstrap()
    registry = WorkloadRegistry(authority, settings.rotation, clock)
    telemetry = Telemetry()
    reconciler = Reconciler(authority, registry, RotationPolicy.from_settings(settings), telemetry, clock=clock)
    ids = [SpiffeId.parse(f"spiffe://cluster.local/ns/default/sa/w{i}") for i in range(3)]
    first = {i: registry.get_or_issue("node", i).svid.leaf.serial_number for i in ids}
    scheduler = RotationScheduler(reconciler, settings.rotation, telemetry)
    await scheduler.start()
    try:
        await asyncio.sleep(2.5)  # > one lifetime: every SVID renewed at ~1 s, again at ~2 s
    finally:
        await scheduler.stop()
    for identity in ids:
        cert = registry.get("node", identity)
        assert cert is not None and cert.generation >= 2
        assert cert.svid.leaf.serial_number != first[identity]
    assert telemetry.registry.get_sample_value("ca_scheduler_job_errors_total", {"job": "reconcile"}) is None


def _state(data_dir: Path) -> AuthorityState | None:
    if not (data_dir / "state").exists():
        return None
    try:
        record = DirectoryStore(data_dir / "state").read(AUTHORITY_RECORD)
    except StorageError:
        return None
    return decode_state(dict(record.data)) if record else None


def _wait(predicate: Callable[[AuthorityState], bool], data_dir: Path, timeout: float) -> AuthorityState:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = _state(data_dir)
        if state is not None and predicate(state):
            return state
        time.sleep(0.05)
    raise AssertionError("timed out waiting for the daemon's state")


@pytest.mark.parametrize("kill_in", ["published", "retiring"])
def test_a_daemon_sigkilled_mid_root_rotation_finishes_it_after_restart(tmp_path: Path, kill_in: str) -> None:
    config = tmp_path / "config.yaml"
    # Port 0 everywhere: the default ports may be held by another daemon on this machine.
    ports = {"grpc": [{"address": "127.0.0.1:0", "trust_node_metadata": True}], "http": {"address": "127.0.0.1:0"},
             "bundle_endpoint": {"address": "127.0.0.1:0"}}
    config.write_text(json.dumps({**FAST, **ports, "data_dir": str(tmp_path / "data")}))  # JSON is YAML
    driver = [sys.executable, str(Path(__file__).with_name("daemon_driver.py")), str(config)]
    env = {**os.environ, "PYTHONPATH": str(Path.cwd())}
    data = tmp_path / "data"
    proc = subprocess.Popen([*driver, "--force-root"], env=env)
    try:
        state = _wait(lambda s: s.root_rotation is not None and s.root_rotation.phase == kill_in, data, 30)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        proc.kill()
    new_root = state.of_kind(CAKind.ROOT, SlotState.PREPARED) or state.of_kind(CAKind.ROOT, SlotState.ACTIVE)
    expected = fingerprint(new_root[0].cert)
    restarted = subprocess.Popen(driver, env=env)
    try:
        final = _wait(lambda s: s.root_rotation is None, data, 30)
    finally:
        restarted.send_signal(signal.SIGTERM)
        restarted.wait(10)
    assert [fingerprint(c) for c in final.roots] == [expected]
    assert final.active(CAKind.ROOT).key_id == new_root[0].key_id
    assert final.active(CAKind.INTERMEDIATE).parent == new_root[0].key_id
    assert final.bundle_sequence > state.bundle_sequence
