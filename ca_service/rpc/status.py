"""Errors to gRPC status codes at the edge of every RPC, from the one table ``errors.ERROR_TABLE``.

Clients get an opaque message (enough to know what to fix on their side, nothing about our
internals); the log gets the cause, once, here.
"""

from __future__ import annotations

import logging
from typing import Any, NoReturn

import grpc

from ca_service.errors import ERROR_TABLE, OverloadedError, error_status

log = logging.getLogger(__name__)

# The gRPC view of errors.ERROR_TABLE (the one table): (class, code, opaque client message), first match wins.
STATUS_TABLE: tuple[tuple[type[BaseException], grpc.StatusCode, str], ...] = tuple(
    (row.error, grpc.StatusCode[row.grpc_code], row.message) for row in ERROR_TABLE)


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and the opaque client message for ``exc`` (INTERNAL for anything unexpected)."""
    row = error_status(exc)
    return grpc.StatusCode[row.grpc_code], row.message


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
