"""The admin audit log: one JSON line per admin call, append-only, apart from the main log.

An auditor must be able to trust that a line, once the caller got its answer, is on disk: every
line is written with a single ``write`` on an ``O_APPEND`` descriptor (no interleaving between
writers) and ``fsync``-ed before the handler replies.  Admin calls are rare (humans, scripts), so
the fsync on the event loop costs nothing worth a thread.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ca_service.clock import Clock

AUDIT_FILE_MODE = 0o600


@dataclass(frozen=True)
class AuditRecord:
    caller: str  # "token", a SPIFFE ID, or "anonymous" for refused calls
    action: str  # "status", "rotate"
    result: str  # "ok", "dry-run", "unauthenticated", "forbidden", "invalid", "error"
    scope: str | None = None
    reason: str | None = None
    affected_serials: Sequence[str] = ()
    new_serials: Sequence[str] = ()
    detail: str = ""
    remote: str = ""
    extra: dict[str, object] = field(default_factory=dict)


class AuditLog:
    """Appends :class:`AuditRecord` lines to ``path`` (created 0600; an existing file is tightened to 0600)."""

    def __init__(self, path: Path, clock: Clock) -> None:
        self.path = path
        self._clock = clock
        self._fd: int | None = None

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), AUDIT_FILE_MODE)
        # O_CREAT's mode is filtered by the umask and ignored for an existing file: set it explicitly.
        os.fchmod(fd, AUDIT_FILE_MODE)
        self._fd = fd

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def write(self, record: AuditRecord) -> None:
        if self._fd is None:
            self.open()
        assert self._fd is not None
        doc: dict[str, object] = {
            "time": self._clock.now().astimezone(dt.UTC).isoformat(timespec="milliseconds"),
            "caller": record.caller,
            "action": record.action,
            "scope": record.scope,
            "reason": record.reason,
            "result": record.result,
            "affected_serials": list(record.affected_serials),
            "new_serials": list(record.new_serials),
            "detail": record.detail,
            "remote": record.remote,
            **record.extra,
        }
        line = (json.dumps(doc, sort_keys=False, default=str) + "\n").encode()
        os.write(self._fd, line)
        os.fsync(self._fd)
