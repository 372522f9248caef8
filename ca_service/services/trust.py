"""The trust store: every trust bundle this daemon delivers, kept apart per trust domain.

Our own bundle comes from the authority (the assembly registers :meth:`TrustStore.on_state_change`
as a state reaction); peer bundles come from federation (bundle endpoints or static files).
Consumers (SDS, bundle files, metrics) subscribe to changes when they start.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

from ca_service.pki.bundle import TrustBundle
from ca_service.pki.identity import TrustDomain
from ca_service.services.authority import Authority
from ca_service.services.state_changes import StateChange

log = logging.getLogger(__name__)

# Called with the set of trust domains whose bundle changed, was added or was removed.
TrustListener = Callable[[frozenset[TrustDomain]], None]


class TrustStore:
    def __init__(self, authority: Authority) -> None:
        self._authority = authority
        self.own = authority.trust_domain
        self._peers: dict[TrustDomain, TrustBundle] = {}
        self._listeners: list[TrustListener] = []

    def on_state_change(self, change: StateChange) -> None:
        """State reaction: our own bundle changed when its sequence did."""
        if change.bundle_changed:
            self._notify(frozenset({self.own}))

    def own_bundle(self) -> TrustBundle:
        return self._authority.bundle()

    def bundles(self) -> dict[TrustDomain, TrustBundle]:
        """Own bundle first, then peers in name order."""
        return {self.own: self.own_bundle(), **dict(sorted(self._peers.items()))}

    def bundle(self, trust_domain: TrustDomain) -> TrustBundle | None:
        return self.own_bundle() if trust_domain == self.own else self._peers.get(trust_domain)

    def peers(self) -> Mapping[TrustDomain, TrustBundle]:
        return dict(self._peers)

    def set_peer(self, bundle: TrustBundle) -> bool:
        """Store a peer's bundle; returns whether anything changed (a same-roots refresh changes nothing)."""
        if bundle.trust_domain == self.own:
            raise ValueError("a peer bundle cannot replace our own trust domain's bundle")
        current = self._peers.get(bundle.trust_domain)
        if current is not None and current.fingerprints() == bundle.fingerprints():
            self._peers[bundle.trust_domain] = bundle
            return False
        self._peers[bundle.trust_domain] = bundle
        self._notify(frozenset({bundle.trust_domain}))
        return True

    def remove_peer(self, trust_domain: TrustDomain) -> bool:
        if self._peers.pop(trust_domain, None) is None:
            return False
        self._notify(frozenset({trust_domain}))
        return True

    def subscribe(self, listener: TrustListener) -> Callable[[], None]:
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def _notify(self, changed: frozenset[TrustDomain]) -> None:
        for listener in list(self._listeners):
            try:
                listener(changed)
            except Exception:
                log.exception("trust listener %r failed", listener)
