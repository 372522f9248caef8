"""The issuance ledger through the admin API and `ca-service admin certificates`, on an in-process daemon."""

from __future__ import annotations

import asyncio
import json
import ssl
import subprocess
import sys
from pathlib import Path

import grpc
from cryptography import x509
from envoy.service.secret.v3 import sds_pb2_grpc

from ca_service.app import App, build_app
from ca_service.config import Settings, load_settings
from ca_service.federation.endpoint import BundleEndpoint
from tests.rpc.sds_fixtures import node, request

ROOT = Path(__file__).resolve().parents[2]


def _cli(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ca_service", "--data-dir", str(data_dir), "admin", "certificates",
                           *args], capture_output=True, text=True, timeout=30, cwd=ROOT)


def _settings(data_dir: Path) -> Settings:
    return load_settings(environ={}, overrides={
        "data_dir": str(data_dir), "ca": {"signing_workers": 0}, "http": {"address": "127.0.0.1:0"},
        "grpc": [{"address": "127.0.0.1:0", "trust_node_metadata": True}],
        "bundle_endpoint": {"address": "127.0.0.1:0"}})


async def _fetch(app: App, *service_accounts: str) -> None:
    assert app.sds is not None
    async with grpc.aio.insecure_channel(app.sds.bound_addresses[0]) as channel:
        stub = sds_pb2_grpc.SecretDiscoveryServiceStub(channel)
        for sa in service_accounts:
            await stub.FetchSecrets(request(["default"], n=node(sa, "shop")), timeout=10)


async def test_certificates_issued_over_sds_are_listed_and_filtered_by_the_cli(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    settings = _settings(data_dir)
    app = build_app(settings)
    await app.start()
    try:
        await _fetch(app, "frontend", "backend")
        everything = await asyncio.to_thread(_cli, data_dir, "--namespace", "shop", "--json")
        assert everything.returncode == 0, everything.stderr
        doc = json.loads(everything.stdout)
        assert sorted(c["spiffe_id"] for c in doc["certificates"]) == [
            "spiffe://cluster.local/ns/shop/sa/backend", "spiffe://cluster.local/ns/shop/sa/frontend"]
        assert {c["path"] for c in doc["certificates"]} == {"sds"}
        one = json.loads((await asyncio.to_thread(_cli, data_dir, "--service-account", "backend", "--json")).stdout)
        assert [c["spiffe_id"] for c in one["certificates"]] == ["spiffe://cluster.local/ns/shop/sa/backend"]
        issuer = one["certificates"][0]["issuer"]
        none = json.loads((await asyncio.to_thread(_cli, data_dir, "--namespace", "other", "--json")).stdout)
        assert none["matched"] == 0
        by_issuer = json.loads((await asyncio.to_thread(_cli, data_dir, "--issuer", issuer, "--json")).stdout)
        # The two SDS SVIDs and the bundle endpoint's serving certificate, all under the one intermediate.
        assert sorted(c["path"] for c in by_issuer["certificates"]) == ["sds", "sds", "serving"]
        text = await asyncio.to_thread(_cli, data_dir, "--namespace", "shop")
        assert "2 live certificate(s) matched" in text.stdout
    finally:
        await app.stop()


async def test_a_cli_issued_certificate_is_listed_and_the_list_survives_a_restart(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    settings = _settings(data_dir)
    app = build_app(settings)
    await app.start()
    try:
        await _fetch(app, "frontend")
        issued = await asyncio.to_thread(subprocess.run, [
            sys.executable, "-m", "ca_service", "--data-dir", str(data_dir), "issue", "--json",
            "--spiffe-id", "spiffe://cluster.local/ns/ops/sa/debug", "--out", str(tmp_path / "out")],
            capture_output=True, text=True, timeout=30, cwd=ROOT)
        assert issued.returncode == 0, issued.stderr
        serial = json.loads(issued.stdout)["serial"]
        listed = json.loads((await asyncio.to_thread(_cli, data_dir, "--json")).stdout)["certificates"]
        (cli,) = [c for c in listed if c["path"] == "cli"]
        assert (cli["serial"], cli["spiffe_id"], cli["method"]) == (serial, "spiffe://cluster.local/ns/ops/sa/debug",
                                                                    "local")
        before = sorted((c["serial"], c["path"]) for c in listed)
        assert [p for _, p in before].count("sds") == 1
        assert [p for _, p in before].count("serving") == 1  # the bundle endpoint's
    finally:
        await app.stop()
    again = build_app(settings)
    await again.start()
    try:
        listed = json.loads((await asyncio.to_thread(_cli, data_dir, "--json")).stdout)["certificates"]
        # Everything from before, plus the serving certificate the restarted bundle endpoint was issued.
        after = sorted((c["serial"], c["path"]) for c in listed)
        assert set(before) < set(after)
        assert [p for _, p in set(after) - set(before)] == ["serving"]
    finally:
        await again.stop()


async def test_the_serving_certificate_a_listener_presents_is_in_the_audit(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    app = build_app(_settings(data_dir))
    await app.start()
    try:
        (endpoint,) = [c for c in app.components if isinstance(c, BundleEndpoint)]
        pem = await asyncio.to_thread(ssl.get_server_certificate, ("127.0.0.1", endpoint.port), timeout=10)
        presented = format(x509.load_pem_x509_certificate(pem.encode()).serial_number, "x")
        listed = json.loads((await asyncio.to_thread(_cli, data_dir, "--json")).stdout)["certificates"]
        (serving,) = [c for c in listed if c["path"] == "serving"]
        assert (serving["serial"], serving["spiffe_id"], serving["caller"], serving["method"]) == (
            presented, str(endpoint.spiffe_id), "ca-service", "internal")
    finally:
        await app.stop()
