"""istiod's ``cacerts`` Secret (plug-in CA layout), written by the leader.

The same four files the directory publisher writes (``ca-cert.pem``, ``ca-key.pem``, ``root-cert.pem``,
``cert-chain.pem``), built and checked by :mod:`ca_service.pki.cacerts` before every write: istiod
would refuse a set that fails those checks, and an invalid Secret is worse than the last good one.
``root-cert.pem`` follows the state's root set, so it goes A -> A+B -> B across a root rotation.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
from collections.abc import Mapping

from kubernetes import client

from ca_service.clock import Clock, SystemClock
from ca_service.kube.objects import SECRETS, KubeMetrics, Outcome, ensure_object
from ca_service.pki.cacerts import build_cacerts, check_cacerts
from ca_service.pki.templates import CAKind
from ca_service.rotation.state import AuthorityState, SlotState


def cacerts_files(state: AuthorityState) -> dict[str, bytes] | None:
    """The four files for the active istiod intermediate of ``state``; None when it has none with a key."""
    active = state.of_kind(CAKind.ISTIOD_INTERMEDIATE, SlotState.ACTIVE)
    if not active or active[0].key is None:
        return None
    entry = active[0]
    assert entry.key is not None
    return build_cacerts(entry.cert, entry.key, state.chain_above(entry), state.roots)


class CacertsSecretWriter:
    def __init__(self, api: client.ApiClient, namespace: str, name: str, metrics: KubeMetrics,
                 clock: Clock | None = None) -> None:
        self._api = api
        self.namespace = namespace
        self.name = name
        self._metrics = metrics
        self._clock = clock or SystemClock()

    def write(self, files: Mapping[str, bytes], *, now: dt.datetime | None = None) -> Outcome:
        """Check ``files`` with istiod's rules, then create or update the Secret (blocking).

        Raises:
            CacertsError: the set would be refused by istiod; nothing is written.
            StorageError: the API refused or failed.
        """
        check_cacerts(files, now=now or self._clock.now())
        data = {key: base64.b64encode(value).decode() for key, value in files.items()}
        return ensure_object(self._api, SECRETS, self.namespace, self.name, data, self._metrics)

    async def apply(self, files: Mapping[str, bytes]) -> Outcome:
        return await asyncio.to_thread(self.write, files)
