"""The one state-change path: commit, load and a replica's record all end in one StateChange event."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Mapping
from pathlib import Path

import pytest

from ca_service.app import build_app
from ca_service.config import Settings
from ca_service.errors import StorageError
from ca_service.pki.identity import TrustDomain
from ca_service.rotation.minting import bootstrap_state
from ca_service.services.authority import Authority
from ca_service.services.state_changes import ChangeCause, StateChange, StateReactions
from ca_service.storage.base import Record
from ca_service.storage.codec import encode_state
from ca_service.storage.directory import DirectoryStore
from ca_service.telemetry import Telemetry
from tests.clock import FakeClock


def heard_by(authority: Authority) -> list[StateChange]:
    heard: list[StateChange] = []
    authority.reactions.add("test", heard.append)
    return heard


def record_of(authority: Authority, *, revision_step: int = 1, version: str = "replica-7") -> Record:
    state = dataclasses.replace(authority.state, revision=authority.state.revision + revision_step)
    return Record("authority", encode_state(state), version)


def test_a_commit_publishes_one_change_caused_by_committed(authority: Authority):
    heard = heard_by(authority)
    old = authority.state
    new = authority.commit(old.replace())
    assert [(c.old, c.new, c.cause) for c in heard] == [(old, new, ChangeCause.COMMITTED)]


def test_a_reload_that_finds_a_newer_state_publishes_loaded(authority: Authority, settings: Settings,
                                                           clock: FakeClock):
    other = Authority(DirectoryStore(settings.data_dir / "state"), settings.domain, settings.ca, clock)
    other.load()
    other.commit(other.state.replace())
    heard = heard_by(authority)
    authority.load()
    assert [c.cause for c in heard] == [ChangeCause.LOADED]
    assert heard[0].new.revision == authority.state.revision


def test_a_newer_record_from_a_replica_is_taken_and_published_as_replicated(authority: Authority):
    heard = heard_by(authority)
    old = authority.state
    assert authority.receive(record_of(authority))
    assert authority.state.revision == old.revision + 1
    assert [(c.old.revision, c.cause) for c in heard] == [(old.revision, ChangeCause.REPLICATED)]


@pytest.mark.parametrize("step", [0, -1])
def test_a_record_that_is_not_newer_is_ignored(authority: Authority, step: int):
    authority.commit(authority.state.replace())  # revision 1: an older record is still a valid one (>= 0)
    heard = heard_by(authority)
    before = authority.state
    assert not authority.receive(record_of(authority, revision_step=step))
    assert authority.state is before and heard == []


def test_a_record_of_another_trust_domain_is_refused(authority: Authority, clock: FakeClock):
    ca = authority.settings
    foreign = bootstrap_state(TrustDomain("evil.example"), algorithm=ca.key_algorithm, root_ttl=ca.root_ttl,
                              intermediate_ttl=ca.intermediate_ttl, istiod_ttl=ca.istiod_intermediate_ttl,
                              now=clock.now())
    foreign = dataclasses.replace(foreign, revision=authority.state.revision + 5)
    before = authority.state
    with pytest.raises(StorageError, match="trust domain"):
        authority.receive(Record("authority", encode_state(foreign), "x"))
    assert authority.state is before


def test_the_write_after_a_received_record_uses_the_record_version(authority: Authority):
    # A replica's record carries the store version its next compare-and-swap must name.
    authority.receive(record_of(authority, version="42"))
    assert authority._version == "42"


def test_a_failing_reaction_is_logged_and_counted_and_the_others_still_run(authority: Authority,
                                                                        caplog: pytest.LogCaptureFixture):
    telemetry = Telemetry()
    reactions = StateReactions(telemetry.state_reaction_failures)
    ran: list[str] = []

    def broken(change: StateChange) -> None:
        ran.append("broken")
        raise RuntimeError("disk full")

    reactions.add("first", lambda c: ran.append("first"))
    reactions.add("broken", broken)
    reactions.add("last", lambda c: ran.append("last"))
    reactions.publish(StateChange(authority.state, authority.state, ChangeCause.COMMITTED))
    assert ran == ["first", "broken", "last"]
    assert telemetry.registry.get_sample_value("ca_state_reaction_failures_total", {"reaction": "broken"}) == 1
    assert "state reaction broken failed" in caplog.text


def test_the_assembly_registers_the_reactions_in_the_stated_order(settings: Settings, clock: FakeClock):
    settings = dataclasses.replace(settings, istiod=dataclasses.replace(settings.istiod,
                                                                        cacerts_dir=settings.data_dir / "cacerts"))
    app = build_app(settings, clock=clock)
    assert app.reactions.names == ["trust-store", "istiod-cacerts", "sideport-tls", "bundle-endpoint",
                                   "sds-serving", "signing-pool", "state-metrics"]
    assert app.authority.reactions is app.reactions


async def test_an_off_loop_commit_publishes_one_change_caused_by_committed(authority: Authority):
    heard = heard_by(authority)
    old = authority.state
    new = await authority.commit_async(old.replace())
    assert [(c.old, c.new, c.cause) for c in heard] == [(old, new, ChangeCause.COMMITTED)]
    assert new.revision == old.revision + 1


class EchoingStore:
    """The real directory store whose write comes back through the "watch" (receive) before it returns,
    as a Kubernetes watch event can reach the loop before the writing thread's result does."""

    def __init__(self, inner: DirectoryStore, loop: asyncio.AbstractEventLoop) -> None:
        self.inner, self.loop = inner, loop
        self.authority: Authority | None = None  # set after the bootstrap: echo only off-loop commits

    def read(self, name: str) -> Record | None:
        return self.inner.read(name)

    def write(self, name: str, data: Mapping[str, bytes], *, expected_version: str | None) -> Record:
        record = self.inner.write(name, data, expected_version=expected_version)
        if self.authority is not None:
            asyncio.run_coroutine_threadsafe(_receive(self.authority, record), self.loop).result(5)
        return record

    def describe(self) -> str:
        return "echoing"


async def _receive(authority: Authority, record: Record) -> None:
    authority.receive(record)


async def test_an_off_loop_commit_that_the_watch_delivered_first_is_published_once(
        settings: Settings, clock: FakeClock, tmp_path: Path):
    store = EchoingStore(DirectoryStore(tmp_path / "echo"), asyncio.get_running_loop())
    authority = Authority(store, settings.domain, settings.ca, clock)
    authority.load_or_bootstrap()
    store.authority = authority
    heard = heard_by(authority)
    old = authority.state
    new = await authority.commit_async(old.replace())
    assert len(heard) == 1 and heard[0].old == old and heard[0].new.revision == new.revision == old.revision + 1
