"""istiod's ``cacerts`` set for the active istiod intermediate: built and checked in one place.

Used by the CLI export (``operations.py``) and the daemon's publisher
(``adapters/cacerts_publisher.py``); both write only what :func:`cacerts_files` returned.
"""

from __future__ import annotations

import datetime as dt

from ca_service.errors import NotReadyError
from ca_service.pki.cacerts import build_cacerts, check_cacerts
from ca_service.pki.certs import fingerprint
from ca_service.pki.templates import CAKind
from ca_service.rotation.state import AuthorityState, SlotState


def cacerts_signature(state: AuthorityState) -> tuple[str, tuple[bytes, ...]] | None:
    """What the files depend on: the active istiod intermediate and the root set (None: nothing to write)."""
    active = state.of_kind(CAKind.ISTIOD_INTERMEDIATE, SlotState.ACTIVE)
    if not active or active[0].key is None:
        return None
    return active[0].key_id, tuple(fingerprint(c) for c in state.roots)


def cacerts_files(state: AuthorityState, now: dt.datetime) -> dict[str, bytes]:
    """The checked ``cacerts`` set (istiod's rules, :func:`~ca_service.pki.cacerts.check_cacerts`).

    Raises:
        NotReadyError: if there is no active istiod intermediate with a key.
        CAServiceError: if the set breaks one of istiod's rules.
    """
    entry = state.active(CAKind.ISTIOD_INTERMEDIATE)
    if entry.key is None:
        raise NotReadyError("the istiod intermediate's key is not available")
    files = build_cacerts(entry.cert, entry.key, state.chain_above(entry), state.roots)
    check_cacerts(files, now=now)
    return files
