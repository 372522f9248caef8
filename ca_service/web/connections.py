"""HTTP listeners that cannot be held open: a connection cap per listener and a header deadline.

aiohttp has neither a connection limit nor a header timeout of its own.  :class:`CappedTCPSite`
counts the connections of its listener (including TLS handshakes still in progress) and closes any
above ``max_connections`` at once, so a flood of idle sockets on one listener cannot use the file
descriptors every other listener needs.  The deadline is aiohttp's keep-alive timer, which since
3.9 also runs from the moment a connection is accepted and closes a handler still waiting for a
complete request: set by :func:`runner_kwargs`, it cuts a client that sends a byte a second.  The TLS
handshake gets the same deadline (``ssl_handshake_timeout``).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import deque
from typing import Any

from aiohttp import web
from prometheus_client import Counter

from ca_service.settings import ConnectionLimits

log = logging.getLogger(__name__)

# Log "listener full" at most this often per listener: a flood must not become a log flood.
REFUSAL_LOG_INTERVAL = 60.0


LINGERING_SECONDS = 1.0


def runner_kwargs(limits: ConnectionLimits) -> dict[str, Any]:
    """``web.AppRunner`` options: the header/idle deadline as aiohttp's keep-alive timeout."""
    # lingering_time: after refusing a request whose body was not read (413), aiohttp keeps reading and
    # discarding it so the client sees the answer; 10 s by default, which a client that keeps sending
    # turns into a 10 s hold on a connection slot (and on a graceful stop).  One second is enough.
    return {"keepalive_timeout": limits.header_timeout.total_seconds(), "lingering_time": LINGERING_SECONDS}


class _Refuse(asyncio.Protocol):
    """Closes the connection as soon as it is made (no response: the client sees a reset/EOF)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.abort() if isinstance(transport, asyncio.Transport) else transport.close()


class CappedTCPSite(web.TCPSite):
    """A ``TCPSite`` that refuses connections beyond ``limits.max_connections``."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, *, limits: ConnectionLimits, name: str,
                 ssl_context: ssl.SSLContext | None = None, refused: Counter | None = None) -> None:
        super().__init__(runner, host, port, ssl_context=ssl_context)
        self._limits = limits
        self._name = name
        self._refused = refused
        # Handlers made for accepted connections that are not yet in the server's list (TLS handshake
        # in progress), with the loop time they were accepted: they hold a descriptor too.
        self._pending: deque[tuple[float, web.RequestHandler]] = deque()
        self._last_refusal_log = -REFUSAL_LOG_INTERVAL
        self.refusals = 0

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site; TCPSite.start would bind without the cap
        loop = asyncio.get_running_loop()
        handshake = self._limits.header_timeout.total_seconds() if self._ssl_context is not None else None
        self._server = await loop.create_server(self._accept, self._host, self._port, ssl=self._ssl_context,
                                                backlog=self._backlog, reuse_address=self._reuse_address,
                                                reuse_port=self._reuse_port, ssl_handshake_timeout=handshake)
        self._bound_port = self._server.sockets[0].getsockname()[1] if self._server.sockets else self._port

    def live_connections(self) -> int:
        server = self._runner.server
        assert server is not None
        connected = server.connections
        now = asyncio.get_running_loop().time()
        deadline = self._limits.header_timeout.total_seconds()
        live = set(connected)
        while self._pending and (self._pending[0][1] in live or now - self._pending[0][0] > deadline):
            self._pending.popleft()
        in_handshake = sum(1 for _, h in self._pending if h not in live)
        return len(connected) + in_handshake

    def _accept(self) -> asyncio.BaseProtocol:
        server = self._runner.server
        assert server is not None
        if self.live_connections() >= self._limits.max_connections:
            self._refuse()
            return _Refuse()
        handler = server()
        self._pending.append((asyncio.get_running_loop().time(), handler))
        return handler

    def _refuse(self) -> None:
        self.refusals += 1
        if self._refused is not None:
            self._refused.labels(self._name, "max_connections").inc()
        now = asyncio.get_running_loop().time()
        if now - self._last_refusal_log >= REFUSAL_LOG_INTERVAL:
            self._last_refusal_log = now
            log.warning("listener full: refusing connections", extra={
                "listener": self._name, "max_connections": self._limits.max_connections,
                "refused_so_far": self.refusals})
