"""The API client and the translation of its errors into the one error tree.

Callers get :class:`StorageError` (or :class:`ConflictError` for a lost compare-and-swap) whose message
names the verb, the resource, the object and the namespace, so an RBAC denial or a missing namespace in
a log line says exactly which permission or object is missing.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import urllib3
from kubernetes import client, config
from kubernetes.client.rest import ApiException

from ca_service.errors import ConflictError, NotReadyError, StorageError

log = logging.getLogger(__name__)

# (connect, read) seconds for one API call.  The API server answers a get/update in milliseconds; ten
# seconds covers a loaded control plane, and no call may hang a caller (or a shutdown) for longer.
REQUEST_TIMEOUT = (3.0, 10.0)
MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGER = "ca-service"
LABELS = {MANAGED_BY: MANAGER}
# An API server's message is echoed into our errors and logs; it is server text, but bounded all the same.
_MAX_MESSAGE = 300


def build_api_client(kubeconfig: Path | None) -> client.ApiClient:
    """An ApiClient from ``kubeconfig``, or from the pod's service account when it is None.

    Raises:
        StorageError: if the configuration cannot be loaded (no such file, not running in a pod).
    """
    configuration = client.Configuration()
    try:
        if kubeconfig is None:
            config.load_incluster_config(client_configuration=configuration)
        else:
            config.load_kube_config(config_file=str(kubeconfig), client_configuration=configuration,
                                    persist_config=False)
    except (config.ConfigException, OSError) as exc:
        where = f"kubeconfig {kubeconfig}" if kubeconfig else "in-cluster configuration (service account)"
        raise StorageError(f"cannot load the Kubernetes {where}: {exc}") from None
    # No hidden urllib3 retries: every caller has its own retry loop and backoff, and a retry inside a
    # call would stretch its timeout past what the caller (a lease renewal) can afford.
    configuration.retries = False
    return client.ApiClient(configuration)


def is_managed(metadata: Any) -> bool:
    """Whether an object (model or dict metadata) carries our managed-by label."""
    labels = metadata.get("labels") if isinstance(metadata, dict) else getattr(metadata, "labels", None)
    return isinstance(labels, dict) and labels.get(MANAGED_BY) == MANAGER


def api_message(exc: ApiException) -> str:
    try:
        message = str(json.loads(exc.body or "{}").get("message") or exc.reason)
    except (ValueError, AttributeError):
        message = str(exc.reason)
    return message[:_MAX_MESSAGE]


def _missing_kind(exc: ApiException) -> str:
    try:
        return str((json.loads(exc.body or "{}").get("details") or {}).get("kind") or "")
    except (ValueError, AttributeError):
        return ""


def translate(exc: Exception, *, verb: str, resource: str, name: str | None, namespace: str | None) -> StorageError:
    """The StorageError for a failed API call (ConflictError for 409)."""
    target = f"{resource}/{name}" if name else resource
    where = f"in namespace {namespace}" if namespace else "cluster-wide"
    if isinstance(exc, ApiException):
        message = api_message(exc)
        if exc.status == 409:
            return ConflictError(f"conflict: {verb} {target} {where}: {message}")
        if exc.status == 403:
            return StorageError(f"forbidden: cannot {verb} {target} {where}: {message}")
        if exc.status == 404 and namespace and _missing_kind(exc) == "namespaces":
            return StorageError(f"namespace {namespace} does not exist (cannot {verb} {target}): {message}")
        if exc.status == 404:
            return StorageError(f"not found: cannot {verb} {target} {where}: {message}")
        return StorageError(f"cannot {verb} {target} {where}: HTTP {exc.status}: {message}")
    return StorageError(f"cannot reach the Kubernetes API server to {verb} {target} {where}: "
                        f"{type(exc).__name__}: {str(exc)[:_MAX_MESSAGE]}")


# What a call can fail with besides an API answer: the server is down, slow, or the connection broke.
TRANSPORT_ERRORS = (urllib3.exceptions.HTTPError, OSError)


@contextmanager
def api_call(verb: str, resource: str, name: str | None, namespace: str | None) -> Iterator[None]:
    """Translate whatever the block raises from the client into StorageError/ConflictError."""
    try:
        yield
    except (ApiException, *TRANSPORT_ERRORS) as exc:
        raise translate(exc, verb=verb, resource=resource, name=name, namespace=namespace) from exc


@contextmanager
def unavailable_on_failure(what: str) -> Iterator[None]:
    """Turn an API answer that is an error, or a transport failure, into NotReadyError (retry later).

    For reads a caller is waiting on (a TokenReview, a pod lookup): the message names ``what`` and the HTTP
    status when the API answered (403: RBAC), never the response body.
    """
    try:
        yield
    except (ApiException, *TRANSPORT_ERRORS) as exc:
        answered = f" (HTTP {exc.status})" if isinstance(exc, ApiException) else ""
        raise NotReadyError(f"{what} failed: {type(exc).__name__}{answered}") from exc


def status_of(exc: BaseException) -> int | None:
    """The HTTP status behind a translated error (its ``__cause__``), if any."""
    cause = exc.__cause__ if isinstance(exc, StorageError) else exc
    return cause.status if isinstance(cause, ApiException) else None
