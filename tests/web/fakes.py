"""A hand-written FakeRotator over the real Authority and WorkloadRegistry (the real one is on another branch)."""

from __future__ import annotations

from ca_service.pki.templates import CAKind
from ca_service.rotation.minting import mint_intermediate
from ca_service.rotation.state import SlotState
from ca_service.services.authority import Authority
from ca_service.services.ports import RotationRequest, RotationResult, RotationScope
from ca_service.services.workloads import WorkloadCert, WorkloadRegistry


class FakeRotator:
    """Does what the real one would for workload scopes and an intermediate swap, without the schedule."""

    def __init__(self, authority: Authority, registry: WorkloadRegistry) -> None:
        self.authority = authority
        self.registry = registry
        self.requests: list[RotationRequest] = []

    def _targets(self, request: RotationRequest) -> list[WorkloadCert]:
        certs = list(self.registry)
        if request.scope is RotationScope.WORKLOAD:
            return [c for c in certs if str(c.spiffe_id) == request.spiffe_id]
        if request.scope is RotationScope.NAMESPACE:
            return [c for c in certs if (c.spiffe_id.kubernetes or ("", ""))[0] == request.namespace]
        return certs

    async def rotate(self, request: RotationRequest) -> RotationResult:
        self.requests.append(request)
        if request.scope is RotationScope.INTERMEDIATE:
            return self._rotate_intermediate(request)
        targets = self._targets(request)
        affected = tuple(f"{c.svid.leaf.serial_number:x}" for c in targets)
        identities = tuple(sorted({str(c.spiffe_id) for c in targets}))
        if request.dry_run:
            return RotationResult(request.scope, True, affected, (), identities, "would re-issue")
        new = tuple(f"{self.registry.reissue(c.node_id, c.spiffe_id, reason='forced').svid.leaf.serial_number:x}"
                    for c in targets)
        return RotationResult(request.scope, False, affected, new, identities, "re-issued")

    def _rotate_intermediate(self, request: RotationRequest) -> RotationResult:
        state = self.authority.state
        old = state.active(CAKind.INTERMEDIATE)
        if request.dry_run:
            return RotationResult(request.scope, True, (old.serial,), (), (), "would mint a new intermediate")
        s = self.authority.settings
        new = mint_intermediate(state.active(CAKind.ROOT), state.trust_domain, kind=CAKind.INTERMEDIATE,
                                algorithm=s.key_algorithm, ttl=s.intermediate_ttl, now=self.authority.clock.now())
        # Old one pruned straight away: the test wants to see its series disappear.
        entries = [e for e in state.entries if e is not old] + [new]
        self.authority.commit(state.replace(entries=entries))
        return RotationResult(request.scope, False, (old.serial,), (new.serial,), (), "swapped")


__all__ = ["FakeRotator", "SlotState"]
