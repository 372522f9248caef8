"""The one exception tree of ca-service.

Edges (gRPC, HTTP, CLI) map these to statuses in one table each; callers get an opaque message,
the log gets the cause.
"""

from __future__ import annotations


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


class NotFoundError(CAServiceError):
    """The named resource does not exist."""


class PolicyViolationError(CAServiceError):
    """The request is well formed but not allowed (wrong identity, CA requested, key too weak)."""


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
