"""What an SDS client may ask of the daemon before any work is done for it.

- :func:`check_request` bounds one request: ``node.id``, node metadata, the number and size of
  resource names.  A 1 MiB ``node.id`` held by 200 streams cost 210 MB; past a bound the client gets
  INVALID_ARGUMENT saying which bound (numbers only, never its own input echoed back).
- :class:`StreamAdmission` admits new streams at a bounded rate (token bucket).  A 5,000-stream
  connect storm lost 4-14 % of its streams as INTERNAL/CANCELLED with nothing logged; shed streams
  now get RESOURCE_EXHAUSTED at once, are counted and logged (at most once per interval), and Envoy's
  retry backoff spreads them out until all are served.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import Counter

from ca_service.errors import InvalidRequestError
from ca_service.services.admission import TokenBucket
from ca_service.settings import SdsLimits

log = logging.getLogger(__name__)

# A storm sheds thousands of streams a second: one log line per interval, with the count since the last.
SHED_LOG_INTERVAL = 10.0


class RequestLimitError(InvalidRequestError):
    """A request exceeds a configured bound; the message names the bound and is safe to send back."""


def _check_names(field: str, names: Iterable[str], limits: SdsLimits) -> None:
    count = 0
    for name in names:
        count += 1
        size = len(name.encode())
        if size > limits.max_resource_name_bytes:
            raise RequestLimitError(f"a name in {field} is {size} bytes; the limit is {limits.max_resource_name_bytes}")
    if count > limits.max_resource_names:
        raise RequestLimitError(f"{field} has {count} names; the limit is {limits.max_resource_names}")


def check_request(request: Any, limits: SdsLimits) -> None:
    """Raise :class:`RequestLimitError` if a (Delta)DiscoveryRequest is over a bound of ``limits``."""
    node_id = len(request.node.id.encode())
    if node_id > limits.max_node_id_bytes:
        raise RequestLimitError(f"node.id is {node_id} bytes; the limit is {limits.max_node_id_bytes}")
    metadata = request.node.metadata.ByteSize()
    if metadata > limits.max_node_metadata_bytes:
        raise RequestLimitError(f"node.metadata is {metadata} bytes; the limit is {limits.max_node_metadata_bytes}")
    # The message's own field table, not hasattr: asking a protobuf message for a field it lacks raises and
    # catches inside (~2 us a field), and every ACK comes through here.
    fields = request.DESCRIPTOR.fields_by_name
    for field in ("resource_names", "resource_names_subscribe", "resource_names_unsubscribe"):
        if field in fields:
            _check_names(field, getattr(request, field), limits)
    if "initial_resource_versions" in fields:
        _check_names("initial_resource_versions", request.initial_resource_versions, limits)
        for version in request.initial_resource_versions.values():
            if len(version.encode()) > limits.max_resource_name_bytes:
                raise RequestLimitError("a version in initial_resource_versions is over "
                                        f"{limits.max_resource_name_bytes} bytes")


class StreamAdmission:
    """Admits new SDS streams at ``limits.admission_rate`` (shared by every listener of the daemon)."""

    MESSAGE = "too many new SDS streams; retry with backoff"

    def __init__(self, limits: SdsLimits, *, shed: Counter | None = None,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._bucket = TokenBucket.full(limits.admission_rate, limits.admission_burst, monotonic())
        self._shed, self._monotonic = shed, monotonic
        self._last_log = -SHED_LOG_INTERVAL
        self._since_log = 0
        self.shed_total = 0

    def admit(self) -> bool:
        if not self._bucket.take(self._monotonic()):
            return True
        self.shed_total += 1
        self._since_log += 1
        if self._shed is not None:
            self._shed.inc()
        now = self._monotonic()
        if now - self._last_log >= SHED_LOG_INTERVAL:
            log.warning("SDS admission: shedding new streams (RESOURCE_EXHAUSTED)",
                        extra={"shed_since_last_log": self._since_log, "shed_total": self.shed_total})
            self._last_log, self._since_log = now, 0
        return False
