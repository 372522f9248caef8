"""Operator use cases behind the CLI: init/import, status, one-off issuance, cacerts export, bundle.

Each returns a plain dict (the ``--json`` output) and has a text renderer next to it.
"""

from __future__ import annotations

import datetime as dt
import getpass
import os
from pathlib import Path
from typing import Any

from ca_service.adapters import issuance_journal
from ca_service.app import build_authority
from ca_service.config import Settings
from ca_service.errors import InvalidRequestError, NotReadyError, StorageError
from ca_service.pki.certs import CertFacts, certs_to_pem, load_cert, load_certs
from ca_service.pki.identity import SpiffeId
from ca_service.pki.keys import load_private_key, private_key_to_pem
from ca_service.rotation.minting import bootstrap_state, import_root, intermediate_only_state
from ca_service.rotation.state import AuthorityMode, AuthorityState
from ca_service.services.authority import Authority
from ca_service.services.cacerts import cacerts_files
from ca_service.services.issuance_ledger import IssuanceRecord
from ca_service.services.reports import entry_report
from ca_service.storage.projected import write_projected


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InvalidRequestError(f"cannot read {what} {path}: {exc.strerror}") from None


def _loaded(settings: Settings) -> Authority:
    authority = build_authority(settings)
    if authority.load() is None:
        raise NotReadyError(
            f"no CA in {authority.store_description}; run `ca-service init` or start `ca-service serve` first"
        )
    return authority


def init(settings: Settings, *, root_cert: Path | None = None, root_key: Path | None = None,
         intermediate_cert: Path | None = None, intermediate_key: Path | None = None,
         intermediate_chain: Path | None = None) -> dict[str, Any]:
    """Create the CA (or import one).  An existing CA is left unchanged and reported as such.

    Raises:
        InvalidRequestError: for a bad combination of flags or unusable imported material.
    """
    authority = build_authority(settings)
    now = authority.clock.now()
    if intermediate_cert or intermediate_key:
        if not (intermediate_cert and intermediate_key and root_cert) or root_key:
            raise InvalidRequestError(
                "intermediate-only mode needs --intermediate-cert, --intermediate-key and --root-cert"
                " (and no --root-key)"
            )
        initial = intermediate_only_state(
            settings.domain, cert=load_cert(_read(intermediate_cert, "intermediate certificate")),
            key=load_private_key(_read(intermediate_key, "intermediate key")),
            chain=load_certs(_read(intermediate_chain, "chain")) if intermediate_chain else [],
            root=load_cert(_read(root_cert, "root certificate")), now=now,
        )
    elif root_cert or root_key:
        if not (root_cert and root_key):
            raise InvalidRequestError("importing a root needs both --root-cert and --root-key")
        root = import_root(load_cert(_read(root_cert, "root certificate")),
                           load_private_key(_read(root_key, "root key")), now=now)
        ca = settings.ca
        initial = bootstrap_state(settings.domain, algorithm=ca.key_algorithm, root_ttl=ca.root_ttl,
                                  intermediate_ttl=ca.intermediate_ttl, istiod_ttl=ca.istiod_intermediate_ttl,
                                  now=now, root=root, backdate=ca.backdate)
    else:
        initial = None
    state, created = authority.load_or_bootstrap(initial)
    if not created and initial is not None:
        raise InvalidRequestError(
            f"a CA already exists in {authority.store_description}; refusing to replace it with an import"
        )
    return {"created": created, "store": authority.store_description, **_state_report(state, now)}


def render_init(report: dict[str, Any]) -> str:
    head = "created a new CA" if report["created"] else "a CA already exists; left unchanged"
    return f"{head} in {report['store']}\n" + render_status(report)


def status(settings: Settings) -> dict[str, Any]:
    authority = _loaded(settings)
    return {"store": authority.store_description, **_state_report(authority.state, authority.clock.now())}


def _state_report(state: AuthorityState, now: dt.datetime) -> dict[str, Any]:
    return {
        "trust_domain": state.trust_domain.name,
        "mode": state.mode.value,
        "root_key": "held offline (intermediate-only mode: the daemon never needs it)"
        if state.mode is AuthorityMode.INTERMEDIATE_ONLY else "held by ca-service",
        "bundle_sequence": state.bundle_sequence,
        "root_rotation": state.root_rotation.phase.value if state.root_rotation else None,
        "certificates": [entry_report(e, now) for e in state.entries],
    }


def render_status(report: dict[str, Any]) -> str:
    lines = [
        f"trust domain  {report['trust_domain']}",
        f"mode          {report['mode']}",
        f"root key      {report['root_key']}",
        f"bundle        sequence {report['bundle_sequence']}"
        + (f", root rotation {report['root_rotation']}" if report["root_rotation"] else ""),
        "",
        f"{'KIND':<20} {'STATE':<9} {'SERIAL':<14} {'KEY ID':<14} {'NOT BEFORE':<20} {'NOT AFTER':<20} LEFT",
    ]
    for c in report["certificates"]:
        lines.append(
            f"{c['kind']:<20} {c['state']:<9} {c['serial'][:12]:<14} {c['key_id'][:12]:<14} "
            f"{c['not_before'][:19]:<20} {c['not_after'][:19]:<20} {c['time_left']}"
        )
        lines.append(f"{'':<20} {c['subject']}")
    return "\n".join(lines)


def issue(settings: Settings, spiffe_id: str, out: Path, *, ttl: dt.timedelta | None = None) -> dict[str, Any]:
    """Sign one SVID with a fresh key and write it (an operator tool: the operator is entitled to any ID)."""
    authority = _loaded(settings)
    identity = SpiffeId.parse(spiffe_id)
    key = authority.issuer.new_key()
    now = authority.clock.now()
    svid = authority.issuer.issue(identity, key.public_key(), ttl=ttl, now=now)
    # Journaled before anything is handed out: a certificate that cannot be recorded is not written.
    try:
        issuance_journal.write_file(settings.issued_dir, [IssuanceRecord(
            serial=svid.serial, spiffe_id=str(identity), caller=_operator(), method="local", path="cli",
            not_after=svid.not_after, issuer=svid.issuer_key_id, issued_at=now)])
    except OSError as exc:
        raise StorageError(f"cannot record the certificate in {settings.issued_dir}: {exc.strerror}; "
                           "nothing was written") from None
    files = {"svid.pem": certs_to_pem(svid.chain), "svid-key.pem": private_key_to_pem(key),
             "bundle.pem": certs_to_pem(svid.roots)}
    out.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        _write_file(out / name, data, 0o600 if name.endswith("key.pem") else 0o644)
    facts = CertFacts.of(svid.leaf)
    return {"spiffe_id": str(identity), "serial": facts.serial, "not_after": facts.not_after.isoformat(),
            "dir": str(out), "files": sorted(files)}


def _operator() -> str:
    """Who ran ``ca-service issue``, for the issuance ledger's ``caller``."""
    try:
        return f"local-user:{getpass.getuser()}"
    except (KeyError, OSError):  # no login name and no passwd entry (a container's arbitrary uid)
        return f"local-uid:{os.getuid()}"


def _write_file(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    tmp.touch(mode)
    tmp.chmod(mode)
    tmp.write_bytes(data)
    tmp.replace(path)


def export_cacerts(settings: Settings, directory: Path) -> dict[str, Any]:
    authority = _loaded(settings)
    state = authority.state
    if state.mode is AuthorityMode.INTERMEDIATE_ONLY:
        raise NotReadyError("intermediate-only mode has no istiod intermediate (minting one needs the root key)")
    files = cacerts_files(state, authority.clock.now())
    write_projected(directory, files, modes={"ca-key.pem": 0o600})
    return {"dir": str(directory), "files": sorted(files)}


def bundle(settings: Settings, fmt: str) -> bytes:
    state = _loaded(settings).state
    return state.bundle().to_json() + b"\n" if fmt == "spiffe" else state.bundle().to_pem()
