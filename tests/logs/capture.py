"""The daemon's real log pipeline (LogGuard + formatter) writing into a buffer, for log-safety tests."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from ca_service.logs import JSONFormatter, LogGuard, TextFormatter


@dataclass
class CapturedLog:
    buffer: io.StringIO
    guard: LogGuard

    @property
    def text(self) -> str:
        return self.buffer.getvalue()

    def lines(self) -> list[str]:
        return self.text.splitlines()


@contextmanager
def captured_log(*, json: bool = False, guard: LogGuard | None = None) -> Iterator[CapturedLog]:
    """Attach the production handler setup to the root logger for the duration (other handlers stay)."""
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(JSONFormatter() if json else TextFormatter())
    guard = guard or LogGuard(use_timer=False)
    handler.addFilter(guard)
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield CapturedLog(buffer, guard)
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
