"""The last accepted bundle of every peer, on disk, so a restart during a peer outage still trusts the peer.

One :class:`DirectoryStore` record per peer (``peer-bundle-<td>``) in a directory of its own, holding
the bundle as SPIFFE JSON (its sequence included, so the "never go backwards" rule survives restarts)
and when it was fetched (so the staleness metric keeps growing across restarts).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from ca_service.errors import CAServiceError, ConflictError
from ca_service.pki.bundle import TrustBundle, parse_jwks
from ca_service.pki.identity import TrustDomain
from ca_service.storage.directory import DirectoryStore

log = logging.getLogger(__name__)

PREFIX = "peer-bundle-"
# DirectoryStore record names are [a-z0-9.-] and at most 100 characters; trust domains may also hold
# "_" and be longer, so those get a hash-derived name (the record itself names its trust domain).
_PLAIN = re.compile(r"^[a-z0-9][a-z0-9.-]{0,87}$")


def record_name(trust_domain: TrustDomain) -> str:
    if _PLAIN.match(trust_domain.name):
        return PREFIX + trust_domain.name
    return PREFIX + "h-" + hashlib.sha256(trust_domain.name.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class SavedBundle:
    bundle: TrustBundle
    fetched_at: dt.datetime


class LastGoodStore:
    """Peer bundles in ``directory`` (0700, records 0600, atomic writes through DirectoryStore)."""

    def __init__(self, directory: Path) -> None:
        self._store = DirectoryStore(directory)
        self.directory = directory

    def save(self, bundle: TrustBundle, fetched_at: dt.datetime) -> None:
        name = record_name(bundle.trust_domain)
        data = {"trust_domain": bundle.trust_domain.name.encode(), "bundle": bundle.to_json(),
                "fetched_at": fetched_at.isoformat().encode()}
        # One writer per peer (its poller); a conflict means a second daemon on the same data dir, in
        # which case the newest write wins — both wrote a bundle they had validated.
        for _ in range(3):
            current = self._store.read(name)
            try:
                self._store.write(name, data, expected_version=current.version if current else None)
                return
            except ConflictError:
                continue

    def load(self, trust_domain: TrustDomain) -> SavedBundle | None:
        """The saved bundle, or None (also when the record is unusable: a fetch will replace it)."""
        try:
            record = self._store.read(record_name(trust_domain))
            if record is None or record.data.get("trust_domain", b"").decode() != trust_domain.name:
                return None
            bundle = parse_jwks(record.data["bundle"], trust_domain)
            fetched_at = dt.datetime.fromisoformat(record.data["fetched_at"].decode())
        except (CAServiceError, KeyError, ValueError) as exc:
            log.warning("ignoring the saved bundle of %s: %s", trust_domain, exc)
            return None
        return SavedBundle(bundle, fetched_at)

    def trust_domains(self) -> set[TrustDomain]:
        """Trust domains with a saved record (to clean up peers that left the configuration)."""
        out = set()
        for path in self.directory.glob(PREFIX + "*.json"):
            with contextlib.suppress(CAServiceError, ValueError, KeyError):
                record = self._store.read(path.stem)
                if record is not None:
                    out.add(TrustDomain(record.data["trust_domain"].decode()))
        return out

    def delete(self, trust_domain: TrustDomain) -> None:
        # DirectoryStore has no delete; the record file is ours alone (this directory holds only
        # peer bundles), and unlink is atomic.
        with contextlib.suppress(FileNotFoundError):
            (self.directory / f"{record_name(trust_domain)}.json").unlink()
