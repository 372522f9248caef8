"""The whole daemon (build_app + start): a plain SDS client, the admin API, /metrics, /readyz and the logs.

Everything runs on 127.0.0.1:0 with a tmp data dir; the side-port is found the way the CLI finds it
(``<data_dir>/sideport.address``) and the admin token is read from ``settings.admin_token_file``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from envoy.service.secret.v3 import sds_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from ca_service.app import App, build_app
from ca_service.config import load_settings
from ca_service.logs import JSONFormatter, TextFormatter
from ca_service.pki.identity import SpiffeId
from ca_service.pki.templates import CAKind
from ca_service.rotation.state import SlotState
from ca_service.web.server import ADDRESS_FILE
from tests.rpc.sds_fixtures import node, read, request, secrets_of

A_ID = SpiffeId.parse("spiffe://cluster.local/ns/default/sa/a")
B_ID = SpiffeId.parse("spiffe://cluster.local/ns/default/sa/b")
TD = "cluster.local"
Labels = tuple[tuple[str, str], ...]
Samples = dict[tuple[str, Labels], float]


def _serial(cert: x509.Certificate) -> str:
    return format(cert.serial_number, "x")


def _chain(response: Any) -> list[x509.Certificate]:
    secret = secrets_of(response)["default"]
    return x509.load_pem_x509_certificates(secret.tls_certificate.certificate_chain.inline_bytes)


def _key_pem(response: Any) -> bytes:
    return bytes(secrets_of(response)["default"].tls_certificate.private_key.inline_bytes)


@dataclass
class Stream:
    call: Any
    node_id: str
    pushed: list[Any]

    @property
    def leaf(self) -> x509.Certificate:
        return _chain(self.pushed[-1])[0]

    async def next_push(self) -> Any:
        """Read the next response and ACK it, as Envoy does."""
        response = await read(self.call)
        self.pushed.append(response)
        await self.call.write(request(["default"], version=response.version_info, nonce=response.nonce))
        return response


@dataclass
class Daemon:
    app: App
    url: str
    token: str
    session: aiohttp.ClientSession
    stub: sds_pb2_grpc.SecretDiscoveryServiceStub
    secrets: set[bytes]  # every token and private key seen in the test: none may reach a log

    async def open_default(self, sa: str) -> Stream:
        n = node(sa)
        call = self.stub.StreamSecrets()
        await call.write(request(["default"], n=n))
        stream = Stream(call, n.id, [])
        first = await stream.next_push()
        self.secrets.add(_key_pem(first))
        return stream

    async def scrape(self) -> Samples:
        async with self.session.get(f"{self.url}/metrics") as resp:
            assert resp.status == 200
            text = await resp.text()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    async def rotate(self, **body: str) -> dict[str, Any]:
        async with self.session.post(f"{self.url}/admin/v1/rotate", json=body,
                                     headers={"Authorization": f"Bearer {self.token}"}) as resp:
            doc: dict[str, Any] = await resp.json()
            assert resp.status == 200, doc
        return doc

    async def readyz(self) -> int:
        async with self.session.get(f"{self.url}/readyz") as resp:
            return resp.status

    def audit(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.app.settings.audit_log_file.read_text().splitlines()]

    def ca_expiry_expected(self) -> dict[Labels, float]:
        return {(("kind", e.kind.value), ("serial", e.serial), ("trust_domain", TD)): e.not_after.timestamp()
                for e in self.app.authority.state.entries}


def series(samples: Samples, name: str) -> dict[Labels, float]:
    return {labels: v for (n, labels), v in samples.items() if n == name}


def workload_expiry(samples: Samples, sa: str) -> float:
    labels = (("namespace", "default"), ("service_account", sa), ("trust_domain", TD))
    return series(samples, "ca_workload_certificate_expiry_timestamp_seconds")[labels]


def issued(samples: Samples, kind: str) -> float:
    return samples.get(("ca_certificates_issued_total", (("kind", kind), ("trust_domain", TD))), 0.0)


def forced(samples: Samples, kind: str) -> float:
    return samples.get(("ca_rotations_total", (("kind", kind), ("reason", "forced"))), 0.0)


@pytest.fixture
async def daemon(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> AsyncIterator[Daemon]:
    caplog.set_level(logging.DEBUG)  # root at DEBUG: every logger's records reach caplog
    settings = load_settings(environ={}, overrides={
        "data_dir": str(tmp_path / "data"), "http": {"address": "127.0.0.1:0"},
        "grpc": [{"address": "127.0.0.1:0", "trust_node_metadata": True}]})
    app = build_app(settings)
    await app.start()
    assert app.sds is not None
    url = (settings.data_dir / ADDRESS_FILE).read_text().strip()
    token = settings.admin_token_file.read_text().strip()
    secrets = {token.encode()}
    for entry in app.authority.state.entries:
        if entry.key is not None:
            secrets.add(entry.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption()))
    try:
        async with aiohttp.ClientSession() as session, grpc.aio.insecure_channel(app.sds.bound_addresses[0]) as ch:
            d = Daemon(app, url, token, session, sds_pb2_grpc.SecretDiscoveryServiceStub(ch), secrets)
            yield d
            # Key material minted during the test (a new intermediate) is checked too.
            for entry in app.authority.state.entries:
                if entry.key is not None:
                    secrets.add(entry.key.private_bytes(serialization.Encoding.PEM,
                                                        serialization.PrivateFormat.PKCS8,
                                                        serialization.NoEncryption()))
    finally:
        await app.stop()
    # caplog.records holds only the current (teardown) phase: check all three.
    records = [r for when in ("setup", "call", "teardown") for r in caplog.get_records(when)]
    _assert_no_secret_logged(records, settings.audit_log_file, secrets)


def _assert_no_secret_logged(records: list[logging.LogRecord], audit_file: Path, secrets: set[bytes]) -> None:
    assert records, "nothing was logged: the capture is not working"
    text = "\n".join(f(r) for r in records for f in (JSONFormatter().format, TextFormatter().format))
    text += "\n" + audit_file.read_text()
    assert "PRIVATE KEY" not in text
    for secret in secrets:
        value = secret.decode()
        needles = [value]
        if "PRIVATE KEY" in value:
            # The base64 body alone (a PEM logged without its armour, or one line of it).
            body = [line for line in value.splitlines() if line and not line.startswith("-----")]
            needles += ["".join(body)[:40], body[0]]
        for needle in needles:
            assert needle not in text, "secret material found in the logs"


async def test_forced_workload_rotation_pushes_a_new_svid_and_metrics_audit_and_readiness_follow(
        daemon: Daemon) -> None:
    assert await daemon.readyz() == 200
    a = await daemon.open_default("a")
    b = await daemon.open_default("b")
    old_a, old_b = a.leaf, b.leaf

    before = await daemon.scrape()
    assert series(before, "ca_certificate_expiry_timestamp_seconds") == daemon.ca_expiry_expected()
    assert len(daemon.ca_expiry_expected()) == 3  # root, intermediate, istiod intermediate
    assert workload_expiry(before, "a") == old_a.not_valid_after_utc.timestamp()
    assert workload_expiry(before, "b") == old_b.not_valid_after_utc.timestamp()
    assert before[("ca_sds_live_svids", ())] == len(daemon.app.registry) == 2
    assert forced(before, "workload") == 0

    # A refused call with a token-shaped secret: it must not be logged either.
    wrong = "wrong-" + daemon.token[::-1]
    daemon.secrets.add(wrong.encode())
    async with daemon.session.post(f"{daemon.url}/admin/v1/rotate", headers={"Authorization": f"Bearer {wrong}"},
                                   json={"scope": "workload", "spiffe_id": str(A_ID), "reason": "x"}) as resp:
        assert resp.status == 401

    doc = await daemon.rotate(scope="workload", spiffe_id=str(A_ID), reason="key compromise drill")
    assert doc["affected_serials"] == [_serial(old_a)]

    pushed = await a.next_push()  # bounded wait (READ_TIMEOUT): the push must come without polling
    daemon.secrets.add(_key_pem(pushed))
    new_a = _chain(pushed)[0]
    assert pushed.version_info != a.pushed[0].version_info
    assert new_a.serial_number != old_a.serial_number
    assert doc["new_serials"] == [_serial(new_a)]
    held = daemon.app.registry.get(a.node_id, A_ID)
    assert held is not None and held.svid.leaf.serial_number == new_a.serial_number

    line = daemon.audit()[-1]
    assert (line["action"], line["scope"], line["result"]) == ("rotate", "workload", "ok")
    assert line["affected_serials"] == [_serial(old_a)] and line["new_serials"] == [_serial(new_a)]
    assert line["reason"] == "key compromise drill"
    assert [entry["result"] for entry in daemon.audit()] == ["unauthenticated", "ok"]

    after = await daemon.scrape()
    assert workload_expiry(after, "a") == new_a.not_valid_after_utc.timestamp()
    assert workload_expiry(after, "b") == old_b.not_valid_after_utc.timestamp()  # b was not rotated
    assert series(after, "ca_certificate_expiry_timestamp_seconds") == daemon.ca_expiry_expected()
    assert forced(after, "workload") == 1
    assert after[("ca_sds_live_svids", ())] == len(daemon.app.registry) == 2

    # Readiness turns 503 before the gRPC listener starts stopping (the side-port stops last).
    assert await daemon.readyz() == 200
    sds = daemon.app.sds
    assert sds is not None
    seen: list[int] = []
    original_stop = sds.stop

    async def stop_sds() -> None:
        seen.append(await daemon.readyz())
        await original_stop()

    sds.stop = stop_sds  # type: ignore[method-assign]
    a.call.cancel()
    b.call.cancel()
    await daemon.app.stop()
    assert seen == [503]


async def test_forced_intermediate_rotation_activates_a_new_intermediate_that_signs_the_next_svid(
        daemon: Daemon) -> None:
    a = await daemon.open_default("a")
    old_leaf = a.leaf
    state = daemon.app.authority.state
    old_int = state.active(CAKind.INTERMEDIATE)
    assert _chain(a.pushed[0])[1].serial_number == old_int.cert.serial_number

    doc = await daemon.rotate(scope="intermediate", reason="planned drill")
    assert doc["affected_serials"] == [old_int.serial]
    state = daemon.app.authority.state
    new_int = state.active(CAKind.INTERMEDIATE)
    assert new_int.serial != old_int.serial and doc["new_serials"] == [new_int.serial]
    # Per the README ("Rotation") the old one is kept (state old) until its leaves expire.
    assert [e.serial for e in state.of_kind(CAKind.INTERMEDIATE, SlotState.OLD)] == [old_int.serial]

    line = daemon.audit()[-1]
    assert (line["scope"], line["result"], line["affected_serials"]) == ("intermediate", "ok", [old_int.serial])

    after = await daemon.scrape()
    expected = daemon.ca_expiry_expected()
    assert series(after, "ca_certificate_expiry_timestamp_seconds") == expected
    assert {labels[1][1] for labels in expected if labels[0][1] == "intermediate"} == {old_int.serial,
                                                                                       new_int.serial}
    assert forced(after, "intermediate") == 1
    assert issued(after, "intermediate") == 1  # minted by the rotation (bootstrap is not a rotation)
    # The live SVID is not re-issued by an intermediate rotation: it stays valid under the old one.
    assert workload_expiry(after, "a") == old_leaf.not_valid_after_utc.timestamp()
    assert forced(after, "workload") == 0

    # The next push on the stream is the one the workload rotation causes (had the intermediate
    # rotation pushed anything, this read would return that instead), and the new intermediate signs it.
    doc = await daemon.rotate(scope="workload", spiffe_id=str(A_ID), reason="pick up the new intermediate")
    pushed = await a.next_push()
    daemon.secrets.add(_key_pem(pushed))
    leaf, issuer = _chain(pushed)[:2]
    assert doc["affected_serials"] == [_serial(old_leaf)] and doc["new_serials"] == [_serial(leaf)]
    assert issuer.serial_number == new_int.cert.serial_number
    leaf.verify_directly_issued_by(new_int.cert)
    final = await daemon.scrape()
    assert workload_expiry(final, "a") == leaf.not_valid_after_utc.timestamp()
    assert final[("ca_sds_live_svids", ())] == len(daemon.app.registry) == 1
    assert issued(final, "workload") == 2 == final[("ca_signing_duration_seconds_count", ())]
    a.call.cancel()
