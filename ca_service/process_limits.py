"""Process-wide protections: the open-file limit and what happens when accept() runs out of descriptors.

Every connection is a file descriptor; with the usual soft limit of 1,024, 1,100 idle sockets on one
listener starved every other one.  :func:`raise_open_file_limit` lifts the soft limit to the hard one
at start (the hard limit is what the operator or container runtime granted), and
:func:`install_accept_error_handler` turns asyncio's traceback per failed accept() into one warning a
minute plus a counter.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from typing import Any

from prometheus_client import Counter

log = logging.getLogger(__name__)

# asyncio's message when accept() fails with EMFILE/ENFILE/ENOBUFS/ENOMEM (it retries after 1 s).
_ACCEPT_EXHAUSTED = "socket.accept() out of system resource"
# One warning a minute is enough to be seen; the counter says how many.
ACCEPT_ERROR_LOG_INTERVAL = 60.0


def raise_open_file_limit() -> tuple[int, int]:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit; returns (soft, hard) as now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit", extra={"soft": soft, "hard": hard, "error": str(exc)})
            return soft, hard
        log.info("open-file limit raised", extra={"soft_was": soft, "soft": target, "hard": hard})
        return target, hard
    log.info("open-file limit", extra={"soft": soft, "hard": hard})
    return soft, hard


class AcceptErrorHandler:
    """A loop exception handler: counts accept() exhaustion and logs it once a minute, no traceback."""

    def __init__(self, refused: Counter | None = None) -> None:
        self._refused = refused
        self._last_log = -ACCEPT_ERROR_LOG_INTERVAL
        self.suppressed = 0

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if not str(context.get("message", "")).startswith(_ACCEPT_EXHAUSTED):
            loop.default_exception_handler(context)
            return
        if self._refused is not None:
            self._refused.labels("any", "out_of_file_descriptors").inc()
        now = time.monotonic()
        if now - self._last_log < ACCEPT_ERROR_LOG_INTERVAL:
            self.suppressed += 1
            return
        self._last_log = now
        log.warning("accept() failed: out of file descriptors; new connections wait until some close",
                    extra={"error": str(context.get("exception")), "suppressed_since_last": self.suppressed})
        self.suppressed = 0


def install_accept_error_handler(refused: Counter | None = None) -> AcceptErrorHandler:
    handler = AcceptErrorHandler(refused)
    asyncio.get_running_loop().set_exception_handler(handler)
    return handler
