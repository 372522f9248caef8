"""Logging setup: human text by default, JSON lines for production.  Structured fields come from
``extra=``; nothing here ever formats key material (callers pass serials and key ids, never PEMs).

Everything a client or an operator sends (NACK details, node ids, resource names, admin reasons,
peer URLs) may reach a log line, so the handler, not the call sites, makes every line safe:

* :class:`LogGuard` (a filter on the handler) truncates every argument and structured field to
  ``max_field_chars`` with a ``…(N more)`` marker, and rate-limits repeats of one message template
  per logger: past ``repeat_burst`` lines per ``repeat_window`` the rest are dropped and counted, and
  one summary line says how many when the window closes (``ca_log_suppressed_total`` counts them too).
* :class:`TextFormatter` escapes newlines, CR, ANSI and other control or invisible characters, so
  one record is always one line; a traceback's lines are prefixed with ``  | `` so that none can
  pass for a record.  :class:`JSONFormatter` escapes by construction (``json.dumps``).
"""

from __future__ import annotations

import atexit
import dataclasses
import datetime as dt
import json
import logging
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from ca_service.config import LogFormat, LoggingSettings

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}
# C0, DEL, C1 (ANSI CSI is ESC or U+009B), line/paragraph separators, bidi overrides and zero-width
# characters: anything that can end a line, move the cursor or make text read differently than it is.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u206f\ufeff\ud800-\udfff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
# A traceback is our own text plus one exception message; 8 KiB keeps every frame of a normal one.
_MAX_TRACEBACK = 8192
_SUMMARY_LOGGER = "ca_service.logs"


def escape(text: str) -> str:
    """``text`` with every unsafe character replaced by a visible escape (``\\n``, ``\\x1b``, ``\\u2028``)."""
    if not _UNSAFE.search(text):
        return text
    return _UNSAFE.sub(lambda m: _NAMED.get(m[0]) or (f"\\x{ord(m[0]):02x}" if ord(m[0]) < 0x100
                                                       else f"\\u{ord(m[0]):04x}"), text)


def truncate(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, saying how many more there were."""
    return text if len(text) <= limit else f"{text[:limit]}…({len(text) - limit} more)"


def _fields(record: logging.LogRecord) -> dict[str, object]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


class _Bounded:
    """A log argument that is neither a string nor a number: its str() and repr() are bounded."""

    __slots__ = ("_limit", "_value")

    def __init__(self, value: object, limit: int) -> None:
        self._value, self._limit = value, limit

    def __str__(self) -> str:
        return truncate(str(self._value), self._limit)

    def __repr__(self) -> str:
        return truncate(repr(self._value), self._limit)


def _bound(value: Any, limit: int) -> Any:
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return truncate(value, limit)
    return _Bounded(value, limit)


@dataclasses.dataclass
class _Window:
    started: float
    passed: int = 0
    suppressed: int = 0
    level: int = logging.WARNING


class LogGuard(logging.Filter):
    """Truncates arguments and fields, and rate-limits repeats of one (logger, template) pair.

    ``now`` is a monotonic clock in seconds (injectable for tests); :meth:`flush` closes the windows
    that ended and logs one summary line each.  A timer thread calls it when suppression began, so a
    flood that stops still gets its summary.
    """

    # Distinct templates are finite, but a call site that logs client text as the message would make
    # one key per line: past this many open windows the expired ones are closed early.
    MAX_WINDOWS = 1000

    def __init__(self, *, max_field_chars: int = 256, repeat_burst: int = 20, repeat_window: float = 10.0,
                 now: Callable[[], float] = time.monotonic, use_timer: bool = True) -> None:
        super().__init__()
        self.max_field_chars = max_field_chars
        self.repeat_burst = repeat_burst
        self.repeat_window = repeat_window
        self._now = now
        self._use_timer = use_timer
        self._windows: dict[tuple[str, str], _Window] = {}
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self.suppressed_total = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "_ca_guarded", False):
            return True  # another handler's guard already bounded it (and counted it)
        if record.name != _SUMMARY_LOGGER and not self._admit(record):
            return False
        record._ca_guarded = True
        limit = self.max_field_chars
        if isinstance(record.args, tuple):
            record.args = tuple(_bound(a, limit) for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: _bound(v, limit) for k, v in record.args.items()}
        if not isinstance(record.msg, str):
            record.msg = str(_bound(record.msg, limit))
        elif not record.args:
            # A message without arguments may itself be client text (log.info(exc)): bound it whole.
            record.msg = truncate(record.msg, limit * 4)
        for key, value in _fields(record).items():
            setattr(record, key, _bound(value, limit))
        return True

    def _admit(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg)[:200])
        now = self._now()
        with self._lock:
            window = self._windows.get(key)
            if window is not None and now - window.started >= self.repeat_window:
                self._close(key, window)
                window = None
            if window is None:
                if len(self._windows) >= self.MAX_WINDOWS:
                    self._flush_locked(now, force=True)
                window = self._windows[key] = _Window(started=now)
            if window.passed < self.repeat_burst:
                window.passed += 1
                return True
            window.suppressed += 1
            window.level = max(window.level, record.levelno)
            self.suppressed_total += 1
            if window.suppressed == 1:
                self._schedule(window.started + self.repeat_window - now)
            return False

    def _schedule(self, delay: float) -> None:
        if not self._use_timer or self._timer is not None:
            return
        self._timer = threading.Timer(max(delay, 0.0), self._on_timer)
        self._timer.daemon = True
        self._timer.start()

    def _on_timer(self) -> None:
        with self._lock:
            self._timer = None
        self.flush()

    def flush(self, *, force: bool = False) -> None:
        """Close every window that ended (all of them with ``force``) and log its summary."""
        with self._lock:
            self._flush_locked(self._now(), force=force)
            pending = any(w.suppressed for w in self._windows.values())
            if pending:
                earliest = min(w.started for w in self._windows.values() if w.suppressed)
                self._schedule(earliest + self.repeat_window - self._now())

    def _flush_locked(self, now: float, *, force: bool) -> None:
        for key, window in list(self._windows.items()):
            if force or now - window.started >= self.repeat_window:
                self._close(key, window)

    def _close(self, key: tuple[str, str], window: _Window) -> None:
        del self._windows[key]
        if window.suppressed:
            logging.getLogger(_SUMMARY_LOGGER).log(
                window.level, "suppressed %d repeats of a log message in %.0fs", window.suppressed,
                self.repeat_window, extra={"source_logger": key[0], "template": key[1]})


# The guard of the process's logging configuration (logging itself is process-wide).
_ACTIVE: list[LogGuard] = []


def suppressed_total() -> int:
    return sum(g.suppressed_total for g in _ACTIVE)


class SuppressedLogsCollector(Collector):
    """``ca_log_suppressed_total``: log lines dropped by the repeat limit since the process started."""

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily("ca_log_suppressed", "Log lines dropped by the repeat rate limit",
                                  value=suppressed_total())


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            **_fields(record),
        }
        if record.exc_info:
            doc["exc"] = truncate(self.formatException(record.exc_info), _MAX_TRACEBACK)
        return json.dumps(doc, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        record.message = escape(record.getMessage())
        line = self.formatMessage(self._with_time(record))
        fields = _fields(record)
        if fields:
            line += " " + " ".join(f"{escape(str(k))}={escape(str(v))}" for k, v in fields.items())
        trace = self.formatException(record.exc_info) if record.exc_info else ""
        if record.stack_info:
            trace = f"{trace}\n{self.formatStack(record.stack_info)}".strip("\n")
        if trace:
            # Keep the traceback readable but make every line of it visibly a continuation.
            lines = truncate(trace, _MAX_TRACEBACK).split("\n")
            line += "".join(f"\n  | {escape(part)}" for part in lines)
        return line

    def _with_time(self, record: logging.LogRecord) -> logging.LogRecord:
        record.asctime = self.formatTime(record, self.datefmt)
        return record


def configure_logging(settings: LoggingSettings) -> LogGuard:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter() if settings.format is LogFormat.JSON else TextFormatter())
    guard = LogGuard(max_field_chars=settings.max_field_chars, repeat_burst=settings.repeat_burst,
                     repeat_window=settings.repeat_window.total_seconds())
    handler.addFilter(guard)
    _ACTIVE[:] = [guard]
    # atexit handlers run in reverse order of registration, so this runs before logging's own
    # shutdown flushes the handlers: a flood in the last window still gets its summary line.
    atexit.register(guard.flush, force=True)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.level.upper())
    # grpc/aiohttp access chatter at INFO would drown the CA's own events.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    return guard
