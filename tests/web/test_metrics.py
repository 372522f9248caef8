"""/metrics scraped from a running side-port, checked against the certificates actually issued."""

from __future__ import annotations

from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from ca_service.config import load_settings
from ca_service.pki.templates import CAKind

from .conftest import Daemon, sa, start_daemon

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(d: Daemon, accept: str | None = None) -> tuple[Samples, str]:
    headers = {"Accept": accept} if accept else {}
    async with d.session.get(f"{d.url}/metrics", headers=headers) as resp:
        assert resp.status == 200
        text = await resp.text()
        ctype = resp.headers["Content-Type"]
    samples: Samples = {}
    if accept is None:
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples, ctype


def series(samples: Samples, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {labels: v for (n, labels), v in samples.items() if n == name}


async def test_ca_expiry_gauge_has_one_series_per_ca_certificate_with_its_not_after(daemon: Daemon) -> None:
    samples, ctype = await scrape(daemon)
    assert ctype.startswith("text/plain")
    expiry = series(samples, "ca_certificate_expiry_timestamp_seconds")
    expected = {(("kind", e.kind.value), ("serial", e.serial), ("trust_domain", "cluster.local")):
                e.not_after.timestamp() for e in daemon.authority.state.entries}
    assert expiry == expected
    assert len(expected) == 3


async def test_workload_gauge_is_the_earliest_leaf_not_after_per_identity_before_and_after_rotation(
        daemon: Daemon) -> None:
    first = daemon.registry.get_or_issue("node-a", sa("shop", "web"))
    second = daemon.registry.get_or_issue("node-b", sa("shop", "web"))
    daemon.registry.get_or_issue("node-c", sa("pay", "api"))
    samples, _ = await scrape(daemon)
    web = (("namespace", "shop"), ("service_account", "web"), ("trust_domain", "cluster.local"))
    earliest = min(first.svid.leaf.not_valid_after_utc, second.svid.leaf.not_valid_after_utc)
    assert series(samples, "ca_workload_certificate_expiry_timestamp_seconds")[web] == earliest.timestamp()
    assert len(series(samples, "ca_workload_certificate_expiry_timestamp_seconds")) == 2
    assert samples[("ca_sds_live_svids", ())] == 3

    resp = await daemon.session.post(f"{daemon.url}/admin/v1/rotate", headers=daemon.auth(),
                                     json={"scope": "workload", "spiffe_id": str(sa("shop", "web")),
                                           "reason": "test"})
    assert resp.status == 200
    after, _ = await scrape(daemon)
    leaves = [daemon.registry.get(n, sa("shop", "web")) for n in ("node-a", "node-b")]
    assert all(c is not None and c.generation == 2 for c in leaves)
    new_earliest = min(c.svid.leaf.not_valid_after_utc for c in leaves if c is not None)
    assert series(after, "ca_workload_certificate_expiry_timestamp_seconds")[web] == new_earliest.timestamp()
    assert new_earliest >= earliest


async def test_intermediate_rotation_adds_the_new_series_and_removes_the_pruned_one(daemon: Daemon) -> None:
    old = daemon.authority.state.active(CAKind.INTERMEDIATE)
    resp = await daemon.session.post(f"{daemon.url}/admin/v1/rotate", headers=daemon.auth(),
                                     json={"scope": "intermediate", "reason": "compromise drill"})
    body = await resp.json()
    assert resp.status == 200, body
    new = daemon.authority.state.active(CAKind.INTERMEDIATE)
    samples, _ = await scrape(daemon)
    serials = {dict(labels)["serial"]: v for labels, v in
               series(samples, "ca_certificate_expiry_timestamp_seconds").items()}
    assert old.serial not in serials
    assert serials[new.serial] == new.not_after.timestamp()
    assert body["affected_serials"] == [old.serial] and body["new_serials"] == [new.serial]
    assert samples[("ca_state_revision", ())] == daemon.authority.state.revision


async def test_bundle_gauges_info_and_openmetrics(daemon: Daemon) -> None:
    samples, _ = await scrape(daemon)
    td = (("trust_domain", "cluster.local"),)
    assert series(samples, "ca_trust_bundle_roots") == {td: 1}
    assert series(samples, "ca_trust_bundle_sequence") == {td: daemon.authority.state.bundle_sequence}
    assert series(samples, "ca_info") == {(("mode", "self-signed"), ("trust_domain", "cluster.local")): 1}
    _, ctype = await scrape(daemon, accept="application/openmetrics-text; version=1.0.0")
    assert ctype.startswith("application/openmetrics-text")


async def test_workload_series_are_capped_while_the_aggregates_count_every_live_svid(tmp_path: Path) -> None:
    settings = load_settings(environ={}, overrides={
        "data_dir": str(tmp_path / "data"), "ca": {"workload_ttl": "5h", "max_workload_ttl": "5h"},
        "http": {"address": "127.0.0.1:0", "metrics": {"max_identity_series": 5}}})
    d = await start_daemon(settings)
    try:
        certs = [d.registry.get_or_issue(f"node-{i}", sa(f"ns-{i % 3}", f"sa-{i}")) for i in range(40)]
        samples, _ = await scrape(d)
    finally:
        await d.session.close()
        await d.sideport.stop()
    per_identity = series(samples, "ca_workload_certificate_expiry_timestamp_seconds")
    assert len(per_identity) == 5
    assert len(series(samples, "ca_workload_certificate_issued_timestamp_seconds")) == 5
    soonest = sorted(c.svid.not_after.timestamp() for c in certs)[:5]
    assert sorted(per_identity.values()) == soonest
    assert samples[("ca_sds_live_svids", ())] == 40
    assert samples[("ca_workload_svids_expiring", (("within", "6h"),))] == 40
    assert samples[("ca_workload_svids_expiring", (("within", "1h"),))] == 0
    by_ns = series(samples, "ca_workload_namespace_earliest_expiry_timestamp_seconds")
    assert by_ns == {(("namespace", f"ns-{k}"), ("trust_domain", "cluster.local")):
                     min(c.svid.not_after.timestamp() for i, c in enumerate(certs) if i % 3 == k) for k in range(3)}


async def test_a_forgotten_workload_leaves_the_aggregates(daemon: Daemon) -> None:
    daemon.registry.get_or_issue("node-a", sa("shop", "web"))
    daemon.registry.get_or_issue("node-b", sa("pay", "api"))
    daemon.registry.reissue("node-b", sa("pay", "api"), reason="test")  # replaces, does not add
    daemon.registry.forget("node-a", sa("shop", "web"))
    samples, _ = await scrape(daemon)
    assert samples[("ca_sds_live_svids", ())] == 1
    assert samples[("ca_workload_identities", ())] == 1
    assert set(series(samples, "ca_workload_namespace_earliest_expiry_timestamp_seconds")) == {
        (("namespace", "pay"), ("trust_domain", "cluster.local"))}
