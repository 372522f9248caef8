"""The admin status report: the chain, every CA certificate and its slot, next rotations, SDS, bundles."""

from __future__ import annotations

import datetime as dt
from typing import Any

from prometheus_client.metrics import MetricWrapperBase

from ca_service.pki.templates import CAKind
from ca_service.rotation import compromise
from ca_service.rotation.state import AuthorityState
from ca_service.services.authority import Authority
from ca_service.services.reports import certificate_report, entry_report
from ca_service.services.trust import TrustStore
from ca_service.services.workloads import WorkloadRegistry
from ca_service.telemetry import Telemetry


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat()


def _samples(metric: MetricWrapperBase, label: str) -> dict[str, float]:
    """Current values of a labelled gauge by one label (the rotation engine and SDS own these gauges)."""
    out: dict[str, float] = {}
    for family in metric.collect():
        for sample in family.samples:
            if label in sample.labels and not sample.name.endswith("_created"):
                out[sample.labels[label]] = sample.value
    return out


def _tainted(state: AuthorityState, registry: WorkloadRegistry | None) -> list[dict[str, Any]]:
    """Tainted CAs still in the state, and how many live SVIDs still chain to each (the runbook's progress)."""
    out = []
    for key_id, mark in compromise.tainted(state).items():
        entry = compromise.find_entry(state, key_id)
        under = compromise.subtree_key_ids(state, entry)
        since, _, reason = mark.partition(" ")
        live = sum(1 for c in registry if c.svid.issuer_key_id in under) if registry is not None else 0
        out.append({"key_id": key_id, "kind": str(entry.kind), "serial": entry.serial, "state": str(entry.state),
                    "since": since, "reason": reason, "live_svids": live})
    return out


def status_report(authority: Authority, telemetry: Telemetry, *, trust: TrustStore | None = None,
                  registry: WorkloadRegistry | None = None) -> dict[str, Any]:
    now = authority.clock.now()
    state = authority.state
    signer = state.active(CAKind.INTERMEDIATE)
    rotation = state.root_rotation
    next_rotations = {kind: _iso(ts) for kind, ts in _samples(telemetry.next_rotation, "kind").items() if ts > 0}
    if registry is not None and (renewal := registry.next_renewal()) is not None:
        next_rotations["workload"] = renewal.isoformat()
    bundles = trust.bundles() if trust is not None else {state.trust_domain: state.bundle()}
    return {
        "time": now.isoformat(),
        "trust_domain": state.trust_domain.name,
        "mode": state.mode.value,
        "revision": state.revision,
        # What a leaf issued now chains through: signer first, root last.
        "chain": [certificate_report(c, now) for c in (signer.cert, *state.chain_above(signer))],
        "certificates": [entry_report(e, now) for e in state.entries],
        "root_rotation": None if rotation is None else {
            "phase": rotation.phase.value, "started_at": rotation.started_at.isoformat(),
            "phase_since": rotation.phase_since.isoformat(), "reason": rotation.reason},
        "next_rotations": next_rotations,
        "sds": {"streams": {api: int(v) for api, v in _samples(telemetry.sds_streams, "api").items()},
                "live_svids": len(registry) if registry is not None else 0,
                "identities": len({c.spiffe_id for c in registry}) if registry is not None else 0},
        "tainted": _tainted(state, registry),
        "bundles": {td.name: {"sequence": b.sequence, "roots": [certificate_report(c, now) for c in b.roots]}
                    for td, b in bundles.items()},
    }
