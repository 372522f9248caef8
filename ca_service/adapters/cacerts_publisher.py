"""Keeps istiod's plug-in CA directory (``cacerts``) in step with the CA state.

On every change of the active istiod intermediate or of the root set the four files are rebuilt,
checked against istiod's rules, and swapped in as a whole (kubelet-style ``..data`` symlink), so
istiod's file watch never sees a half-written or invalid set.  Because the root set follows the
state, ``root-cert.pem`` goes A -> A+B -> B across a root rotation: the only order istiod accepts
(each set contains the previous or is contained by it).
"""

from __future__ import annotations

import logging
from pathlib import Path

from ca_service.clock import Clock
from ca_service.errors import CAServiceError
from ca_service.pki.cacerts import CA_KEY
from ca_service.pki.templates import CAKind
from ca_service.rotation.state import AuthorityState
from ca_service.services.authority import Authority
from ca_service.services.cacerts import cacerts_files, cacerts_signature
from ca_service.services.state_changes import StateChange
from ca_service.storage.projected import write_projected
from ca_service.telemetry import Telemetry

log = logging.getLogger(__name__)


class CacertsPublisher:
    """Lifecycle component; writes on start and, while running, on every relevant state change."""

    name = "istiod-cacerts"

    def __init__(self, authority: Authority, directory: Path, telemetry: Telemetry, clock: Clock | None = None,
                 ) -> None:
        self._authority = authority
        self.directory = directory
        self._telemetry = telemetry
        self._clock = clock or authority.clock
        self._written: tuple[str, tuple[bytes, ...]] | None = None
        self._running = False
        self.writes = 0

    async def start(self) -> None:
        self.publish(self._authority.state)
        self._running = True

    async def stop(self) -> None:
        self._running = False

    def on_state_change(self, change: StateChange) -> None:
        """State reaction (registered by the assembly): rewrite the set if what it depends on changed."""
        if self._running:
            self.publish(change.new)

    def publish(self, state: AuthorityState) -> bool:
        """Write the set if it changed; returns whether it wrote.  Never raises: istiod keeps the last good set."""
        signature = cacerts_signature(state)
        if signature is None:
            log.warning("no istiod intermediate with a key (intermediate-only mode?); cacerts not written",
                        extra={"dir": str(self.directory)})
            return False
        if signature == self._written:
            return False
        entry = state.active(CAKind.ISTIOD_INTERMEDIATE)
        try:
            files = cacerts_files(state, self._clock.now())
            write_projected(self.directory, files, modes={CA_KEY: 0o600}, now=self._clock.now())
        except CAServiceError as exc:
            self._telemetry.rotation_failures.labels(kind=str(CAKind.ISTIOD_INTERMEDIATE)).inc()
            log.error("istiod cacerts not published", extra={"dir": str(self.directory), "cause": str(exc)})
            return False
        self._written = signature
        self.writes += 1
        log.info("istiod cacerts published", extra={"dir": str(self.directory), "serial": entry.serial,
                                                    "roots": len(state.roots)})
        return True
