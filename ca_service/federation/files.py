"""Trust bundles on disk: ``<td>.pem`` per trust domain and ``combined-ca.pem``, rewritten on every change.

Written with :func:`write_projected` (kubelet's ``..data`` symlink swap), so a reader sees the old
set or the new set, never a mix.  ``combined-ca.pem`` is the concatenation (own domain first) that
Istio multi-region setups keep in the ``trust-bundle`` ConfigMap for consumers that need one file;
per-domain files keep the domains apart for everything that can use them.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from pathlib import Path

from ca_service.errors import StorageError
from ca_service.pki.identity import TrustDomain
from ca_service.services.trust import TrustStore
from ca_service.storage.projected import DATA_LINK, write_projected

log = logging.getLogger(__name__)

COMBINED = "combined-ca.pem"


def bundle_files(trust: TrustStore) -> dict[str, bytes]:
    bundles = trust.bundles()
    files = {f"{td.name}.pem": bundle.to_pem() for td, bundle in bundles.items()}
    files[COMBINED] = b"".join(bundle.to_pem() for bundle in bundles.values())
    return files


class BundleFilePublisher:
    """Component: publishes the bundle files at start and after every TrustStore change."""

    name = "bundle-files"

    def __init__(self, trust: TrustStore, directory: Path) -> None:
        self._trust = trust
        self.directory = directory
        self._unsubscribe: Callable[[], None] | None = None

    async def start(self) -> None:
        self.publish()
        self._unsubscribe = self._trust.subscribe(self._on_change)

    async def stop(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None

    def _on_change(self, changed: frozenset[TrustDomain]) -> None:
        try:
            self.publish()
        except StorageError:
            # The previous files stay in place (write_projected switches atomically or not at all);
            # the next change or restart writes again.
            log.exception("publishing bundle files to %s failed", self.directory)

    def publish(self) -> None:
        files = bundle_files(self._trust)
        write_projected(self.directory, files)
        self._remove_stale_links(set(files))
        log.debug("bundle files published", extra={"dir": str(self.directory), "files": sorted(files)})

    def _remove_stale_links(self, current: set[str]) -> None:
        # write_projected replaces the ..data set but leaves top-level links of names that are gone
        # (a peer removed from the configuration): they now dangle and must not look like a bundle.
        for link in self.directory.glob("*.pem"):
            if link.name not in current and link.is_symlink() and str(link.readlink()).startswith(DATA_LINK):
                with contextlib.suppress(FileNotFoundError):
                    link.unlink()
