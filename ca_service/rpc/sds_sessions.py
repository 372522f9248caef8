"""Per-stream SDS protocol state: state of the world (:class:`SotwSession`) and incremental (:class:`DeltaSession`).

A session is plain data plus two pure-ish methods — ``on_request`` and ``on_change`` — returning the
responses to send.  No I/O and no tasks here: the servicer owns the stream, the hub owns the wake-ups.
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from collections.abc import Iterable
from typing import TYPE_CHECKING

from envoy.service.discovery.v3 import discovery_pb2

from ca_service.errors import NotFoundError
from ca_service.rpc.authn import Caller
from ca_service.rpc.sds_hub import StreamWatch, WatchHub
from ca_service.rpc.sds_resources import SECRET_TYPE_URL, TRUST_SET, ChangeKey, Resolved, SecretCatalog
from ca_service.telemetry import Telemetry

if TYPE_CHECKING:
    from prometheus_client import Counter

log = logging.getLogger(__name__)

WILDCARD = "*"


class _Session:
    """Subscription bookkeeping shared by both protocol variants."""

    api = ""

    def __init__(self, catalog: SecretCatalog, hub: WatchHub, watch: StreamWatch, caller: Caller,
                 telemetry: Telemetry) -> None:
        self.catalog, self.hub, self.watch, self.caller, self.telemetry = catalog, hub, watch, caller, telemetry
        self.names: set[str] = set()
        self.wildcard = False
        self.name_keys: dict[str, frozenset[ChangeKey]] = {}
        self.last_nonce = ""
        self._pushed_at = 0.0
        # The labelled child, looked up at the stream's first push rather than at every push.
        self._pushes: Counter | None = None

    def _subscribe(self, names: Iterable[str]) -> None:
        for name in names:
            self.names.add(name)
            self.name_keys[name] = self.catalog.keys_for(name)

    def _unsubscribe(self, names: Iterable[str]) -> None:
        for name in names:
            self.names.discard(name)
            self.name_keys.pop(name, None)

    def _resolve(self, name: str) -> Resolved | None:
        """Resolve and remember the change keys; may raise PolicyViolationError / NotFoundError."""
        resolved = self.catalog.resolve(self.caller, name)
        self.name_keys[name] = resolved.keys if resolved is not None else self.catalog.keys_for(name)
        return resolved

    def _sync_watch(self) -> None:
        # A wildcard stream also watches the set of trust domains: a new peer is a new name for it.
        keys: frozenset[ChangeKey] = frozenset({TRUST_SET}) if self.wildcard else frozenset()
        self.hub.set_keys(self.watch, keys.union(*self.name_keys.values()))

    def _affected(self, keys: frozenset[ChangeKey]) -> list[str]:
        if self.wildcard and TRUST_SET in keys:
            self._subscribe(set(self.catalog.visible_names(self.caller)) - self.names)
        return sorted(n for n in self.names if self.name_keys.get(n, frozenset()) & keys)

    def _new_nonce(self, resolved: list[Resolved]) -> str:
        self.last_nonce = uuid.uuid4().hex
        self._pushed_at = time.monotonic()
        own = max((r.own_bundle_sequence for r in resolved), default=0)
        if own:
            self.watch.receives_own_bundle = True
            self.watch.pending[self.last_nonce] = own
        if self._pushes is None:
            self._pushes = self.telemetry.sds_pushes.labels(self.api)
        self._pushes.inc()
        return self.last_nonce

    def _ack_or_nack(self, nonce: str, error: str | None) -> None:
        if error is not None:
            self.telemetry.sds_nacks.labels(self.api).inc()
            self.watch.pending.pop(nonce, None)
            # Envoy keeps the previous secret; resending the same content would be rejected again.
            log.warning("SDS NACK", extra={"node": self.caller.node_id, "spiffe_id": str(self.caller.spiffe_id),
                                           "api": self.api, "error": error, "names": sorted(self.names)})
            return
        self.telemetry.sds_ack_latency.observe(time.monotonic() - self._pushed_at)
        # Only the last nonce can be ACKed, and an ACK of it covers every earlier push on the stream.
        if self.watch.pending:
            seq = max(self.watch.pending.values())
            self.watch.acked_bundle_sequence = max(self.watch.acked_bundle_sequence, seq)
            self.watch.pending.clear()


class SotwSession(_Session):
    """StreamSecrets: version_info + nonce on every response; ACK/NACK/stale nonce per DESIGN.md."""

    api = "sotw"

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._sent: dict[str, str] = {}
        self._started = False

    def on_request(self, request: discovery_pb2.DiscoveryRequest) -> list[discovery_pb2.DiscoveryResponse]:
        nonce = request.response_nonce
        if self._started and nonce and nonce != self.last_nonce:
            log.debug("stale SDS nonce ignored", extra={"node": self.caller.node_id, "nonce": nonce})
            return []
        if nonce and nonce == self.last_nonce:
            nack = request.error_detail.message if request.HasField("error_detail") else None
            self._ack_or_nack(nonce, nack)
            if nack is not None:
                return []
        requested = set(request.resource_names)
        self.wildcard = not requested
        if self.wildcard:
            requested = set(self.catalog.visible_names(self.caller))
        added = requested - self.names if self._started else requested
        self._unsubscribe(self.names - requested)
        self._subscribe(added)
        self._started = True
        for gone in set(self._sent) - self.names:
            del self._sent[gone]
        resolved = [r for r in (self._resolve(n) for n in sorted(added)) if r is not None]
        self._sync_watch()
        return self._respond(resolved)

    def on_change(self, keys: frozenset[ChangeKey]) -> list[discovery_pb2.DiscoveryResponse]:
        out = []
        for name in self._affected(keys):
            try:
                resolved = self._resolve(name)
            except NotFoundError:
                resolved = None  # SotW cannot withdraw one secret; Envoy keeps the last one
            if resolved is not None and self._sent.get(name) != resolved.version:
                out.append(resolved)
        self._sync_watch()
        return self._respond(out)

    def _respond(self, resolved: list[Resolved]) -> list[discovery_pb2.DiscoveryResponse]:
        if not resolved:
            # Nothing new, or nothing exists yet (a peer trust domain not fetched yet): stay silent.
            return []
        for r in resolved:
            self._sent[r.name] = r.version
        version = _digest(sorted(self._sent.items()))
        return [discovery_pb2.DiscoveryResponse(
            version_info=version, resources=[r.packed() for r in resolved], type_url=SECRET_TYPE_URL,
            nonce=self._new_nonce(resolved))]


class DeltaSession(_Session):
    """DeltaSecrets: per-resource versions, initial_resource_versions, removed_resources."""

    api = "delta"

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._known: dict[str, str] = {}  # what the client holds: name -> version
        self._started = False

    def on_request(self, request: discovery_pb2.DeltaDiscoveryRequest) -> list[discovery_pb2.DeltaDiscoveryResponse]:
        if not self._started:
            self._known = dict(request.initial_resource_versions)
        nonce = request.response_nonce
        if nonce and nonce == self.last_nonce:
            nack = request.error_detail.message if request.HasField("error_detail") else None
            self._ack_or_nack(nonce, nack)
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
        response = self._update(sorted(added))
        self._sync_watch()
        return response

    def on_change(self, keys: frozenset[ChangeKey]) -> list[discovery_pb2.DeltaDiscoveryResponse]:
        response = self._update(self._affected(keys))
        self._sync_watch()
        return response

    def _update(self, names: list[str]) -> list[discovery_pb2.DeltaDiscoveryResponse]:
        changed: list[Resolved] = []
        removed: list[str] = []
        for name in names:
            resolved = self._resolve(name)
            if resolved is None:
                if name in self._known:  # a trust domain we stopped trusting: make Envoy drop it
                    removed.append(name)
                    del self._known[name]
            elif self._known.get(name) != resolved.version:
                changed.append(resolved)
                self._known[name] = resolved.version
        if not changed and not removed:
            return []
        resources = [discovery_pb2.Resource(name=r.name, version=r.version, resource=r.packed()) for r in changed]
        return [discovery_pb2.DeltaDiscoveryResponse(
            system_version_info=_digest(sorted(self._known.items())), resources=resources,
            type_url=SECRET_TYPE_URL, removed_resources=removed, nonce=self._new_nonce(changed))]


def _digest(items: Iterable[tuple[str, str]]) -> str:
    digest = hashlib.sha256()
    for name, version in items:
        digest.update(f"{name}={version}\n".encode())
    return digest.hexdigest()[:16]
