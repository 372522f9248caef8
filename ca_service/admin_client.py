"""The client side of ``ca-service admin``: find the running daemon and its token, call the admin API.

The daemon's URL comes from ``<data_dir>/sideport.address`` (written by the running side-port, so a
daemon bound to port 0 is found too), else from ``http.address`` in the config.  The token comes
from the same file the daemon reads (``http.admin.token_file``, default ``<data_dir>/admin-token``).
The token is sent only in the Authorization header and never printed.
"""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from ca_service import operations
from ca_service.config import Settings
from ca_service.errors import CAServiceError, NotReadyError
from ca_service.web.server import ADDRESS_FILE

TIMEOUT_SECONDS = 30.0  # a forced root rotation answers only once it is under way; dry runs are instant


class AdminCallError(CAServiceError):
    """The daemon refused or failed the call; ``status`` is the HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(f"HTTP {status}: {message}")


def daemon_url(settings: Settings) -> str:
    address_file = settings.data_dir / ADDRESS_FILE
    if address_file.exists():
        url = address_file.read_text().strip()
        if url:
            return url
    scheme = "https" if settings.http.tls.enabled else "http"
    return f"{scheme}://{settings.http.address}"


def _ssl_context(settings: Settings) -> ssl.SSLContext:
    # The side-port serves an SVID of our own CA: trust our bundle, and match no hostname because an
    # SVID names a SPIFFE ID, not a DNS name.
    if settings.http.tls.cert_file is not None:
        return ssl.create_default_context()
    ctx = ssl.create_default_context(cadata=operations.bundle(settings, "pem").decode())
    ctx.check_hostname = False
    return ctx


def call(settings: Settings, method: str, path: str, body: dict[str, Any] | None = None, *,
         url: str | None = None) -> dict[str, Any]:
    """One authenticated admin call.

    Raises:
        NotReadyError: no daemon answers at the URL.
        AdminCallError: the daemon answered with an error status.
    """
    base = (url or daemon_url(settings)).rstrip("/")
    if not base.startswith(("http://", "https://")):
        raise NotReadyError(f"admin URL {base!r} must start with http:// or https://")
    token = settings.admin_token_file.read_text().strip() if settings.admin_token_file.exists() else ""
    if not token:
        raise NotReadyError(f"no admin token in {settings.admin_token_file}; has the daemon started once?")
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(base + path, data=data, method=method,  # noqa: S310 - scheme checked above
                                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json",
                                              "Accept": "application/json"})
    context = _ssl_context(settings) if base.startswith("https://") else None
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS, context=context) as resp:  # noqa: S310
            doc: dict[str, Any] = json.loads(resp.read())
            return doc
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read()).get("error", exc.reason)
        except ValueError:
            message = exc.reason
        raise AdminCallError(exc.code, str(message)) from None
    except (urllib.error.URLError, OSError) as exc:
        raise NotReadyError(f"no ca-service daemon answers at {base} ({exc}); is `ca-service serve` running?"
                            ) from None


def status(settings: Settings, *, url: str | None = None) -> dict[str, Any]:
    return call(settings, "GET", "/admin/v1/status", url=url)


def certificates(settings: Settings, *, filters: dict[str, str | None], url: str | None = None) -> dict[str, Any]:
    query = urllib.parse.urlencode({k: v for k, v in filters.items() if v is not None})
    return call(settings, "GET", "/admin/v1/certificates" + (f"?{query}" if query else ""), url=url)


def render_certificates(doc: dict[str, Any]) -> str:
    lines = [f"{'SERIAL':<34} {'SPIFFE ID':<50} {'NOT AFTER':<26} {'PATH':<9} CALLER (METHOD)"]
    for c in doc["certificates"]:
        lines.append(f"{c['serial']:<34} {c['spiffe_id']:<50} {c['not_after']:<26} {c['path']:<9} "
                     f"{c['caller']} ({c['method']})")
    lines.append(f"{doc['matched']} live certificate(s) matched" + (", list truncated" if doc["truncated"] else "")
                 + (f"; {doc['dropped_by_capacity']} dropped by capacity" if doc["dropped_by_capacity"] else ""))
    return "\n".join(lines)


def rotate(settings: Settings, *, scope: str, reason: str, spiffe_id: str | None = None,
           namespace: str | None = None, dry_run: bool = False, url: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"scope": scope, "reason": reason, "dry_run": dry_run}
    if spiffe_id is not None:
        body["spiffe_id"] = spiffe_id
    if namespace is not None:
        body["namespace"] = namespace
    return call(settings, "POST", "/admin/v1/rotate", body, url=url)


def compromise(settings: Settings, *, action: str, key_id: str, reason: str, dry_run: bool = False,
               force: bool = False, url: str | None = None) -> dict[str, Any]:
    """``taint`` or ``revoke`` a CA (see the README's compromise runbook)."""
    body: dict[str, Any] = {"key_id": key_id, "reason": reason, "dry_run": dry_run}
    if action == "revoke":
        body["force"] = force
    return call(settings, "POST", f"/admin/v1/{action}", body, url=url)


def render_compromise(doc: dict[str, Any]) -> str:
    head = f"would {doc['action']}" if doc["dry_run"] else f"{doc['action']}ed".replace("revokeed", "revoked")
    lines = [f"{head} {doc['kind']} {doc['serial']} (key id {doc['key_id']})", doc["detail"]]
    if doc.get("svids"):
        what = "re-issued now" if doc["action"] == "taint" else "still depending on it"
        lines.append(f"{len(doc['svids'])} live SVID(s) {what}")
    lines += [f"  breaks: {b}" for b in doc.get("breaks", [])]
    return "\n".join(lines)


def render_status(doc: dict[str, Any]) -> str:
    lines = [f"trust domain  {doc['trust_domain']} ({doc['mode']}), state revision {doc['revision']}"]
    if doc.get("root_rotation"):
        rr = doc["root_rotation"]
        lines.append(f"root rotation {rr['phase']} since {rr['phase_since'][:19]} ({rr['reason']})")
    lines += ["", f"{'KIND':<20} {'STATE':<9} {'SERIAL':<14} {'NOT AFTER':<20} LEFT"]
    for c in doc["certificates"]:
        lines.append(f"{c['kind']:<20} {c['state']:<9} {c['serial'][:12]:<14} {c['not_after'][:19]:<20} "
                     f"{c['time_left']}")
    lines.append("")
    for kind, at in sorted(doc["next_rotations"].items()):
        lines.append(f"next {kind:<19} {at[:19]}")
    sds = doc["sds"]
    streams = ", ".join(f"{api} {n}" for api, n in sorted(sds["streams"].items())) or "none"
    lines.append(f"sds           streams: {streams}; live SVIDs {sds['live_svids']} "
                 f"({sds['identities']} identities)")
    for td, bundle in doc["bundles"].items():
        lines.append(f"bundle        {td}: sequence {bundle['sequence']}, {len(bundle['roots'])} root(s)")
    return "\n".join(lines)


def render_rotation(doc: dict[str, Any]) -> str:
    head = "would rotate" if doc["dry_run"] else "rotated"
    lines = [f"{head} ({doc['scope']}): {len(doc['affected_serials'])} certificate(s)"]
    lines += [f"  old {s}" for s in doc["affected_serials"]]
    lines += [f"  new {s}" for s in doc["new_serials"]]
    lines += [f"  identity {i}" for i in doc.get("affected_identities", [])]
    if doc.get("detail"):
        lines.append(doc["detail"])
    return "\n".join(lines)
