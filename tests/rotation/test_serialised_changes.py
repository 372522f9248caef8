"""Every CA-state change goes through the reconciler's one lock: a forced rotation waits for a running tick."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
from collections.abc import Sequence

import pytest

from ca_service.errors import NotReadyError
from ca_service.pki.identity import SpiffeId
from ca_service.pki.templates import CAKind
from ca_service.rotation.state import SlotState
from ca_service.services.ports import RotationRequest, RotationScope
from ca_service.services.reconciler import POOL_MIN_BATCH
from ca_service.services.rotator import RotationService
from ca_service.services.workloads import ChunkSink, SignedSvid
from tests.rotation.rotation_kit import Env


class FakeBlockingSigner:
    """A batch signer that holds the tick inside the pass until the test releases it."""

    def __init__(self, env: Env) -> None:
        self._env = env
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def issue_many(self, spiffe_ids: Sequence[SpiffeId], *, now: dt.datetime,
                         on_chunk: ChunkSink | None = None) -> list[SignedSvid]:
        self.entered.set()
        await self.release.wait()
        out = []
        for spiffe_id in spiffe_ids:
            key = self._env.authority.issuer.new_key()
            svid = self._env.authority.issuer.issue(spiffe_id, key.public_key(), now=now)
            out.append(SignedSvid(b"unused-key-pem", svid, 0.0))
        if on_chunk is not None:
            on_chunk(0, out)
        return out


async def test_a_forced_rotation_issued_while_a_tick_runs_waits_for_the_tick(env: Env):
    for i in range(POOL_MIN_BATCH):
        env.registry.get_or_issue(f"node-{i}", SpiffeId.parse(f"spiffe://cluster.local/ns/a/sa/s{i}"))
    signer = FakeBlockingSigner(env)
    env.reconciler.signer = signer
    env.clock.advance(dt.timedelta(hours=23))  # every SVID is due for renewal
    signing_before = env.authority.state.active(CAKind.INTERMEDIATE).key_id
    tick = asyncio.create_task(env.reconciler.reconcile())
    await asyncio.wait_for(signer.entered.wait(), 5)
    rotation = asyncio.create_task(RotationService.of(env.reconciler).rotate(
        RotationRequest(RotationScope.INTERMEDIATE, reason="drill")))
    for _ in range(50):  # give the forced rotation every chance to run ahead (event-loop turns, not time)
        await asyncio.sleep(0)
    assert not rotation.done()
    assert env.authority.state.active(CAKind.INTERMEDIATE).key_id == signing_before
    signer.release.set()
    report = await asyncio.wait_for(tick, 5)
    result = await asyncio.wait_for(rotation, 5)
    assert report.renewed == POOL_MIN_BATCH
    # The tick's renewals were all signed by the intermediate that was active when the tick began.
    assert {c.svid.issuer_key_id for c in env.registry} == {signing_before}
    assert result.new_serials and env.authority.state.active(CAKind.INTERMEDIATE).key_id != signing_before


async def test_a_forced_rotation_with_no_tick_running_applies_at_once(env: Env):
    before = env.authority.state.revision
    await RotationService.of(env.reconciler).rotate(RotationRequest(RotationScope.INTERMEDIATE, reason="drill"))
    assert env.authority.state.revision == before + 1


async def test_the_dry_run_and_the_real_run_refuse_alike_without_a_prepared_intermediate_or_root_key(env: Env):
    state = env.authority.state
    keyless = state.replace(entries=[dataclasses.replace(e, key=None) if e.kind is CAKind.ROOT else e
                                     for e in state.entries if e.state is not SlotState.PREPARED])
    env.authority.commit(keyless)
    rotator = RotationService.of(env.reconciler)
    for dry_run in (True, False):
        with pytest.raises(NotReadyError, match="root key"):
            await rotator.rotate(RotationRequest(RotationScope.INTERMEDIATE, reason="x", dry_run=dry_run))
