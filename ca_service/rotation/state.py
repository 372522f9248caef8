"""The persisted CA state of one trust domain: CA certificates in slots (prepared / active / old).

Slot states are persisted, never re-derived from dates, so a restart in the middle of a rotation
resumes where it stopped (SPIRE's journal does the same).  Pure value objects: changes return a new
state, which the authority service writes with compare-and-swap.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
from collections.abc import Iterable
from dataclasses import dataclass, field

from cryptography import x509

from ca_service.errors import NotReadyError
from ca_service.pki.bundle import TrustBundle
from ca_service.pki.certs import fingerprint, subject_key_id
from ca_service.pki.identity import TrustDomain
from ca_service.pki.keys import PrivateKey
from ca_service.pki.templates import CAKind


class SlotState(enum.StrEnum):
    PREPARED = "prepared"  # published (for roots) or created, not yet signing
    ACTIVE = "active"  # the one that signs
    OLD = "old"  # no longer signs; kept while anything valid still chains to it


class AuthorityMode(enum.StrEnum):
    SELF_SIGNED = "self-signed"  # we created the root and hold its key
    IMPORTED_ROOT = "imported-root"  # the operator gave us a root cert + key
    INTERMEDIATE_ONLY = "intermediate-only"  # an offline root signed our intermediate; we never hold the root key


@dataclass(frozen=True)
class CAEntry:
    """One CA certificate and its key, in a slot.

    ``key`` is None only for a root whose key is held offline (intermediate-only mode).  ``parent``
    is the subject key id (hex) of the issuing CA entry, empty for roots.
    """

    kind: CAKind
    cert: x509.Certificate
    key: PrivateKey | None
    state: SlotState
    parent: str = ""
    # For an imported intermediate: the certificates between it and its (offline) root.
    chain_above: tuple[x509.Certificate, ...] = ()

    @property
    def key_id(self) -> str:
        return subject_key_id(self.cert).hex()

    @property
    def serial(self) -> str:
        return format(self.cert.serial_number, "x")

    @property
    def not_after(self) -> dt.datetime:
        return self.cert.not_valid_after_utc

    @property
    def not_before(self) -> dt.datetime:
        return self.cert.not_valid_before_utc

    def with_state(self, state: SlotState) -> CAEntry:
        return dataclasses.replace(self, state=state)


class RootRotationPhase(enum.StrEnum):
    """Root rotation A -> A+B -> sign with B -> B (DESIGN.md "Trust model")."""

    PUBLISHED = "published"  # B is in the bundle; waiting for every SDS stream to ACK it
    SIGNING = "signing"  # an intermediate under B signs; leaves under A are being replaced
    RETIRING = "retiring"  # nothing is signed under A any more; A leaves the bundle when the last leaf expires


@dataclass(frozen=True)
class RootRotation:
    phase: RootRotationPhase
    started_at: dt.datetime
    phase_since: dt.datetime
    reason: str = "scheduled"


@dataclass(frozen=True)
class AuthorityState:
    """Everything the CA of one trust domain persists.  ``revision`` counts committed changes."""

    trust_domain: TrustDomain
    mode: AuthorityMode
    entries: tuple[CAEntry, ...]
    bundle_sequence: int = 1
    root_rotation: RootRotation | None = None
    revision: int = 0
    created_at: dt.datetime | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def of_kind(self, kind: CAKind, *states: SlotState) -> tuple[CAEntry, ...]:
        return tuple(e for e in self.entries if e.kind is kind and (not states or e.state in states))

    def active(self, kind: CAKind) -> CAEntry:
        """The signing entry of ``kind``.

        Raises:
            NotReadyError: if there is none (a state that never finished bootstrapping).
        """
        for entry in self.entries:
            if entry.kind is kind and entry.state is SlotState.ACTIVE:
                return entry
        raise NotReadyError(f"no active {kind} CA for {self.trust_domain}")

    def parent_of(self, entry: CAEntry) -> CAEntry | None:
        for candidate in self.entries:
            if candidate.key_id == entry.parent and candidate is not entry:
                return candidate
        return None

    def chain_above(self, entry: CAEntry) -> tuple[x509.Certificate, ...]:
        """Certificates from ``entry``'s issuer up to its root, inclusive."""
        if entry.chain_above:
            return entry.chain_above
        chain: list[x509.Certificate] = []
        current = self.parent_of(entry)
        while current is not None:
            chain.append(current.cert)
            current = self.parent_of(current) if current.kind is not CAKind.ROOT else None
        return tuple(chain)

    @property
    def roots(self) -> tuple[x509.Certificate, ...]:
        """Every published root: prepared ones first enter the bundle, old ones stay until retired."""
        return tuple(e.cert for e in self.entries if e.kind is CAKind.ROOT)

    def bundle(self) -> TrustBundle:
        return TrustBundle(self.trust_domain, self.roots, self.bundle_sequence)

    def replace(self, *, entries: Iterable[CAEntry] | None = None, **changes: object) -> AuthorityState:
        """A new state with ``changes``; the bundle sequence moves forward if the set of roots changed."""
        new_entries = tuple(entries) if entries is not None else self.entries
        candidate = dataclasses.replace(self, entries=new_entries, **changes)  # type: ignore[arg-type]
        old_roots = {fingerprint(c) for c in self.roots}
        if {fingerprint(c) for c in candidate.roots} != old_roots and "bundle_sequence" not in changes:
            candidate = dataclasses.replace(candidate, bundle_sequence=self.bundle_sequence + 1)
        return candidate

    @property
    def holds_root_key(self) -> bool:
        return any(e.key is not None for e in self.of_kind(CAKind.ROOT))

    # The instant an entry stopped signing is persisted in ``extra`` (the codec stores it as is), because
    # an OLD entry's prune horizon is computed from it and must survive a restart unchanged.
    def retired_at(self, entry: CAEntry) -> dt.datetime | None:
        raw = self.extra.get(RETIRED_PREFIX + entry.key_id)
        return dt.datetime.fromisoformat(raw) if raw else None

    def children_of(self, entry: CAEntry) -> tuple[CAEntry, ...]:
        return tuple(e for e in self.entries if e.parent == entry.key_id and e.kind is not CAKind.ROOT)

    @property
    def root_gate_override(self) -> str | None:
        """The operator's reason for continuing a root rotation past an un-ACKed gate, if given."""
        return self.extra.get(GATE_OVERRIDE_KEY) or None


RETIRED_PREFIX = "retired_at/"
GATE_OVERRIDE_KEY = "root_gate_override"


def extra_with_retired(extra: dict[str, str], entries: Iterable[CAEntry], now: dt.datetime) -> dict[str, str]:
    out = dict(extra)
    for entry in entries:
        out[RETIRED_PREFIX + entry.key_id] = now.isoformat()
    return out


def extra_without(extra: dict[str, str], entries: Iterable[CAEntry]) -> dict[str, str]:
    gone = {RETIRED_PREFIX + e.key_id for e in entries}
    return {k: v for k, v in extra.items() if k not in gone}
