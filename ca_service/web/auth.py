"""Admin authentication: a bearer token (constant-time compare) or an allow-listed client SPIFFE ID.

Decision table (istio-csr style: clients get an opaque message, the log gets the cause):

==========================================  ======
request                                      answer
==========================================  ======
``Authorization: Bearer <right token>``      allowed, caller ``token``
``Authorization`` present but wrong          401 (a wrong token never falls back to the certificate)
verified client cert, ID on the allow-list   allowed, caller = the SPIFFE ID
verified client cert, ID not allowed         403
nothing                                      401
==========================================  ======
"""

from __future__ import annotations

import fnmatch
import hmac
import logging
import os
import secrets
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from cryptography import x509

from ca_service.errors import AuthenticationError, ConfigError, InvalidRequestError, PolicyViolationError
from ca_service.pki.certs import spiffe_id_of

log = logging.getLogger(__name__)

TOKEN_FILE_MODE = 0o600


@dataclass(frozen=True)
class Caller:
    name: str  # "token" or the client's SPIFFE ID; never the token itself
    method: str  # "token" or "x509"


def ensure_admin_token(path: Path, *, generate: bool) -> str:
    """The admin token in ``path``; with ``generate`` a new one is written there (0600) when missing.

    Raises:
        ConfigError: if the file is missing and may not be generated, or is empty.
    """
    if not path.exists():
        if not generate:
            raise ConfigError([f"http.admin.token_file: {path} does not exist"])
        path.parent.mkdir(parents=True, exist_ok=True)
        # O_EXCL: two daemons starting on one data dir must not overwrite each other's token.
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, TOKEN_FILE_MODE)
        except FileExistsError:
            return ensure_admin_token(path, generate=False)
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), TOKEN_FILE_MODE)
            f.write(secrets.token_urlsafe(32) + "\n")
            f.flush()
            os.fsync(f.fileno())
        log.info("generated the admin token", extra={"token_file": str(path)})
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        log.warning("the admin token file is readable by others; chmod 600 it", extra={"token_file": str(path),
                                                                                       "mode": oct(mode)})
    token = path.read_text().strip()
    if not token:
        raise ConfigError([f"http.admin.token_file: {path} is empty"])
    return token


def peer_certificate(request: web.BaseRequest) -> x509.Certificate | None:
    """The client's leaf certificate, already verified by the TLS handshake, or None (plain HTTP / no cert)."""
    transport = request.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der) if der else None


class AdminAuth:
    def __init__(self, token: str, allowed_spiffe_ids: Sequence[str]) -> None:
        self._token = token.encode()
        self._allowed = tuple(allowed_spiffe_ids)

    def is_allowed_id(self, spiffe_id: str) -> bool:
        # Exact IDs or fnmatch globs, the same syntax as the gRPC listener policies.
        return any(fnmatch.fnmatchcase(spiffe_id, pattern) for pattern in self._allowed)

    def authenticate(self, request: web.BaseRequest) -> Caller:
        """Who is calling.

        Raises:
            AuthenticationError: no credentials, a wrong token, a malformed header (→ 401).
            PolicyViolationError: a valid client certificate whose SPIFFE ID is not allowed (→ 403).
        """
        header = request.headers.get("Authorization")
        if header is not None:
            scheme, _, presented = header.partition(" ")
            if scheme.lower() != "bearer" or not presented.strip():
                raise AuthenticationError("malformed Authorization header (expected 'Bearer <token>')")
            if hmac.compare_digest(presented.strip().encode(), self._token):
                return Caller("token", "token")
            raise AuthenticationError("wrong admin token")
        cert = peer_certificate(request)
        if cert is None:
            raise AuthenticationError("no admin token and no client certificate")
        try:
            spiffe_id = str(spiffe_id_of(cert))
        except InvalidRequestError as exc:
            raise PolicyViolationError(f"client certificate has no usable SPIFFE ID: {exc}") from None
        if not self.is_allowed_id(spiffe_id):
            raise PolicyViolationError(f"{spiffe_id} is not on http.admin.allowed_spiffe_ids")
        return Caller(spiffe_id, "x509")
