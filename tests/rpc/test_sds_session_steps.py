"""The SDS session as a pure protocol state machine: requests in, steps (send / pushed / ACKed) out."""

from __future__ import annotations

from envoy.service.discovery.v3 import discovery_pb2
from google.rpc import status_pb2  # type: ignore[import-untyped]

from ca_service.pki.identity import SpiffeId
from ca_service.rpc.authn import Caller
from ca_service.rpc.sds_acks import AckLedger
from ca_service.rpc.sds_resources import DEFAULT_NAME, ROOTCA_NAME, TRUST_SET, svid_key
from ca_service.rpc.sds_sessions import DeltaSession, SessionStep, SotwSession, Wanted
from ca_service.services.authority import Authority
from tests.clock import FakeClock
from tests.rpc.sessions import on_request
from tests.rpc.test_sds_resources import catalog_of

CALLER = Caller(SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/web"), "node-1", "test")


def request(names: list[str], nonce: str = "", version: str = "", error: str | None = None,
            ) -> discovery_pb2.DiscoveryRequest:
    out = discovery_pb2.DiscoveryRequest(resource_names=names, response_nonce=nonce, version_info=version)
    if error is not None:
        out.error_detail.CopyFrom(status_pb2.Status(message=error))
    return out


def test_a_first_request_pushes_the_bundle_and_names_its_sequence(authority: Authority, clock: FakeClock):
    catalog, _, _ = catalog_of(authority, clock)
    session = SotwSession(catalog, CALLER)
    step = on_request(catalog, session, request([ROOTCA_NAME]))
    assert len(step.responses) == 1 and step.ack is None
    assert step.pushed is not None and step.pushed.nonce == step.responses[0].nonce
    assert step.pushed.own_bundle_sequence == authority.state.bundle_sequence
    assert session.watched_keys  # the hub is told what to wake the stream on


def test_an_ack_of_the_last_nonce_is_reported_and_sends_nothing(authority: Authority, clock: FakeClock):
    catalog, _, _ = catalog_of(authority, clock)
    session = SotwSession(catalog, CALLER)
    first = on_request(catalog, session, request([ROOTCA_NAME]))
    sent = first.responses[0]
    step = on_request(catalog, session, request([ROOTCA_NAME], sent.nonce, sent.version_info))
    assert step.responses == [] and step.ack is not None and step.ack.error is None


def test_an_ack_naming_what_the_stream_has_is_answered_at_once_and_a_changed_name_list_is_not(
        authority: Authority, clock: FakeClock):
    catalog, _, _ = catalog_of(authority, clock)
    session = SotwSession(catalog, CALLER)
    sent = on_request(catalog, session, request([ROOTCA_NAME])).responses[0]
    keys = session.watched_keys
    ack = session.on_request(request([ROOTCA_NAME], sent.nonce, sent.version_info))
    assert isinstance(ack, SessionStep) and ack.ack is not None and ack.responses == []
    assert session.watched_keys is keys  # nothing changed: the hub is handed the very same set

    # The same nonce with another name list is an ACK *and* a subscription change: resolved, keys widened.
    more = session.on_request(request([ROOTCA_NAME, DEFAULT_NAME], sent.nonce, sent.version_info))
    assert isinstance(more, Wanted) and more.names == (DEFAULT_NAME,) and more.ack is not None
    step = session.complete(more, {DEFAULT_NAME: catalog.resolve(CALLER, DEFAULT_NAME)})
    assert step.pushed is not None and len(step.responses[0].resources) == 1  # the SVID, not the bundle again
    svid = svid_key(CALLER.node_id, CALLER.spiffe_id)
    assert svid in session.watched_keys and keys < session.watched_keys

    # Dropping the SVID again narrows them back.
    latest = step.responses[0]
    fewer = on_request(catalog, session, request([ROOTCA_NAME], latest.nonce, latest.version_info))
    assert fewer.ack is not None and svid not in session.watched_keys and session.watched_keys == keys


def test_a_wildcard_ack_still_looks_for_new_names(authority: Authority, clock: FakeClock):
    catalog, _, _ = catalog_of(authority, clock)
    session = SotwSession(catalog, CALLER)
    sent = on_request(catalog, session, request([])).responses[0]
    assert TRUST_SET in session.watched_keys
    # No names means "everything I may see": an ACK of it is never taken as "the same as before".
    assert isinstance(session.on_request(request([], sent.nonce, sent.version_info)), Wanted)


def test_a_nack_is_reported_with_its_error_and_a_stale_nonce_is_ignored(authority: Authority, clock: FakeClock):
    catalog, _, _ = catalog_of(authority, clock)
    session = SotwSession(catalog, CALLER)
    first = on_request(catalog, session, request([ROOTCA_NAME]))
    nack = on_request(catalog, session, request([ROOTCA_NAME], first.responses[0].nonce, error="bad secret"))
    assert nack.ack is not None and nack.ack.error == "bad secret" and nack.responses == []
    stale = on_request(catalog, session, request([ROOTCA_NAME], "an-old-nonce"))
    assert stale.stale_nonce == "an-old-nonce" and stale.responses == [] and stale.ack is None


def test_a_delta_session_reports_its_push_too(authority: Authority, clock: FakeClock):
    catalog, _, _ = catalog_of(authority, clock)
    step = on_request(catalog, DeltaSession(catalog, CALLER),
                      discovery_pb2.DeltaDiscoveryRequest(resource_names_subscribe=[ROOTCA_NAME]))
    assert step.pushed is not None and step.pushed.own_bundle_sequence == authority.state.bundle_sequence


def test_the_ack_ledger_counts_a_stream_behind_until_it_acks_the_sequence():
    ledger, stream = AckLedger(), object()
    ledger.open(stream)
    assert ledger.connected_streams() == 0  # no own bundle pushed yet: nothing to wait for
    ledger.pushed(stream, "n1", 3)
    assert (ledger.connected_streams(), ledger.streams_behind(3)) == (1, 1)
    ledger.nacked(stream, "n1")
    ledger.acked(stream)
    assert ledger.streams_behind(3) == 1  # a NACKed push is not an ACK
    ledger.pushed(stream, "n2", 3)
    ledger.acked(stream)
    assert ledger.streams_behind(3) == 0 and ledger.streams_behind(4) == 1
    ledger.close(stream)
    assert ledger.connected_streams() == 0


def test_only_a_plain_ack_of_the_last_push_naming_the_same_resources_is_acknowledged_at_once(
        authority: Authority, clock: FakeClock):
    catalog, _, _ = catalog_of(authority, clock)
    session = SotwSession(catalog, CALLER)
    sent = on_request(catalog, session, request([ROOTCA_NAME])).responses[0]
    nonce, version = sent.nonce, sent.version_info
    assert session.acknowledged(request([ROOTCA_NAME], "an-old-nonce", version)) is None
    assert session.acknowledged(request([ROOTCA_NAME], nonce, version, error="bad")) is None  # a NACK
    assert session.acknowledged(request([ROOTCA_NAME, DEFAULT_NAME], nonce, version)) is None
    assert session.acknowledged(request([], nonce, version)) is None
    step = session.acknowledged(request([ROOTCA_NAME], nonce, version))
    assert step is not None and step.ack is not None and step.ack.nonce == nonce and step.ack.error is None
    assert DeltaSession(catalog, CALLER).acknowledged(discovery_pb2.DeltaDiscoveryRequest()) is None
