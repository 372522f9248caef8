"""Parsing of admin request bodies into :class:`RotationRequest`; every rejection names its field."""

from __future__ import annotations

import json
import re
from typing import Any

from aiohttp import web

from ca_service.errors import InvalidRequestError, RequestTooLargeError
from ca_service.pki.identity import SpiffeId, TrustDomain
from ca_service.services.compromise import CompromiseRequest
from ca_service.services.ports import RotationRequest, RotationScope

ROTATE_FIELDS = ("scope", "reason", "spiffe_id", "namespace", "dry_run")
# A Kubernetes namespace is a DNS-1123 label.
_NAMESPACE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
# The reason lands in the audit log and in logs; a bound keeps a script bug from writing megabytes per call.
MAX_REASON = 1000
# A rotate body is five short fields (< 2 KiB with the longest reason); 64 KiB is generous and keeps
# a 10 MiB upload from being buffered at all.
MAX_BODY_BYTES = 64 * 1024


class BodyTooLargeError(RequestTooLargeError):
    """The request body is larger than :data:`MAX_BODY_BYTES` (HTTP 413)."""

    field = "body"


async def read_bounded(request: web.Request, limit: int = MAX_BODY_BYTES) -> bytes:
    """The body, read no further than ``limit`` + 1 bytes.

    Raises:
        BodyTooLargeError: if the declared or actual length exceeds ``limit``.
    """
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLargeError(f"body: {request.content_length} bytes is more than {limit}")
    chunks: list[bytes] = []
    size = 0
    while chunk := await request.content.read(limit + 1 - size):
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            raise BodyTooLargeError(f"body: more than {limit} bytes")
    return b"".join(chunks)


class BadFieldError(InvalidRequestError):
    """A request body field is missing, unknown or invalid; ``field`` names it (``body`` for the whole body)."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"{field}: {message}")


def _optional_str(doc: dict[str, Any], name: str) -> str | None:
    value = doc.get(name)
    if value is not None and (not isinstance(value, str) or not value):
        raise BadFieldError(name, "must be a non-empty string")
    return value


def parse_rotate_body(body: bytes, trust_domain: TrustDomain, *, caller: str) -> RotationRequest:
    """The rotation asked for by a ``POST /admin/v1/rotate`` body.

    Raises:
        BadFieldError: for a body that is not a JSON object, an unknown field, a missing or unknown
            ``scope``, a missing or empty ``reason``, a non-boolean ``dry_run``, ``spiffe_id`` missing
            with scope ``workload`` (or given with another scope), an invalid SPIFFE ID or one of another
            trust domain, ``namespace`` missing with scope ``namespace`` (or given with another scope) or
            not a DNS-1123 label.
    """
    try:
        doc = json.loads(body or b"null")
    except (ValueError, UnicodeDecodeError):
        raise BadFieldError("body", "is not valid JSON") from None
    except RecursionError:
        # json.loads recurses per nesting level; the rotate body is flat, so deep nesting is never valid.
        raise BadFieldError("body", "is nested too deeply") from None
    if not isinstance(doc, dict):
        raise BadFieldError("body", "must be a JSON object")
    unknown = sorted(set(doc) - set(ROTATE_FIELDS))
    if unknown:
        raise BadFieldError(unknown[0], f"unknown field (allowed: {', '.join(ROTATE_FIELDS)})")
    scope_value = doc.get("scope")
    try:
        if not isinstance(scope_value, str):
            raise ValueError(scope_value)
        scope = RotationScope(scope_value)
    except ValueError:
        allowed = ", ".join(s.value for s in RotationScope)
        raise BadFieldError("scope", f"{scope_value!r} is not one of {allowed}") from None
    reason = _optional_str(doc, "reason")
    if reason is None or not reason.strip():
        raise BadFieldError("reason", "is required (say why, for the audit log)")
    if len(reason) > MAX_REASON:
        raise BadFieldError("reason", f"is longer than {MAX_REASON} characters")
    dry_run = doc.get("dry_run", False)
    if not isinstance(dry_run, bool):
        raise BadFieldError("dry_run", "must be true or false")
    spiffe_id = _optional_str(doc, "spiffe_id")
    namespace = _optional_str(doc, "namespace")
    # A target given with a wider scope is refused rather than ignored: "all-workloads" plus a
    # spiffe_id is far more likely a typo than a wish to rotate everything.
    if (scope is RotationScope.WORKLOAD) != (spiffe_id is not None):
        raise BadFieldError("spiffe_id", "is required with scope workload" if spiffe_id is None
                            else f"is only valid with scope workload, not {scope.value}")
    if (scope is RotationScope.NAMESPACE) != (namespace is not None):
        raise BadFieldError("namespace", "is required with scope namespace" if namespace is None
                            else f"is only valid with scope namespace, not {scope.value}")
    if spiffe_id is not None:
        try:
            parsed = SpiffeId.parse(spiffe_id)
        except InvalidRequestError as exc:
            raise BadFieldError("spiffe_id", str(exc)) from None
        if not parsed.is_member_of(trust_domain) or not parsed.path:
            raise BadFieldError("spiffe_id", f"must be a workload of trust domain {trust_domain}")
        spiffe_id = str(parsed)
    if namespace is not None and not _NAMESPACE.match(namespace):
        raise BadFieldError("namespace", f"{namespace!r} is not a Kubernetes namespace name")
    return RotationRequest(scope=scope, reason=reason.strip(), spiffe_id=spiffe_id, namespace=namespace,
                           dry_run=dry_run, caller=caller)


COMPROMISE_FIELDS = {"taint": ("key_id", "reason", "dry_run"), "revoke": ("key_id", "reason", "dry_run", "force")}
# A subject key id is 20 octets (40 hex digits) here, a serial at most 20 octets; colons allowed as printed by openssl.
_KEY_ID = re.compile(r"^[0-9a-fA-F:]{1,64}$")


def parse_compromise_body(body: bytes, action: str, *, caller: str) -> CompromiseRequest:
    """A ``POST /admin/v1/taint`` or ``/admin/v1/revoke`` body.

    Raises:
        BadFieldError: for a body that is not a JSON object, an unknown field, a missing or malformed
            ``key_id`` (hex subject key id or serial), a missing, empty or too long ``reason``, or a
            non-boolean ``dry_run`` / ``force``.
    """
    try:
        doc = json.loads(body or b"null")
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise BadFieldError("body", "is not valid JSON") from None
    if not isinstance(doc, dict):
        raise BadFieldError("body", "must be a JSON object")
    allowed = COMPROMISE_FIELDS[action]
    unknown = sorted(set(doc) - set(allowed))
    if unknown:
        raise BadFieldError(unknown[0], f"unknown field (allowed: {', '.join(allowed)})")
    key_id = _optional_str(doc, "key_id")
    if key_id is None or not _KEY_ID.match(key_id):
        raise BadFieldError("key_id", "is required: the CA's subject key id or serial, in hex (see admin status)")
    reason = _optional_str(doc, "reason")
    if reason is None or not reason.strip():
        raise BadFieldError("reason", "is required (say why, for the audit log)")
    if len(reason) > MAX_REASON:
        raise BadFieldError("reason", f"is longer than {MAX_REASON} characters")
    flags = {}
    for name in ("dry_run", "force"):
        value = doc.get(name, False)
        if not isinstance(value, bool):
            raise BadFieldError(name, "must be true or false")
        flags[name] = value
    return CompromiseRequest(action, key_id, reason.strip(), dry_run=flags["dry_run"], force=flags["force"],
                             caller=caller)
