"""The one table that maps ca-service errors to gRPC status codes (the edge of every RPC).

Clients get an opaque message (enough to know what to fix on their side, nothing about our
internals); the log gets the cause, once, here.
"""

from __future__ import annotations

import logging
from typing import Any, NoReturn

import grpc

from ca_service.errors import (
    AuthenticationError,
    CAServiceError,
    InvalidRequestError,
    NotFoundError,
    NotReadyError,
    OverloadedError,
    PolicyViolationError,
)
from ca_service.pki.csr import CSRRejectedError

log = logging.getLogger(__name__)

# Ordered: the first matching class wins (subclasses before their bases).
STATUS_TABLE: tuple[tuple[type[BaseException], grpc.StatusCode, str], ...] = (
    (AuthenticationError, grpc.StatusCode.UNAUTHENTICATED, "caller could not be authenticated"),
    # A CSR asking for more than its caller's identity is a bad request (istiod, istio-csr), not a denial.
    (CSRRejectedError, grpc.StatusCode.INVALID_ARGUMENT, "certificate request refused"),
    (PolicyViolationError, grpc.StatusCode.PERMISSION_DENIED, "caller is not entitled to this resource"),
    (NotFoundError, grpc.StatusCode.NOT_FOUND, "no such resource"),
    (InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT, "malformed request"),
    (OverloadedError, grpc.StatusCode.RESOURCE_EXHAUSTED, "overloaded, retry later"),
    (NotReadyError, grpc.StatusCode.UNAVAILABLE, "not ready, retry later"),
    (CAServiceError, grpc.StatusCode.INTERNAL, "internal error"),
)


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and the opaque client message for ``exc`` (INTERNAL for anything unexpected)."""
    for cls, code, message in STATUS_TABLE:
        if isinstance(exc, cls):
            return code, message
    return grpc.StatusCode.INTERNAL, "internal error"


async def abort_with(context: grpc.aio.ServicerContext[Any, Any], exc: BaseException, *, rpc: str) -> NoReturn:
    """Log the cause and end the call with the mapped status."""
    code, message = status_for(exc)
    if code is grpc.StatusCode.INTERNAL:
        log.error("%s failed", rpc, exc_info=exc, extra={"peer": context.peer()})
    else:
        log.warning("%s refused: %s", rpc, exc, extra={"peer": context.peer(), "status": code.name})
    # gRPC has no standard retry hint for RESOURCE_EXHAUSTED; "retry-after" (seconds) mirrors HTTP's.
    trailing = (("retry-after", str(max(1, round(exc.retry_after)))),) if isinstance(exc, OverloadedError) else ()
    await context.abort(code, message, trailing_metadata=trailing)
    raise AssertionError("unreachable: context.abort raises")  # pragma: no cover
