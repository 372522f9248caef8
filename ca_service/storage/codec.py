"""AuthorityState <-> record data.  One JSON document holds the whole state so that a single atomic,
compare-and-swapped write changes it: a key can never be persisted without its certificate or slot.

The document carries ``checksum``: SHA-256 over its canonical JSON (sorted keys, no whitespace,
without the checksum field), checked on load, so a flipped byte on disk or a hand edit is refused
instead of served.  Every load also checks the meaning (keys match their certificates, every CA
certificate is a CA signed by its parent, counters are not negative), which is all a record written
before checksums existed gets; its next write adds the checksum.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from ca_service.errors import StorageError
from ca_service.pki.certs import cert_to_pem, certs_to_pem, is_ca, load_cert, load_certs
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
CHECKSUM_FIELD = "checksum"
_CHECKSUM_PREFIX = "sha256:"
RESTORE_HINT = ("restore the state record (authority.json in the state directory) from a backup, or re-create "
                "the CA from its root with `ca-service init --root-cert ... --root-key ...` on an empty data directory")


def _canonical_digest(doc: dict[str, Any]) -> str:
    body = {k: v for k, v in doc.items() if k != CHECKSUM_FIELD}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    return _CHECKSUM_PREFIX + hashlib.sha256(canonical).hexdigest()


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
    doc[CHECKSUM_FIELD] = _canonical_digest(doc)
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
        StorageError: if the document is missing, malformed, of an unknown format, fails its checksum,
            or does not make sense (see :func:`check_state`); the message says how to restore.
    """
    state = _decode_document(data)
    check_state(state)
    return state


def _decode_document(data: dict[str, bytes] | Any) -> AuthorityState:
    try:
        doc = json.loads(data[STATE_KEY])
        if not isinstance(doc, dict):
            raise StorageError(f"CA state document is not a JSON object; {RESTORE_HINT}")
        if CHECKSUM_FIELD in doc and doc[CHECKSUM_FIELD] != _canonical_digest(doc):
            raise StorageError("CA state document fails its SHA-256 checksum: it was changed outside ca-service "
                               f"or the disk corrupted it; {RESTORE_HINT}")
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
        raise StorageError(f"CA state document is malformed ({type(exc).__name__}: {exc}); {RESTORE_HINT}") from None


def check_state(state: AuthorityState) -> None:
    """What a checksum cannot vouch for in a record written without one (and a bug could still write).

    Raises:
        StorageError: if a counter is negative, a key does not belong to its certificate, a CA
            certificate is not a CA, or one is not signed by the parent it names.
    """
    if state.revision < 0 or state.bundle_sequence < 0:
        raise StorageError(f"CA state has revision {state.revision} and bundle_sequence {state.bundle_sequence}; "
                           f"both must be >= 0; {RESTORE_HINT}")
    by_key_id = {e.key_id: e for e in state.entries}
    for entry in state.entries:
        problem = _entry_problem(entry, by_key_id)
        if problem:
            raise StorageError(f"CA state entry {entry.kind.value} serial {entry.serial} {problem}; {RESTORE_HINT}")


def _entry_problem(entry: CAEntry, by_key_id: dict[str, CAEntry]) -> str | None:
    if not is_ca(entry.cert):
        return "is not a CA certificate"
    if entry.key is not None and _spki(entry.key.public_key()) != _spki(entry.cert.public_key()):
        return "has a private key that does not belong to its certificate"
    issuers = [by_key_id[entry.parent].cert] if entry.parent in by_key_id else list(entry.chain_above[:1])
    if not entry.parent:
        issuers = [entry.cert]  # a root signs itself
    for issuer in issuers:
        try:
            entry.cert.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature):
            return "is not validly signed by its issuer"
    for above, issuer in zip(entry.chain_above, entry.chain_above[1:], strict=False):
        try:
            above.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature):
            return "has a chain_above that does not verify"
    return None


def _spki(key: Any) -> bytes:
    return bytes(key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))


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
