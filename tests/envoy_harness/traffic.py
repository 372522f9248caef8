"""Driving traffic through the sidecars: one-shot GETs and a free port for a listener fixed before start."""

from __future__ import annotations

import socket
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass

import aiohttp
from cryptography import x509

from .bootstrap import UPSTREAM_PEER_CERT_HEADER


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that was free a moment ago on ``host``.

    Racy by nature (another process may take it before Envoy binds); prefer port 0 in a listener and
    :meth:`EnvoyProcess.listener_port`, and use this only when a port must be known before start.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class HttpResult:
    """A response as seen by the test (through a client listener); header names are lower-case."""

    status: int
    body: str
    headers: Mapping[str, str]

    def upstream_peer_certificate(self) -> x509.Certificate | None:
        """The server leaf the client-side Envoy saw (from ``x-upstream-peer-cert``), if any."""
        encoded = self.headers.get(UPSTREAM_PEER_CERT_HEADER, "")
        if not encoded.strip():
            return None
        return x509.load_pem_x509_certificate(urllib.parse.unquote(encoded).encode())


async def http_get(url: str, *, timeout: float = 10.0, headers: Mapping[str, str] | None = None) -> HttpResult:
    """One GET on a fresh connection (``Connection: close``), so nothing is pooled on our side."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with (
        aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)) as session,
        session.get(url, headers=dict(headers or {})) as response,
    ):
        headers = {key.lower(): value for key, value in response.headers.items()}
        return HttpResult(response.status, await response.text(), headers)
