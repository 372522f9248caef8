"""HTTPS with client certificates issued by our own CA, and the health endpoints."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from ca_service.pki.certs import certs_to_pem
from ca_service.pki.identity import SpiffeId
from ca_service.pki.keys import generate_private_key, private_key_to_pem

from .conftest import ADMIN_ID, Daemon, start_daemon, web_settings


@pytest.fixture
async def tls_daemon(tmp_path: Path) -> AsyncIterator[Daemon]:
    d = await start_daemon(web_settings(tmp_path, tls={"enabled": True}))
    try:
        yield d
    finally:
        await d.session.close()
        await d.sideport.stop()


def client_context(d: Daemon, tmp_path: Path, spiffe_id: str | None) -> ssl.SSLContext:
    roots = certs_to_pem(d.authority.state.roots).decode()
    ctx = ssl.create_default_context(cafile=None, cadata=roots)
    ctx.check_hostname = False  # the side-port's SVID names a SPIFFE ID, not a host
    if spiffe_id is not None:
        key = generate_private_key()
        svid = d.authority.issue_svid(SpiffeId.parse(spiffe_id), key.public_key())
        cert_file, key_file = tmp_path / "client.pem", tmp_path / "client-key.pem"
        cert_file.write_bytes(certs_to_pem(svid.chain))
        key_file.write_bytes(private_key_to_pem(key))
        ctx.load_cert_chain(cert_file, key_file)
    return ctx


async def call(d: Daemon, ctx: ssl.SSLContext, path: str = "/admin/v1/status") -> tuple[int, dict[str, object]]:
    async with aiohttp.ClientSession() as s, s.get(f"{d.url}{path}", ssl=ctx) as resp:
        return resp.status, await resp.json()


async def test_a_client_cert_with_an_allowed_spiffe_id_is_admitted(tls_daemon: Daemon, tmp_path: Path) -> None:
    assert tls_daemon.url.startswith("https://")
    status, doc = await call(tls_daemon, client_context(tls_daemon, tmp_path, ADMIN_ID))
    assert status == 200 and doc["trust_domain"] == "cluster.local"
    assert '"caller": "spiffe://cluster.local/ns/ops/sa/sre"' in tls_daemon.audit_lines()[-1]


async def test_if_the_client_spiffe_id_is_not_allowed_should_answer_403(tls_daemon: Daemon, tmp_path: Path) -> None:
    status, doc = await call(tls_daemon, client_context(tls_daemon, tmp_path, "spiffe://cluster.local/ns/shop/sa/web"))
    assert (status, doc) == (403, {"error": "forbidden"})
    assert '"result": "forbidden"' in tls_daemon.audit_lines()[-1]


async def test_over_tls_without_client_cert_or_token_should_answer_401(tls_daemon: Daemon, tmp_path: Path) -> None:
    status, _ = await call(tls_daemon, client_context(tls_daemon, tmp_path, None))
    assert status == 401
    async with aiohttp.ClientSession() as s, s.get(f"{tls_daemon.url}/metrics",
                                                   ssl=client_context(tls_daemon, tmp_path, None)) as resp:
        assert resp.status == 200  # metrics need no client certificate


async def test_healthz_is_alive_and_readyz_turns_false_first_on_shutdown(daemon: Daemon) -> None:
    async with daemon.session.get(f"{daemon.url}/healthz") as resp:
        assert resp.status == 200
    async with daemon.session.get(f"{daemon.url}/readyz?verbose") as resp:
        assert resp.status == 200 and (await resp.json())["ready"] is True
    daemon.sideport.begin_shutdown()
    async with daemon.session.get(f"{daemon.url}/readyz") as resp:
        assert resp.status == 503 and "not_shutting_down" in await resp.text()
    async with daemon.session.get(f"{daemon.url}/healthz") as resp:
        assert resp.status == 200


async def test_readyz_fails_while_a_registered_check_fails(daemon: Daemon) -> None:
    serving = False
    daemon.sideport.readiness.add_check("grpc_serving", lambda: serving)
    async with daemon.session.get(f"{daemon.url}/readyz") as resp:
        assert resp.status == 503 and "grpc_serving" in await resp.text()
    serving = True
    async with daemon.session.get(f"{daemon.url}/readyz") as resp:
        assert resp.status == 200
