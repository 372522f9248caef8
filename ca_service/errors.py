"""The one exception tree of ca-service.

Edges (gRPC, HTTP) map these to statuses through the one :data:`ERROR_TABLE` below; callers get an opaque message,
the log gets the cause.
"""

from __future__ import annotations

from dataclasses import dataclass


class CAServiceError(Exception):
    """Base of every error ca-service raises on purpose."""


class ConfigError(CAServiceError):
    """The configuration is invalid.  ``problems`` lists every problem found, each naming its key."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("invalid configuration:\n  - " + "\n  - ".join(self.problems))


class NotReadyError(CAServiceError):
    """The CA cannot serve yet (no active signer, state not loaded)."""


class InvalidRequestError(CAServiceError):
    """The request is malformed (bad CSR, bad SPIFFE ID, unknown field)."""


class RequestTooLargeError(InvalidRequestError):
    """The request is larger than the limit for its kind (a body, a message); nothing of it was processed."""


class NotFoundError(CAServiceError):
    """The named resource does not exist."""


class PolicyViolationError(CAServiceError):
    """The request is well formed but not allowed (wrong identity, CA requested, key too weak)."""


class CSRRejectedError(PolicyViolationError):
    """A CSR asks for something the caller is not entitled to; ``rule`` names the rule it broke."""

    def __init__(self, rule: str, message: str) -> None:
        self.rule = rule
        super().__init__(f"{message} (rule: {rule})")


class AuthenticationError(CAServiceError):
    """The caller could not be identified."""


class OverloadedError(CAServiceError):
    """Too many requests (one identity's rate, or the daemon's in-flight cap); retry after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: float) -> None:
        self.retry_after = retry_after
        super().__init__(message)


class StorageError(CAServiceError):
    """Persistent state could not be read or written; nothing was changed."""


class ConflictError(StorageError):
    """A compare-and-swap write lost: someone else wrote first.  Reload and retry."""


@dataclass(frozen=True)
class ErrorStatus:
    """How one class of error is answered at every edge: gRPC status code (by name, so this module stays
    free of grpc), HTTP status, the audit/metric result label, and the opaque message clients get."""

    error: type[CAServiceError]
    grpc_code: str
    http_status: int
    result: str
    message: str


# THE error table of ca-service: rpc/status.py and web/admin.py both read it.  Ordered, first match
# wins (subclasses before their bases).  A lost compare-and-swap is ABORTED/409: the caller may retry
# the whole operation; a foreign trust domain is a policy violation, never "retry later".
ERROR_TABLE: tuple[ErrorStatus, ...] = (
    ErrorStatus(AuthenticationError, "UNAUTHENTICATED", 401, "unauthenticated", "caller could not be authenticated"),
    # A CSR asking for more than its caller's identity is a bad request (as istiod and istio-csr answer),
    # not a denial; before PolicyViolationError, its base.
    ErrorStatus(CSRRejectedError, "INVALID_ARGUMENT", 400, "csr-rejected", "certificate request refused"),
    ErrorStatus(PolicyViolationError, "PERMISSION_DENIED", 403, "forbidden", "caller is not entitled to this resource"),
    ErrorStatus(NotFoundError, "NOT_FOUND", 404, "not-found", "no such resource"),
    ErrorStatus(RequestTooLargeError, "RESOURCE_EXHAUSTED", 413, "too-large", "request too large"),
    ErrorStatus(InvalidRequestError, "INVALID_ARGUMENT", 400, "invalid", "malformed request"),
    ErrorStatus(ConflictError, "ABORTED", 409, "conflict", "conflicting change, retry"),
    # The state could not be written (read-only or full disk, API server down): nothing changed; retry
    # once it is fixed.  After ConflictError, its subclass.
    ErrorStatus(StorageError, "UNAVAILABLE", 503, "storage-unavailable", "state storage unavailable, retry later"),
    # Rate limit or in-flight cap: the gRPC edge adds a retry-after hint (OverloadedError.retry_after).
    ErrorStatus(OverloadedError, "RESOURCE_EXHAUSTED", 429, "overloaded", "overloaded, retry later"),
    ErrorStatus(NotReadyError, "UNAVAILABLE", 503, "not-ready", "not ready, retry later"),
    ErrorStatus(CAServiceError, "INTERNAL", 500, "error", "internal error"),
)
INTERNAL = ERROR_TABLE[-1]


def error_status(exc: BaseException) -> ErrorStatus:
    """The row of :data:`ERROR_TABLE` for ``exc`` (INTERNAL for anything that is not ours)."""
    return next((row for row in ERROR_TABLE if isinstance(exc, row.error)), INTERNAL)
