"""Per-stream SDS protocol state: state of the world (:class:`SotwSession`) and incremental (:class:`DeltaSession`).

A step has two phases.  ``on_request`` and ``on_change`` update the subscription and say which names
to resolve (:class:`Wanted`); the servicer resolves them (a first SVID is signed off the event loop,
on the signing pool) and hands the results to ``complete``, which returns a :class:`SessionStep`: the
responses to send, what was pushed (nonce, own bundle sequence) and what the client ACKed or NACKed.
A request that needs no resolution (a stale nonce, a NACK) is a :class:`SessionStep` at once.

No I/O, no signing, no logging, no metrics and no tasks here: the servicer owns the stream, the
resolution, the metrics and the logs, the hub owns the wake-ups (it watches :attr:`watched_keys`) and
its :class:`~ca_service.rpc.sds_acks.AckLedger` owns the ACK bookkeeping.  The catalog is only asked
which change keys a name depends on and which names a wildcard means.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from envoy.service.discovery.v3 import discovery_pb2

from ca_service.rpc.authn import Caller
from ca_service.rpc.sds_resources import SECRET_TYPE_URL, TRUST_SET, ChangeKey, Resolved, SecretCatalog

WILDCARD = "*"

R = TypeVar("R", discovery_pb2.DiscoveryResponse, discovery_pb2.DeltaDiscoveryResponse)


@dataclass(frozen=True)
class Pushed:
    nonce: str
    own_bundle_sequence: int  # 0: the push carried no bundle of our own trust domain


@dataclass(frozen=True)
class Acknowledged:
    nonce: str
    error: str | None = None  # set: a NACK (Envoy keeps its previous secret)


@dataclass(frozen=True)
class Wanted:
    """Phase one of a step: the names to resolve (in this order) before :meth:`complete` can answer."""

    names: tuple[str, ...]
    ack: Acknowledged | None = None
    # A change re-resolves names already served: one that cannot be resolved any more (NotFoundError)
    # is skipped by SotW (it cannot withdraw one secret; Envoy keeps the last one), not refused.
    missing_ok: bool = False
    change: bool = False


# What the servicer resolved for a Wanted: a name absent from it was skipped (``missing_ok``).
Resolutions = Mapping[str, Resolved | None]


@dataclass(frozen=True)
class SessionStep(Generic[R]):
    """What one request or change led to; the servicer writes, counts, logs and records ACKs."""

    responses: list[R] = field(default_factory=list)
    pushed: Pushed | None = None
    ack: Acknowledged | None = None
    stale_nonce: str | None = None  # a request answering an older push: ignored


class _Session:
    """Subscription bookkeeping shared by both protocol variants."""

    api = ""

    def __init__(self, catalog: SecretCatalog, caller: Caller) -> None:
        self.catalog, self.caller = catalog, caller
        self.names: set[str] = set()
        self._wildcard = False
        self._name_keys: dict[str, frozenset[ChangeKey]] = {}
        # The union of _name_keys (and TRUST_SET for a wildcard), made again only when one of them changes:
        # the servicer hands it to the hub after every step, and pushes and ACKs change nothing in it.
        self._watched: frozenset[ChangeKey] | None = None
        self.last_nonce = ""
        self._started = False

    @property
    def wildcard(self) -> bool:
        return self._wildcard

    @wildcard.setter
    def wildcard(self, value: bool) -> None:
        if value != self._wildcard:
            self._wildcard, self._watched = value, None

    @property
    def watched_keys(self) -> frozenset[ChangeKey]:
        """The change keys this stream depends on (the hub wakes it on these)."""
        if self._watched is None:
            # A wildcard stream also watches the set of trust domains: a new peer is a new name for it.
            keys: frozenset[ChangeKey] = frozenset({TRUST_SET}) if self._wildcard else frozenset()
            self._watched = keys.union(*self._name_keys.values())
        return self._watched

    def _watch(self, name: str, keys: frozenset[ChangeKey]) -> None:
        if self._name_keys.get(name) != keys:
            self._name_keys[name], self._watched = keys, None

    def _subscribe(self, names: Iterable[str]) -> None:
        for name in names:
            self.names.add(name)
            self._watch(name, self.catalog.keys_for(name))

    def _unsubscribe(self, names: Iterable[str]) -> None:
        for name in names:
            self.names.discard(name)
            if self._name_keys.pop(name, None) is not None:
                self._watched = None

    def _resolved(self, wanted: Wanted, resolutions: Resolutions) -> list[tuple[str, Resolved | None]]:
        """The resolutions of ``wanted`` in order, remembering each name's change keys."""
        out = []
        for name in wanted.names:
            if name not in resolutions:
                continue  # skipped (missing_ok): its keys stay as they were
            resolved = resolutions[name]
            self._watch(name, resolved.keys if resolved is not None else self.catalog.keys_for(name))
            out.append((name, resolved))
        return out

    def _affected(self, keys: frozenset[ChangeKey]) -> list[str]:
        if self.wildcard and TRUST_SET in keys:
            self._subscribe(set(self.catalog.visible_names(self.caller)) - self.names)
        return sorted(n for n in self.names if self._name_keys.get(n, frozenset()) & keys)

    def _new_push(self, resolved: list[Resolved]) -> Pushed:
        # Random, so that no other stream's or an earlier connection's nonce can match; os.urandom directly,
        # because building a uuid.UUID around the same 16 bytes cost three times as much.
        self.last_nonce = os.urandom(16).hex()
        return Pushed(self.last_nonce, max((r.own_bundle_sequence for r in resolved), default=0))

    def acknowledged(self, request: discovery_pb2.DiscoveryRequest | discovery_pb2.DeltaDiscoveryRequest,
                     ) -> SessionStep[Any] | None:
        """The step for ``request`` if it is a plain ACK of the last push that changes nothing else; None
        otherwise (``on_request`` then handles it).  Only SotW has one; a Delta ACK goes through ``on_request``."""
        return None

    def _answer(self, request: discovery_pb2.DiscoveryRequest | discovery_pb2.DeltaDiscoveryRequest,
                ) -> Acknowledged | None:
        """An ACK or NACK of our last push, if ``request`` answers it."""
        nonce = request.response_nonce
        if not nonce or nonce != self.last_nonce:
            return None
        return Acknowledged(nonce, request.error_detail.message if request.HasField("error_detail") else None)


class SotwSession(_Session):
    """StreamSecrets: version_info + nonce on every response; ACK/NACK/stale nonce per DESIGN.md."""

    api = "sotw"

    def __init__(self, catalog: SecretCatalog, caller: Caller) -> None:
        super().__init__(catalog, caller)
        self._sent: dict[str, str] = {}
        self._last_names: list[str] = []  # resource_names of the previous request, as sent

    def on_request(self, request: discovery_pb2.DiscoveryRequest,
                   ) -> SessionStep[discovery_pb2.DiscoveryResponse] | Wanted:
        nonce = request.response_nonce
        if self._started and nonce and nonce != self.last_nonce:
            return SessionStep(stale_nonce=nonce)
        ack = self._answer(request)
        plain = self._plain(request, ack)
        if plain is not None:
            return plain
        if ack is not None and ack.error is not None:
            return SessionStep(ack=ack)  # resending the same content would be rejected again
        names = self._last_names = list(request.resource_names)
        requested = set(names)
        self.wildcard = not requested
        if self.wildcard:
            requested = set(self.catalog.visible_names(self.caller))
        added = requested - self.names if self._started else requested
        self._unsubscribe(self.names - requested)
        self._subscribe(added)
        self._started = True
        for gone in set(self._sent) - self.names:
            del self._sent[gone]
        return Wanted(tuple(sorted(added)), ack)

    def acknowledged(self, request: discovery_pb2.DiscoveryRequest,
                     ) -> SessionStep[discovery_pb2.DiscoveryResponse] | None:
        return self._plain(request, self._answer(request))

    def _plain(self, request: discovery_pb2.DiscoveryRequest, ack: Acknowledged | None,
               ) -> SessionStep[discovery_pb2.DiscoveryResponse] | None:
        # The common request by far: an ACK naming what the stream already has.  Nothing to resolve or
        # subscribe (a wildcard one, with no names, still looks for new trust domains in on_request).
        if ack is None or ack.error is not None or not request.resource_names:
            return None
        if list(request.resource_names) != self._last_names:
            return None
        return SessionStep(ack=ack)

    def on_change(self, keys: frozenset[ChangeKey]) -> Wanted:
        return Wanted(tuple(self._affected(keys)), missing_ok=True, change=True)

    def complete(self, wanted: Wanted, resolutions: Resolutions) -> SessionStep[discovery_pb2.DiscoveryResponse]:
        """Phase two: answer ``wanted`` with what the servicer resolved.  A change sends only what differs."""
        out = [r for _, r in self._resolved(wanted, resolutions)
               if r is not None and not (wanted.change and self._sent.get(r.name) == r.version)]
        return self._respond(out, wanted.ack)

    def _respond(self, resolved: list[Resolved], ack: Acknowledged | None,
                 ) -> SessionStep[discovery_pb2.DiscoveryResponse]:
        if not resolved:
            # Nothing new, or nothing exists yet (a peer trust domain not fetched yet): stay silent.
            return SessionStep(ack=ack)
        for r in resolved:
            self._sent[r.name] = r.version
        version = _digest(tuple(sorted(self._sent.items())))
        pushed = self._new_push(resolved)
        return SessionStep([discovery_pb2.DiscoveryResponse(
            version_info=version, resources=[r.packed() for r in resolved], type_url=SECRET_TYPE_URL,
            nonce=pushed.nonce)], pushed, ack)


class DeltaSession(_Session):
    """DeltaSecrets: per-resource versions, initial_resource_versions, removed_resources."""

    api = "delta"

    def __init__(self, catalog: SecretCatalog, caller: Caller) -> None:
        super().__init__(catalog, caller)
        self._known: dict[str, str] = {}  # what the client holds: name -> version

    def on_request(self, request: discovery_pb2.DeltaDiscoveryRequest) -> Wanted:
        if not self._started:
            self._known = dict(request.initial_resource_versions)
        ack = self._answer(request)
        subscribe = set(request.resource_names_subscribe)
        if not self._started and (not subscribe or WILDCARD in subscribe):
            self.wildcard = True
            subscribe = (subscribe - {WILDCARD}) | set(self.catalog.visible_names(self.caller))
        self._started = True
        self._unsubscribe(request.resource_names_unsubscribe)
        for name in request.resource_names_unsubscribe:
            self._known.pop(name, None)
        added = subscribe - self.names
        self._subscribe(added)
        return Wanted(tuple(sorted(added)), ack)

    def on_change(self, keys: frozenset[ChangeKey]) -> Wanted:
        return Wanted(tuple(self._affected(keys)), change=True)

    def complete(self, wanted: Wanted, resolutions: Resolutions,
                 ) -> SessionStep[discovery_pb2.DeltaDiscoveryResponse]:
        """Phase two: what changed against what the client holds, and what it must drop."""
        ack = wanted.ack
        changed: list[Resolved] = []
        removed: list[str] = []
        for name, resolved in self._resolved(wanted, resolutions):
            if resolved is None:
                if name in self._known:  # a trust domain we stopped trusting: make Envoy drop it
                    removed.append(name)
                    del self._known[name]
            elif self._known.get(name) != resolved.version:
                changed.append(resolved)
                self._known[name] = resolved.version
        if not changed and not removed:
            return SessionStep(ack=ack)
        resources = [discovery_pb2.Resource(name=r.name, version=r.version, resource=r.packed()) for r in changed]
        pushed = self._new_push(changed)
        return SessionStep([discovery_pb2.DeltaDiscoveryResponse(
            system_version_info=_digest(tuple(sorted(self._known.items()))), resources=resources,
            type_url=SECRET_TYPE_URL, removed_resources=removed, nonce=pushed.nonce)], pushed, ack)


# A bundle push gives every stream with the same names the same set of versions: each digest is made once.
@functools.lru_cache(maxsize=1024)
def _digest(items: tuple[tuple[str, str], ...]) -> str:
    digest = hashlib.sha256()
    for name, version in items:
        digest.update(f"{name}={version}\n".encode())
    return digest.hexdigest()[:16]
