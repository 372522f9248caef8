"""Ports between services that are built in different places (cosmicpython: protocols, not concrete imports).

- :class:`AckTracker` is implemented by the SDS server and read by root rotation: B may sign only
  after every connected stream has ACKed a bundle that contains it.
- :class:`Rotator` is implemented by the rotation service and called by the admin API and CLI.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Protocol


class AckTracker(Protocol):
    def connected_streams(self) -> int:
        """Open SDS streams that receive a trust bundle of our own trust domain."""
        ...

    def streams_behind(self, bundle_sequence: int) -> int:
        """How many of those streams have not yet ACKed a bundle at or past ``bundle_sequence``."""
        ...


class RotationScope(enum.StrEnum):
    WORKLOAD = "workload"
    NAMESPACE = "namespace"
    ALL_WORKLOADS = "all-workloads"
    INTERMEDIATE = "intermediate"
    ISTIOD_INTERMEDIATE = "istiod-intermediate"
    ROOT = "root"


class RotationReason(enum.StrEnum):
    SCHEDULED = "scheduled"
    FORCED = "forced"
    STARTUP = "startup"


@dataclass(frozen=True)
class RotationRequest:
    scope: RotationScope
    reason: str
    spiffe_id: str | None = None
    namespace: str | None = None
    dry_run: bool = False
    caller: str = "unknown"


@dataclass(frozen=True)
class RotationResult:
    scope: RotationScope
    dry_run: bool
    # Serials (hex) of certificates that are (or would be) replaced, and of the new ones issued now.
    affected_serials: tuple[str, ...] = ()
    new_serials: tuple[str, ...] = ()
    affected_identities: tuple[str, ...] = ()
    detail: str = ""
    extra: dict[str, str] = field(default_factory=dict)


class Rotator(Protocol):
    async def rotate(self, request: RotationRequest) -> RotationResult:
        """Apply (or with ``dry_run`` describe) a forced rotation.

        Raises:
            InvalidRequestError: for a scope without its target (workload without spiffe_id...).
            NotReadyError: if the rotation cannot run now (e.g. root key held offline).
        """
        ...
