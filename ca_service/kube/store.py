"""``KubernetesStore``: the CA state record in one Secret, written with compare-and-swap.

The Secret's ``data`` keys are the record's keys (storage/codec.py: ``state.json``), so the Secret holds
exactly what the directory store keeps in a file.  The record's version is the Secret's
``metadata.resourceVersion``: an update names it and the API server refuses it (409) if anyone wrote in
between, which is also what fences a deposed leader.  ``expected_version=None`` is a *create*, refused
(409 AlreadyExists) when the Secret exists, so two replicas that start together on an empty cluster end
with one CA: the loser gets :class:`ConflictError` and loads the winner's state.

The port is synchronous (the authority calls it inline); each call is bounded by REQUEST_TIMEOUT.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping

from kubernetes import client

from ca_service.errors import ConflictError, StorageError
from ca_service.kube.client import LABELS, REQUEST_TIMEOUT, api_call, status_of
from ca_service.storage.base import AUTHORITY_RECORD, Record

RESOURCE = "secrets"


def secret_data(data: Mapping[str, bytes]) -> dict[str, str]:
    return {key: base64.b64encode(value).decode() for key, value in data.items()}


def record_data(data: Mapping[str, str] | None) -> dict[str, bytes]:
    """Record bytes from a Secret's base64 ``data``.

    Raises:
        StorageError: if a value is not base64 (the Secret was edited by hand).
    """
    try:
        return {key: base64.b64decode(value, validate=True) for key, value in (data or {}).items()}
    except ValueError as exc:
        raise StorageError(f"the state Secret holds a value that is not base64: {exc}") from None


class KubernetesStore:
    """:class:`~ca_service.storage.base.AuthorityStore` on a Secret in ``namespace``.

    The authority record lives in ``secret_name``; any other record name ``n`` in ``<secret_name>-<n>``.
    """

    def __init__(self, api: client.ApiClient, namespace: str, secret_name: str) -> None:
        self._core = client.CoreV1Api(api)
        self.namespace = namespace
        self.secret_name = secret_name

    def secret_for(self, name: str) -> str:
        return self.secret_name if name == AUTHORITY_RECORD else f"{self.secret_name}-{name}"

    def read(self, name: str) -> Record | None:
        secret_name = self.secret_for(name)
        try:
            with api_call("get", RESOURCE, secret_name, self.namespace):
                secret = self._core.read_namespaced_secret(secret_name, self.namespace,
                                                           _request_timeout=REQUEST_TIMEOUT)
        except StorageError as exc:
            if status_of(exc) == 404 and "does not exist" not in str(exc):
                return None  # never written; a missing *namespace* stays an error
            raise
        return Record(name, record_data(secret.data), secret.metadata.resource_version)

    def write(self, name: str, data: Mapping[str, bytes], *, expected_version: str | None) -> Record:
        secret_name = self.secret_for(name)
        body = client.V1Secret(
            metadata=client.V1ObjectMeta(name=secret_name, namespace=self.namespace, labels=dict(LABELS),
                                         resource_version=expected_version),
            type="Opaque", data=secret_data(data))
        if expected_version is None:
            with api_call("create", RESOURCE, secret_name, self.namespace):
                created = self._core.create_namespaced_secret(self.namespace, body, _request_timeout=REQUEST_TIMEOUT)
            return Record(name, dict(data), created.metadata.resource_version)
        try:
            with api_call("update", RESOURCE, secret_name, self.namespace):
                replaced = self._core.replace_namespaced_secret(secret_name, self.namespace, body,
                                                                _request_timeout=REQUEST_TIMEOUT)
        except StorageError as exc:
            if status_of(exc) == 404 and "does not exist" not in str(exc):
                # Deleted since we read it: the version we expected is gone, like any other lost CAS.
                raise ConflictError(f"secrets/{secret_name} in namespace {self.namespace} was deleted") from exc
            raise
        return Record(name, dict(data), replaced.metadata.resource_version)

    def describe(self) -> str:
        return f"kubernetes secret {self.namespace}/{self.secret_name}"
