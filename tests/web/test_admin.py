"""Admin API: authentication, validation, dry runs and the audit log, against a running side-port."""

from __future__ import annotations

import json
import logging
import os
import stat

import pytest

from ca_service.pki.templates import CAKind

from .conftest import Daemon, sa

ROTATE = "/admin/v1/rotate"
STATUS = "/admin/v1/status"


@pytest.mark.parametrize(("headers", "case"), [
    ({}, "no token"),
    ({"Authorization": "Bearer not-the-token"}, "wrong token"),
    ({"Authorization": "Basic Zm9vOmJhcg=="}, "wrong scheme"),
])
async def test_if_authentication_fails_should_answer_401_and_do_nothing(daemon: Daemon, headers: dict[str, str],
                                                                        case: str) -> None:
    cert = daemon.registry.get_or_issue("node-a", sa("shop", "web"))
    for method, path in (("GET", STATUS), ("POST", ROTATE)):
        resp = await daemon.session.request(method, f"{daemon.url}{path}", headers=headers,
                                            json={"scope": "all-workloads", "reason": "x"})
        assert resp.status == 401, case
        assert (await resp.json()) == {"error": "unauthorized"}
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert daemon.rotator.requests == []
    assert daemon.registry.get("node-a", sa("shop", "web")) == cert
    lines = [json.loads(line) for line in daemon.audit_lines()]
    assert [(r["action"], r["result"], r["caller"]) for r in lines] == [
        ("status", "unauthenticated", "anonymous"), ("rotate", "unauthenticated", "anonymous")]


@pytest.mark.parametrize(("body", "field"), [
    (b"{not json", "body"),
    (b"[1, 2]", "body"),
    (json.dumps({"scope": "everything", "reason": "x"}).encode(), "scope"),
    (json.dumps({"reason": "x"}).encode(), "scope"),
    (json.dumps({"scope": "all-workloads"}).encode(), "reason"),
    (json.dumps({"scope": "all-workloads", "reason": "  "}).encode(), "reason"),
    (json.dumps({"scope": "workload", "reason": "x"}).encode(), "spiffe_id"),
    (json.dumps({"scope": "workload", "reason": "x", "spiffe_id": "http://x/y"}).encode(), "spiffe_id"),
    (json.dumps({"scope": "workload", "reason": "x", "spiffe_id": "spiffe://other.td/ns/a/sa/b"}).encode(),
     "spiffe_id"),
    (json.dumps({"scope": "all-workloads", "reason": "x", "spiffe_id": "spiffe://cluster.local/a"}).encode(),
     "spiffe_id"),
    (json.dumps({"scope": "namespace", "reason": "x"}).encode(), "namespace"),
    (json.dumps({"scope": "namespace", "reason": "x", "namespace": "Not_A_NS"}).encode(), "namespace"),
    (json.dumps({"scope": "root", "reason": "x", "dry_run": "yes"}).encode(), "dry_run"),
    (json.dumps({"scope": "root", "reason": "x", "force": True}).encode(), "force"),
])
async def test_if_the_body_is_malformed_should_answer_400_naming_the_field(daemon: Daemon, body: bytes,
                                                                           field: str) -> None:
    resp = await daemon.session.post(f"{daemon.url}{ROTATE}", headers=daemon.auth(), data=body)
    doc = await resp.json()
    assert resp.status == 400
    assert doc["field"] == field and field in doc["error"]
    assert daemon.rotator.requests == []
    (line,) = daemon.audit_lines()
    assert json.loads(line)["result"] == "invalid"


async def test_a_dry_run_reports_what_would_rotate_and_changes_nothing(daemon: Daemon) -> None:
    certs = [daemon.registry.get_or_issue(n, sa("shop", "web")) for n in ("a", "b")]
    other = daemon.registry.get_or_issue("c", sa("pay", "api"))
    revision = daemon.authority.state.revision
    resp = await daemon.session.post(f"{daemon.url}{ROTATE}", headers=daemon.auth(),
                                     json={"scope": "namespace", "namespace": "shop", "dry_run": True,
                                           "reason": "what if"})
    doc = await resp.json()
    assert resp.status == 200
    assert doc["dry_run"] is True and doc["new_serials"] == []
    assert sorted(doc["affected_serials"]) == sorted(f"{c.svid.leaf.serial_number:x}" for c in certs)
    assert [daemon.registry.get(c.node_id, c.spiffe_id) for c in [*certs, other]] == [*certs, other]
    assert daemon.authority.state.revision == revision
    (line,) = daemon.audit_lines()
    record = json.loads(line)
    assert record["result"] == "dry-run" and record["scope"] == "namespace" and record["reason"] == "what if"


async def test_every_call_writes_one_audit_line_with_caller_action_scope_reason_result_serials(
        daemon: Daemon) -> None:
    cert = daemon.registry.get_or_issue("node-a", sa("shop", "web"))
    await daemon.session.get(f"{daemon.url}{STATUS}", headers=daemon.auth())
    resp = await daemon.session.post(f"{daemon.url}{ROTATE}", headers=daemon.auth(),
                                     json={"scope": "workload", "spiffe_id": str(sa("shop", "web")),
                                           "reason": "leaked key"})
    new = daemon.registry.get("node-a", sa("shop", "web"))
    assert resp.status == 200 and new is not None and new != cert
    await daemon.session.get(f"{daemon.url}{STATUS}")
    records = [json.loads(line) for line in daemon.audit_lines()]
    assert len(records) == 3
    assert [(r["caller"], r["action"], r["result"]) for r in records] == [
        ("token", "status", "ok"), ("token", "rotate", "ok"), ("anonymous", "status", "unauthenticated")]
    rotate = records[1]
    assert rotate["scope"] == "workload" and rotate["reason"] == "leaked key"
    assert rotate["affected_serials"] == [f"{cert.svid.leaf.serial_number:x}"]
    assert rotate["new_serials"] == [f"{new.svid.leaf.serial_number:x}"]
    assert all("time" in r for r in records)
    assert stat.S_IMODE(os.stat(daemon.settings.audit_log_file).st_mode) == 0o600


async def test_status_reports_chain_certificates_bundles_and_sds(daemon: Daemon) -> None:
    daemon.registry.get_or_issue("node-a", sa("shop", "web"))
    daemon.telemetry.sds_streams.labels("sotw").set(2)
    resp = await daemon.session.get(f"{daemon.url}{STATUS}", headers=daemon.auth())
    doc = await resp.json()
    assert resp.status == 200
    state = daemon.authority.state
    assert {(c["kind"], c["state"], c["serial"]) for c in doc["certificates"]} == {
        (e.kind.value, e.state.value, e.serial) for e in state.entries}
    assert [c["serial"] for c in doc["chain"]] == [state.active(CAKind.INTERMEDIATE).serial,
                                                   state.active(CAKind.ROOT).serial]
    assert doc["sds"] == {"streams": {"sotw": 2}, "live_svids": 1, "identities": 1}
    assert doc["bundles"]["cluster.local"]["sequence"] == state.bundle_sequence
    assert "workload" in doc["next_rotations"]


async def test_no_token_or_key_appears_in_logs_or_audit(daemon: Daemon, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    daemon.registry.get_or_issue("node-a", sa("shop", "web"))
    token = daemon.token
    await daemon.session.get(f"{daemon.url}{STATUS}", headers=daemon.auth())
    await daemon.session.get(f"{daemon.url}{STATUS}", headers=daemon.auth(token + "x"))
    await daemon.session.post(f"{daemon.url}{ROTATE}", headers=daemon.auth(),
                              json={"scope": "all-workloads", "reason": "drill"})
    everything = caplog.text + "\n".join(daemon.audit_lines())
    assert token not in everything and token[:12] not in everything
    assert "PRIVATE KEY" not in everything
    assert stat.S_IMODE(os.stat(daemon.settings.admin_token_file).st_mode) == 0o600
