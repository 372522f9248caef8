"""AuthorityState <-> record data.  One JSON document holds the whole state so that a single atomic,
compare-and-swapped write changes it: a key can never be persisted without its certificate or slot."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from ca_service.errors import StorageError
from ca_service.pki.certs import cert_to_pem, certs_to_pem, load_cert, load_certs
from ca_service.pki.identity import TrustDomain
from ca_service.pki.keys import load_private_key, private_key_to_pem
from ca_service.pki.templates import CAKind
from ca_service.rotation.state import (
    AuthorityMode,
    AuthorityState,
    CAEntry,
    RootRotation,
    RootRotationPhase,
    SlotState,
)

STATE_KEY = "state.json"
FORMAT = 1


def encode_state(state: AuthorityState) -> dict[str, bytes]:
    doc: dict[str, Any] = {
        "format": FORMAT,
        "trust_domain": state.trust_domain.name,
        "mode": state.mode.value,
        "bundle_sequence": state.bundle_sequence,
        "revision": state.revision,
        "created_at": state.created_at.isoformat() if state.created_at else None,
        "root_rotation": _encode_rotation(state.root_rotation),
        "extra": state.extra,
        "entries": [_encode_entry(e) for e in state.entries],
    }
    return {STATE_KEY: json.dumps(doc, indent=1).encode()}


def _encode_entry(entry: CAEntry) -> dict[str, Any]:
    return {
        "kind": entry.kind.value,
        "state": entry.state.value,
        "parent": entry.parent,
        "cert": cert_to_pem(entry.cert).decode(),
        "key": private_key_to_pem(entry.key).decode() if entry.key is not None else None,
        "chain_above": certs_to_pem(entry.chain_above).decode(),
    }


def _encode_rotation(rotation: RootRotation | None) -> dict[str, str] | None:
    if rotation is None:
        return None
    return {
        "phase": rotation.phase.value,
        "started_at": rotation.started_at.isoformat(),
        "phase_since": rotation.phase_since.isoformat(),
        "reason": rotation.reason,
    }


def decode_state(data: dict[str, bytes] | Any) -> AuthorityState:
    """Rebuild the state.

    Raises:
        StorageError: if the document is missing, malformed or of an unknown format.
    """
    try:
        doc = json.loads(data[STATE_KEY])
        if doc.get("format") != FORMAT:
            raise StorageError(f"state format {doc.get('format')!r} is not supported (expected {FORMAT})")
        rotation = doc.get("root_rotation")
        return AuthorityState(
            trust_domain=TrustDomain(doc["trust_domain"]),
            mode=AuthorityMode(doc["mode"]),
            entries=tuple(_decode_entry(e) for e in doc["entries"]),
            bundle_sequence=int(doc["bundle_sequence"]),
            root_rotation=RootRotation(
                phase=RootRotationPhase(rotation["phase"]),
                started_at=dt.datetime.fromisoformat(rotation["started_at"]),
                phase_since=dt.datetime.fromisoformat(rotation["phase_since"]),
                reason=rotation.get("reason", "scheduled"),
            ) if rotation else None,
            revision=int(doc.get("revision", 0)),
            created_at=dt.datetime.fromisoformat(doc["created_at"]) if doc.get("created_at") else None,
            extra=dict(doc.get("extra") or {}),
        )
    except StorageError:
        raise
    except Exception as exc:  # any shape error in a persisted document is one kind of failure
        raise StorageError(f"CA state document is malformed: {type(exc).__name__}: {exc}") from None


def _decode_entry(doc: dict[str, Any]) -> CAEntry:
    chain_pem = doc.get("chain_above") or ""
    return CAEntry(
        kind=CAKind(doc["kind"]),
        state=SlotState(doc["state"]),
        parent=doc.get("parent", ""),
        cert=load_cert(doc["cert"].encode(), what="stored CA certificate"),
        key=load_private_key(doc["key"].encode()) if doc.get("key") else None,
        chain_above=tuple(load_certs(chain_pem.encode())) if chain_pem.strip() else (),
    )
