"""The ``trust-bundle`` ConfigMap: ``<trust-domain>.pem`` per trust domain and ``combined-ca.pem``
(own domain first), the layout of the bundle files (federation/files.py), for multi-region meshes."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from kubernetes import client

from ca_service.kube.objects import CONFIGMAPS, KubeMetrics, Outcome, ensure_object

COMBINED = "combined-ca.pem"


def trust_bundle_data(bundles: Mapping[str, str], own: str) -> dict[str, str]:
    """ConfigMap data from PEM bundles keyed by trust domain name; ``own`` first in ``combined-ca.pem``.

    Raises:
        ValueError: if ``own`` has no bundle (a ConfigMap without our own roots would mislead consumers).
    """
    if own not in bundles:
        raise ValueError(f"no bundle for the own trust domain {own}")
    order = [own, *sorted(td for td in bundles if td != own)]
    data = {f"{td}.pem": bundles[td] for td in order}
    data[COMBINED] = "".join(bundles[td] for td in order)
    return data


class TrustBundleWriter:
    def __init__(self, api: client.ApiClient, namespace: str, name: str, metrics: KubeMetrics) -> None:
        self._api = api
        self.namespace = namespace
        self.name = name
        self._metrics = metrics

    def write(self, bundles: Mapping[str, str], own: str) -> Outcome:
        """Create or update the ConfigMap (blocking).  Raises: StorageError."""
        return ensure_object(self._api, CONFIGMAPS, self.namespace, self.name, trust_bundle_data(bundles, own),
                             self._metrics)

    async def apply(self, bundles: Mapping[str, str], own: str) -> Outcome:
        return await asyncio.to_thread(self.write, bundles, own)
