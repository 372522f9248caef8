"""Compromise response as a use case: taint a CA (it stops signing now and every live SVID under it is
re-issued on every core), revoke it (it leaves every bundle once nothing live depends on it, or with
``force``, saying what will break).  Pure decisions live in ``rotation/compromise.py``; CA changes go
through the rotation engine's ``apply`` under its one lock, like every forced rotation.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from dataclasses import dataclass
from typing import Protocol

from ca_service.errors import InvalidRequestError, PolicyViolationError
from ca_service.pki.templates import CAKind
from ca_service.rotation import compromise
from ca_service.rotation.planner import prune_time
from ca_service.rotation.state import AuthorityState, CAEntry
from ca_service.services.rotator import RotatorPorts
from ca_service.services.workloads import WorkloadCert

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompromiseRequest:
    action: str  # "taint" or "revoke"
    key_id: str  # hex subject key id, or hex serial, of the CA
    reason: str
    dry_run: bool = False
    force: bool = False  # revoke only: even though something live still depends on it
    caller: str = "unknown"


@dataclass(frozen=True)
class CompromiseResult:
    action: str
    dry_run: bool
    kind: str
    serial: str
    key_id: str
    detail: str
    # taint: live SVIDs re-issued under a fresh signer now; revoke: live SVIDs that depended on it.
    svids: tuple[str, ...] = ()
    breaks: tuple[str, ...] = ()  # revoke with force: what stops verifying


class Compromiser(Protocol):
    """What the admin API calls (implemented by :class:`CompromiseService`)."""

    async def handle(self, request: CompromiseRequest) -> CompromiseResult: ...


class CompromiseService:
    """Taint and revoke over the rotation engine's ports (the same ones the forced rotator uses)."""

    def __init__(self, ports: RotatorPorts) -> None:
        self._ports = ports

    async def handle(self, request: CompromiseRequest) -> CompromiseResult:
        log.warning("compromise response requested", extra={
            "action": request.action, "key_id": request.key_id, "reason": request.reason,
            "caller": request.caller, "dry_run": request.dry_run, "force": request.force})
        if request.action == "taint":
            return await self._taint(request)
        if request.action == "revoke":
            return await self._revoke(request)
        raise InvalidRequestError(f"unknown action {request.action!r} (taint or revoke)")

    def _dependents(self, state: AuthorityState, entry: CAEntry) -> list[WorkloadCert]:
        under = compromise.subtree_key_ids(state, entry)
        return [c for c in self._ports.workloads if c.svid.issuer_key_id in under]

    async def _taint(self, request: CompromiseRequest) -> CompromiseResult:
        ports = self._ports
        state = ports.changes.state
        entry = compromise.find_entry(state, request.key_id)
        affected = self._dependents(state, entry)
        now = ports.clock.now()

        def change(current: AuthorityState) -> AuthorityState:
            return compromise.taint(current, entry.key_id, now, ports.policy, reason=request.reason)

        # The dry run computes the real (pure) change, so it refuses and describes exactly what a real run would.
        after = change(state) if request.dry_run else await ports.changes.apply(change)
        result = CompromiseResult("taint", request.dry_run, str(entry.kind), entry.serial, entry.key_id,
                                  compromise.describe_taint(entry, state, after), tuple(c.serial for c in affected))
        if request.dry_run:
            return result
        ports.rotations.labels(kind=str(entry.kind), reason="taint").inc()
        if entry.kind is not CAKind.ROOT and affected:
            # Every SVID under the tainted intermediate is due now (not spread: the key may be in an
            # attacker's hands); the reconcile pass signs them on the pool and SDS pushes them.
            def due_now() -> None:
                for cert in affected:
                    ports.workloads.reschedule(cert, now, forced=True)

            await ports.changes.exclusive(due_now)
            await ports.changes.reconcile(now)
        # A tainted root's SVIDs are re-issued by its emergency rotation once the new root passed the
        # ACK gate (override it with a forced root rotation if a stuck sidecar holds it).
        log.warning("CA tainted", extra={"kind": str(entry.kind), "serial": entry.serial, "key_id": entry.key_id,
                                         "reason": request.reason, "svids": len(affected)})
        return result

    async def _revoke(self, request: CompromiseRequest) -> CompromiseResult:
        ports = self._ports
        state = ports.changes.state
        entry = compromise.find_entry(state, request.key_id)
        blockers = compromise.revocation_blockers(state, entry)
        if blockers:
            raise PolicyViolationError("; ".join(blockers))
        live = self._dependents(state, entry)
        breaks = tuple(self._what_breaks(state, entry, live, ports.clock.now()))
        detail = (f"{entry.kind} {entry.serial} and every CA under it would leave every bundle"
                  if not breaks else f"{entry.kind} {entry.serial} still has dependents: " + "; ".join(breaks))
        result = CompromiseResult("revoke", request.dry_run, str(entry.kind), entry.serial, entry.key_id, detail,
                                  tuple(c.serial for c in live), breaks)
        if breaks and not request.force and not request.dry_run:
            raise PolicyViolationError(detail + " (wait, or revoke with force and accept that they stop verifying)")
        if request.dry_run:
            return result
        await ports.changes.apply(lambda s: compromise.revoke(s, entry.key_id))
        ports.rotations.labels(kind=str(entry.kind), reason="revoke").inc()
        log.warning("CA revoked", extra={"kind": str(entry.kind), "serial": entry.serial, "key_id": entry.key_id,
                                         "reason": request.reason, "forced": bool(breaks), "broken": len(breaks)})
        return dataclasses.replace(result, detail=f"{entry.kind} {entry.serial} revoked" +
                                   (f" despite: {'; '.join(breaks)}" if breaks else ""))

    def _what_breaks(self, state: AuthorityState, entry: CAEntry, live: list[WorkloadCert],
                     now: dt.datetime) -> list[str]:
        out = []
        if live:
            out.append(f"{len(live)} live SVID(s) over SDS still chain to it (e.g. {live[0].spiffe_id})")
        for ca in (entry, *compromise.descendants(state, entry)):
            if ca.kind is CAKind.ROOT or now >= (horizon := prune_time(state, ca, self._ports.policy)):
                continue
            # Leaves this registry cannot see (istiod's, another replica's, the CLI's, the CSR path's) are
            # bounded only by the longest lifetime they may have been given.
            who = "istiod leaves" if ca.kind is CAKind.ISTIOD_INTERMEDIATE else "leaves issued elsewhere"
            out.append(f"{who} signed by {ca.serial} may be valid until {horizon.isoformat()}")
        return out
