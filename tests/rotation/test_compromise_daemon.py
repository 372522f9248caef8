"""Taint and revoke through the real daemon's admin API (issue 15, item 12): authenticated, audited,
dry-run first; a tainted intermediate stops signing at once and every live SVID under it is re-issued on
the signing pool; revoke refuses while anything may still depend on the CA unless forced; a tainted root
starts an emergency rotation even while an earlier one retires."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from ca_service.app import App, build_app
from ca_service.config import load_settings
from ca_service.pki.identity import SpiffeId
from ca_service.pki.templates import CAKind
from ca_service.rotation.state import RootRotationPhase, SlotState
from ca_service.services.ports import RotationRequest, RotationScope

SVIDS = 20  # above the pool's batch threshold: the re-issue runs on the signing pool


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[App]:
    settings = load_settings(environ={}, overrides={
        "data_dir": str(tmp_path / "data"), "http": {"address": "127.0.0.1:0"}, "ca": {"signing_workers": 2},
        "bundle_endpoint": {"enabled": False}, "grpc": [{"address": "127.0.0.1:0"}],
        "rotation": {"root_min_propagation": "100ms", "reissue_window": "100ms"}})
    daemon = build_app(settings)
    await daemon.start()
    try:
        yield daemon
    finally:
        await daemon.stop()


async def admin(app: App, path: str, body: dict[str, Any] | None = None, *, token: str | None = None
                ) -> tuple[int, dict[str, Any]]:
    token = token if token is not None else app.settings.admin_token_file.read_text().strip()
    url = app.sideport_url + path  # type: ignore[attr-defined]
    async with aiohttp.ClientSession() as session:
        method = session.post if body is not None else session.get
        async with method(url, json=body, headers={"Authorization": f"Bearer {token}"}) as response:
            return response.status, await response.json()


def audit(app: App) -> list[dict[str, Any]]:
    return [json.loads(line) for line in app.settings.audit_log_file.read_text().splitlines()]


def fleet(app: App) -> None:
    for i in range(SVIDS):
        app.registry.get_or_issue(f"node-{i}", SpiffeId.parse(f"spiffe://cluster.local/ns/shop/sa/s{i}"))


@pytest.fixture(autouse=True)
def sideport_url(app: App) -> None:
    sideport = next(c for c in app.components if c.name == "http")
    app.sideport_url = sideport.url  # type: ignore[attr-defined]


async def test_a_dry_run_taint_says_what_would_happen_and_changes_nothing(app: App) -> None:
    fleet(app)
    signer = app.authority.state.active(CAKind.INTERMEDIATE)
    revision = app.authority.state.revision
    status, doc = await admin(app, "/admin/v1/taint", {"key_id": signer.key_id, "reason": "drill", "dry_run": True})
    assert status == 200, doc
    assert doc["dry_run"] and len(doc["svids"]) == SVIDS and "never sign again" in doc["detail"]
    assert app.authority.state.revision == revision
    assert audit(app)[-1]["action"] == "taint" and audit(app)[-1]["result"] == "dry-run"


async def test_a_tainted_intermediate_stops_signing_and_every_svid_under_it_is_reissued(app: App) -> None:
    fleet(app)
    leaked = app.authority.state.active(CAKind.INTERMEDIATE)
    status, doc = await admin(app, "/admin/v1/taint", {"key_id": leaked.key_id, "reason": "key on a laptop"})
    assert status == 200, doc
    new_signer = app.authority.state.active(CAKind.INTERMEDIATE).key_id
    assert new_signer != leaked.key_id
    assert {c.svid.issuer_key_id for c in app.registry} == {new_signer}, "an SVID still chains to the leaked key"
    status, report = await admin(app, "/admin/v1/status")
    [mark] = report["tainted"]
    assert mark["key_id"] == leaked.key_id and mark["live_svids"] == 0 and mark["reason"] == "key on a laptop"
    assert audit(app)[-2]["action"] == "taint" and audit(app)[-2]["result"] == "ok"


async def test_revoke_refuses_while_leaves_may_depend_on_the_ca_and_force_removes_it(app: App) -> None:
    leaked = app.authority.state.active(CAKind.INTERMEDIATE)
    assert (await admin(app, "/admin/v1/taint", {"key_id": leaked.key_id, "reason": "leak"}))[0] == 200
    status, doc = await admin(app, "/admin/v1/revoke", {"key_id": leaked.key_id, "reason": "leak"})
    assert status == 403 and audit(app)[-1]["result"] == "forbidden"
    assert any(e.key_id == leaked.key_id for e in app.authority.state.entries)
    status, doc = await admin(app, "/admin/v1/revoke", {"key_id": leaked.key_id, "reason": "leak", "dry_run": True})
    assert status == 200 and doc["breaks"], doc
    status, doc = await admin(app, "/admin/v1/revoke", {"key_id": leaked.key_id, "reason": "leak", "force": True})
    assert status == 200, doc
    assert "revoked despite" in doc["detail"]
    assert all(e.key_id != leaked.key_id for e in app.authority.state.entries)


@pytest.mark.parametrize(("body", "expected"), [
    ({"reason": "x"}, 400), ({"key_id": "zz", "reason": "x"}, 400), ({"key_id": "ab"}, 400),
    ({"key_id": "ab", "reason": "x", "force": True}, 400),  # force is revoke's, not taint's
    ({"key_id": "ab", "reason": "x"}, 400),  # no such CA
])
async def test_a_bad_taint_request_is_refused_audited_and_changes_nothing(
        app: App, body: dict[str, Any], expected: int) -> None:
    revision = app.authority.state.revision
    status, doc = await admin(app, "/admin/v1/taint", body)
    assert status == expected and "error" in doc
    assert app.authority.state.revision == revision
    assert audit(app)[-1]["action"] == "taint" and audit(app)[-1]["result"] != "ok"


async def test_an_unauthenticated_caller_can_neither_taint_nor_revoke(app: App) -> None:
    signer = app.authority.state.active(CAKind.INTERMEDIATE)
    for action in ("taint", "revoke"):
        status, doc = await admin(app, f"/admin/v1/{action}", {"key_id": signer.key_id, "reason": "x"}, token="nope")
        assert status == 401 and doc == {"error": "unauthorized"}
    assert app.authority.state.active(CAKind.INTERMEDIATE).key_id == signer.key_id


async def test_revoking_a_ca_that_was_never_tainted_is_refused(app: App) -> None:
    root = app.authority.state.active(CAKind.ROOT)
    status, _ = await admin(app, "/admin/v1/revoke", {"key_id": root.key_id, "reason": "x", "force": True})
    assert status == 403 and "taint it first" in audit(app)[-1]["detail"]


async def test_a_tainted_root_starts_an_emergency_rotation_while_an_earlier_one_retires(app: App) -> None:
    assert app.rotator is not None and app.reconciler is not None
    await app.rotator.rotate(RotationRequest(RotationScope.ROOT, reason="scheduled drill", caller="test"))
    for _ in range(100):  # no SDS streams: only root_min_propagation (100 ms) and the re-issue window gate it
        await app.reconciler.reconcile()
        rotation = app.authority.state.root_rotation
        if rotation is not None and rotation.phase is RootRotationPhase.RETIRING:
            break
        await asyncio.sleep(0.05)
    assert app.authority.state.root_rotation is not None
    assert app.authority.state.root_rotation.phase is RootRotationPhase.RETIRING
    leaked = app.authority.state.active(CAKind.ROOT)
    status, doc = await admin(app, "/admin/v1/taint", {"key_id": leaked.key_id, "reason": "root key leaked"})
    assert status == 200, doc
    rotation = app.authority.state.root_rotation
    assert rotation is not None and rotation.phase is RootRotationPhase.PUBLISHED
    assert rotation.reason == "taint: root key leaked"
    assert len(app.authority.state.of_kind(CAKind.ROOT, SlotState.PREPARED)) == 1
