"""StreamSecrets (state of the world) against the real server with a plain gRPC client."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from envoy.extensions.transport_sockets.tls.v3 import tls_spiffe_validator_config_pb2 as spiffe_pb2
from envoy.service.secret.v3 import sds_pb2_grpc

from ca_service.pki.certs import spiffe_id_of
from ca_service.pki.identity import SpiffeId
from ca_service.pki.keys import load_private_key, private_key_to_pem
from ca_service.rpc.sds_server import SdsServicer
from tests.clock import FakeClock
from tests.rpc.sds_fixtures import SdsStack, node, peer_bundle, read, request, secrets_of
from tests.waiting import wait_for

A_ID = SpiffeId.parse("spiffe://cluster.local/ns/default/sa/a")


def leaf_of(secret) -> x509.Certificate:  # type: ignore[no-untyped-def]
    return x509.load_pem_x509_certificates(secret.tls_certificate.certificate_chain.inline_bytes)[0]


async def test_default_is_the_callers_svid_with_chain_and_pkcs8_key(stub: sds_pb2_grpc.SecretDiscoveryServiceStub):
    call = stub.StreamSecrets()
    await call.write(request(["default"], n=node("a")))
    response = await read(call)
    assert response.version_info and response.nonce
    secret = secrets_of(response)["default"]
    chain = x509.load_pem_x509_certificates(secret.tls_certificate.certificate_chain.inline_bytes)
    assert len(chain) == 2 and spiffe_id_of(chain[0]) == A_ID
    key_pem = secret.tls_certificate.private_key.inline_bytes
    assert private_key_to_pem(load_private_key(key_pem)) == key_pem  # unencrypted PKCS#8
    call.cancel()


async def test_ack_gets_no_resend_and_the_next_response_is_the_renewal_push(
        sds: SdsStack, stub: sds_pb2_grpc.SecretDiscoveryServiceStub):
    call = stub.StreamSecrets()
    await call.write(request(["default"], n=node("a")))
    first = await read(call)
    await call.write(request(["default"], version=first.version_info, nonce=first.nonce))
    node_id = node("a").id
    sds.registry.reissue(node_id, A_ID, reason="test")
    second = await read(call)  # had the ACK been answered, this would be the old certificate
    assert leaf_of(secrets_of(second)["default"]).serial_number == \
        sds.registry.get(node_id, A_ID).svid.leaf.serial_number  # type: ignore[union-attr]
    assert second.version_info != first.version_info and second.nonce != first.nonce
    call.cancel()


async def test_nack_is_counted_and_not_answered_with_a_resend(
        sds: SdsStack, stub: sds_pb2_grpc.SecretDiscoveryServiceStub):
    call = stub.StreamSecrets()
    await call.write(request(["default"], n=node("a")))
    first = await read(call)
    await call.write(request(["default"], version="", nonce=first.nonce, error="bad key"))
    # Requests are handled in order: the answer to this one shows what the NACK caused (no resend of default).
    await call.write(request(["default", "spiffe://cluster.local"], version=first.version_info, nonce=first.nonce))
    assert set(secrets_of(await read(call))) == {"spiffe://cluster.local"}
    assert sds.metric("ca_sds_nacks_total", api="sotw") == 1
    call.cancel()


async def test_a_stale_nonce_is_ignored(sds: SdsStack, stub: sds_pb2_grpc.SecretDiscoveryServiceStub):
    call = stub.StreamSecrets()
    await call.write(request(["default"], n=node("a")))
    first = await read(call)
    await call.write(request(["default", "ROOTCA"], version=first.version_info, nonce="stale"))
    await call.write(request(["default", "spiffe://cluster.local"], version=first.version_info, nonce=first.nonce))
    second = await read(call)  # requests are handled in order: a processed stale request would answer ROOTCA first
    assert set(secrets_of(second)) == {"spiffe://cluster.local"}
    call.cancel()


async def test_a_name_set_change_is_answered_for_the_added_names_only(stub: sds_pb2_grpc.SecretDiscoveryServiceStub):
    call = stub.StreamSecrets()
    await call.write(request(["default"], n=node("a")))
    first = await read(call)
    await call.write(request(["default", "ROOTCA"], version=first.version_info, nonce=first.nonce))
    second = await read(call)
    assert set(secrets_of(second)) == {"ROOTCA"}
    assert secrets_of(second)["ROOTCA"].validation_context.trusted_ca.inline_bytes.startswith(b"-----BEGIN")
    call.cancel()


async def test_empty_names_mean_everything_the_caller_may_see(stub: sds_pb2_grpc.SecretDiscoveryServiceStub):
    call = stub.StreamSecrets()
    await call.write(request([], n=node("a")))
    response = await read(call)
    assert set(secrets_of(response)) == {"default", "ROOTCA", "ALL", "spiffe://cluster.local"}
    call.cancel()


@pytest.mark.parametrize(("names", "n", "code"), [
    (["spiffe://cluster.local/ns/default/sa/other"], node("a"), grpc.StatusCode.PERMISSION_DENIED),
    (["spiffe://eu.cluster.local/ns/default/sa/a"], node("a"), grpc.StatusCode.PERMISSION_DENIED),
    (["bogus"], node("a"), grpc.StatusCode.NOT_FOUND),
    (["default"], node("a", metadata=False, node_id="not-istio"), grpc.StatusCode.UNAUTHENTICATED),
    (["default"], node("a", node_id=""), grpc.StatusCode.INVALID_ARGUMENT),
], ids=["another identity's SVID", "another trust domain's SVID", "unknown name", "node without identity",
        "node without id"])
async def test_refused_requests_get_a_status_and_never_a_certificate(
        stub: sds_pb2_grpc.SecretDiscoveryServiceStub, names: list[str], n, code: grpc.StatusCode):  # type: ignore[no-untyped-def]
    call = stub.StreamSecrets()
    await call.write(request(names, n=n))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await read(call)
    assert err.value.code() == code
    assert "BEGIN" not in (err.value.details() or "")


async def test_untrusted_listener_refuses_node_metadata(sds: SdsStack):
    async with grpc.aio.insecure_channel(sds.address(1)) as channel:
        call = sds_pb2_grpc.SecretDiscoveryServiceStub(channel).StreamSecrets()
        await call.write(request(["default"], n=node("a")))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await read(call)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert len(sds.registry) == 0  # nothing was signed
    assert sds.metric("ca_sds_requests_denied_total", reason="unauthenticated") == 1


async def test_unix_socket_listener_serves_and_has_the_configured_mode(sds: SdsStack):
    path = Path(sds.address(2).removeprefix("unix://"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    async with grpc.aio.insecure_channel(f"unix:{path}") as channel:
        call = sds_pb2_grpc.SecretDiscoveryServiceStub(channel).StreamSecrets()
        await call.write(request(["ROOTCA"], n=node("a")))
        assert "ROOTCA" in secrets_of(await read(call))
        call.cancel()


async def test_fetch_returns_the_same_svid_as_the_stream(sds: SdsStack, stub: sds_pb2_grpc.SecretDiscoveryServiceStub):
    fetched = await stub.FetchSecrets(request(["default", "ROOTCA"], n=node("a")))
    call = stub.StreamSecrets()
    await call.write(request(["default"], n=node("a")))
    streamed = await read(call)
    assert leaf_of(secrets_of(fetched)["default"]) == leaf_of(secrets_of(streamed)["default"])
    assert len(sds.registry) == 1
    call.cancel()


async def test_renewal_push_reaches_only_the_affected_streams(
        sds: SdsStack, stub: sds_pb2_grpc.SecretDiscoveryServiceStub):
    b_id = SpiffeId.parse("spiffe://cluster.local/ns/default/sa/b")
    calls = {}
    for sa in ("a", "b"):
        calls[sa] = stub.StreamSecrets()
        await calls[sa].write(request(["default"], n=node(sa)))
        first = await read(calls[sa])
        await calls[sa].write(request(["default"], version=first.version_info, nonce=first.nonce))
    rootca = stub.StreamSecrets()
    await rootca.write(request(["ROOTCA"], n=node("a")))
    await read(rootca)
    sds.registry.reissue(node("a").id, A_ID, reason="test")
    pushed_a = await read(calls["a"])
    assert leaf_of(secrets_of(pushed_a)["default"]).serial_number == \
        sds.registry.get(node("a").id, A_ID).svid.leaf.serial_number  # type: ignore[union-attr]
    sds.registry.reissue(node("b").id, b_id, reason="test")
    pushed_b = await read(calls["b"])  # B's first push after A's renewal is its own renewal
    assert leaf_of(secrets_of(pushed_b)["default"]).serial_number == \
        sds.registry.get(node("b").id, b_id).svid.leaf.serial_number  # type: ignore[union-attr]
    sds.trust.set_peer(peer_bundle("eu.cluster.local", FakeClock().now()))
    assert set(secrets_of(await read(rootca))) == {"ROOTCA"}  # ROOTCA saw no SVID push before this
    for call in (*calls.values(), rootca):
        call.cancel()


async def test_federated_rootca_uses_the_spiffe_validator_with_one_entry_per_trust_domain(
        sds: SdsStack, stub: sds_pb2_grpc.SecretDiscoveryServiceStub, clock: FakeClock):
    sds.trust.set_peer(peer_bundle("eu.cluster.local", clock.now()))
    response = await stub.FetchSecrets(request(["ROOTCA"], n=node("a")))
    context = secrets_of(response)["ROOTCA"].validation_context
    assert context.custom_validator_config.name == "envoy.tls.cert_validator.spiffe"
    config = spiffe_pb2.SPIFFECertValidatorConfig()
    assert context.custom_validator_config.typed_config.Unpack(config)
    assert [td.name for td in config.trust_domains] == ["cluster.local", "eu.cluster.local"]
    assert not context.trusted_ca.inline_bytes


async def test_ack_tracker_counts_streams_behind_a_bundle_sequence(
        sds: SdsStack, stub: sds_pb2_grpc.SecretDiscoveryServiceStub):
    call = stub.StreamSecrets()
    await call.write(request(["ROOTCA"], n=node("a")))
    first = await read(call)
    sequence = sds.trust.own_bundle().sequence
    assert sds.component.hub.connected_streams() == 1
    assert sds.component.hub.streams_behind(sequence) == 1
    await call.write(request(["ROOTCA"], version=first.version_info, nonce=first.nonce))
    # The ACK is processed before the name-set change that follows it on the same stream.
    await call.write(request(["ROOTCA", "default"], version=first.version_info, nonce=first.nonce))
    await read(call)
    assert sds.component.hub.streams_behind(sequence) == 0
    call.cancel()


async def test_plain_acks_are_recorded_between_pushes_and_a_nack_or_a_new_name_still_reaches_the_handler(
        sds: SdsStack, stub: sds_pb2_grpc.SecretDiscoveryServiceStub, monkeypatch: pytest.MonkeyPatch):
    # A plain ACK is recorded by the stream's reader when the handler is idle; everything else is queued.
    in_reader: list[str] = []
    real = SdsServicer._ack_in_place

    def counted(self: SdsServicer, stream: Any, request: Any) -> bool:
        handled = real(self, stream, request)
        if handled:
            in_reader.append(request.response_nonce)
        return handled

    monkeypatch.setattr(SdsServicer, "_ack_in_place", counted)
    hub, call = sds.component.hub, stub.StreamSecrets()
    acks = lambda: sds.metric("ca_sds_push_ack_latency_seconds_count")  # noqa: E731
    await call.write(request(["ROOTCA"], n=node("a")))
    first = await read(call)
    sequence = sds.trust.own_bundle().sequence
    await call.write(request(["ROOTCA"], version=first.version_info, nonce=first.nonce))
    await wait_for(lambda: hub.streams_behind(sequence) == 0 and acks() == 1, "the first ACK recorded")
    assert in_reader == [first.nonce]

    sds.trust.set_peer(peer_bundle("eu.cluster.local", sds.registry.clock.now()))
    pushed = await read(call)  # ROOTCA carries the peers too
    await call.write(request(["ROOTCA"], version=pushed.version_info, nonce=pushed.nonce, error="bad bundle"))
    await wait_for(lambda: sds.metric("ca_sds_nacks_total", api="sotw") == 1, "the NACK counted")
    assert acks() == 1  # a NACK is not an ACK

    await call.write(request(["ROOTCA", "default"], version=pushed.version_info, nonce=pushed.nonce))
    svid = await read(call)  # a new name in an ACK: resolved and pushed by the handler
    assert set(secrets_of(svid)) == {"default"}
    await call.write(request(["ROOTCA", "default"], version=svid.version_info, nonce=svid.nonce))
    await call.write(request(["ROOTCA", "default"], version=svid.version_info, nonce="an-old-nonce"))
    await call.write(request(["ROOTCA"], version=svid.version_info, nonce=svid.nonce))  # an ACK that narrows
    await call.write(request(["ROOTCA", "default"], version=svid.version_info, nonce=svid.nonce))  # and widens
    marker = await read(call)  # the widening is answered, so everything before it has been handled
    assert set(secrets_of(marker)) == {"default"}
    # ACKs: the first, the one with the new name, the SVID's, the narrowing and the widening one; the
    # stale nonce is not one.  Only the first and (when the handler was idle) the SVID's were plain.
    assert acks() == 5
    assert in_reader[0] == first.nonce and set(in_reader) <= {first.nonce, svid.nonce}
    call.cancel()
