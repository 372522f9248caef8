"""The admin API: ``GET /admin/v1/status`` and ``POST /admin/v1/rotate``, authenticated and audited.

Every call, refused ones included, writes exactly one audit line before the reply is sent, and
nothing is done for a caller that failed authentication or authorization.  Errors map to HTTP in
one table; authentication failures get an opaque body (the log and the audit line get the cause).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from ca_service.errors import CAServiceError, NotReadyError, error_status
from ca_service.services.authority import Authority
from ca_service.services.compromise import Compromiser
from ca_service.services.issuance_ledger import IssuanceLedger
from ca_service.services.ports import RotationResult, Rotator
from ca_service.services.trust import TrustStore
from ca_service.services.workloads import WorkloadRegistry
from ca_service.telemetry import Telemetry
from ca_service.web.audit import AuditLog, AuditRecord
from ca_service.web.auth import AdminAuth, Caller
from ca_service.web.certificates import certificates_report
from ca_service.web.metrics import StateMetrics
from ca_service.web.requests import (
    BadFieldError,
    BodyTooLargeError,
    parse_compromise_body,
    parse_rotate_body,
    read_bounded,
)
from ca_service.web.status import status_report

log = logging.getLogger(__name__)

_OPAQUE = {401: "unauthorized", 403: "forbidden"}

Handler = Callable[[web.Request, Caller, AuditRecord], Awaitable[tuple[dict[str, Any], AuditRecord]]]


def _json(status: int, doc: dict[str, Any], **headers: str) -> web.Response:
    return web.Response(status=status, text=json.dumps(doc, indent=2, default=str) + "\n",
                        content_type="application/json", headers=headers)


def result_to_json(result: RotationResult) -> dict[str, Any]:
    doc = dataclasses.asdict(result)
    doc["scope"] = result.scope.value
    return doc


class AdminApi:
    def __init__(self, authority: Authority, telemetry: Telemetry, auth: AdminAuth, audit: AuditLog,
                 metrics: StateMetrics, *, rotator: Rotator | None = None, trust: TrustStore | None = None,
                 registry: WorkloadRegistry | None = None, ledger: IssuanceLedger | None = None,
                 compromise: Compromiser | None = None) -> None:
        self._authority = authority
        self._ledger = ledger
        self._compromise_service = compromise
        self._telemetry = telemetry
        self._auth = auth
        self._audit = audit
        self._metrics = metrics
        self._rotator = rotator
        self._trust = trust
        self._registry = registry

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/admin/v1/status", self._wrap("status", self._status)),
                web.post("/admin/v1/rotate", self._wrap("rotate", self._rotate)),
                web.get("/admin/v1/certificates", self._wrap("certificates", self._certificates)),
                web.post("/admin/v1/taint", self._wrap("taint", self._compromise("taint"))),
                web.post("/admin/v1/revoke", self._wrap("revoke", self._compromise("revoke")))]

    def _wrap(self, action: str, handler: Handler) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def endpoint(request: web.Request) -> web.Response:
            record = AuditRecord(caller="anonymous", action=action, result="error", remote=request.remote or "")
            try:
                caller = self._auth.authenticate(request)
                record = dataclasses.replace(record, caller=caller.name)
                doc, record = await handler(request, caller, record)
                status = 200
            except CAServiceError as exc:
                row = error_status(exc)  # the one table (errors.ERROR_TABLE)
                status, result = row.http_status, row.result
                record = dataclasses.replace(record, result=result, detail=str(exc))
                doc = {"error": _OPAQUE.get(status, str(exc))}
                if isinstance(exc, BadFieldError | BodyTooLargeError):
                    doc["field"] = exc.field
                log.warning("admin %s refused", action, extra={"caller": record.caller, "status": status,
                                                               "cause": str(exc), "remote": record.remote})
            except Exception:
                log.exception("admin %s failed", action, extra={"caller": record.caller})
                status, doc = 500, {"error": "internal error"}
                record = dataclasses.replace(record, result="error", detail="internal error")
            # Audit before replying: a caller that saw an answer can rely on the line being on disk.
            self._audit.write(record)
            self._metrics.admin_requests.labels(action, record.result).inc()
            if status == 401:
                return _json(status, doc, **{"WWW-Authenticate": 'Bearer realm="ca-service admin"'})
            response = _json(status, doc)
            if status == 413:
                # The rest of the body was never read: close rather than keep a connection whose client
                # may go on sending it (it would also hold a graceful stop for its whole timeout).
                response.force_close()
            return response

        return endpoint

    async def _status(self, _request: web.Request, _caller: Caller, record: AuditRecord
                      ) -> tuple[dict[str, Any], AuditRecord]:
        report = status_report(self._authority, self._telemetry, trust=self._trust, registry=self._registry)
        return report, dataclasses.replace(record, result="ok")

    async def _certificates(self, request: web.Request, _caller: Caller, record: AuditRecord
                            ) -> tuple[dict[str, Any], AuditRecord]:
        if self._ledger is None:
            raise NotReadyError("the issuance ledger is not running in this daemon")
        doc = certificates_report(self._ledger, self._authority.clock.now(), request.query)
        return doc, dataclasses.replace(record, result="ok", extra={"filters": doc["filters"]})

    async def _rotate(self, request: web.Request, caller: Caller, record: AuditRecord
                      ) -> tuple[dict[str, Any], AuditRecord]:
        body = await read_bounded(request)
        rotation = parse_rotate_body(body, self._authority.trust_domain, caller=caller.name)
        record = dataclasses.replace(record, scope=rotation.scope.value, reason=rotation.reason,
                                     extra={"dry_run": rotation.dry_run, "spiffe_id": rotation.spiffe_id,
                                            "namespace": rotation.namespace})
        if self._rotator is None:
            raise NotReadyError("the rotation engine is not running in this daemon")
        result = await self._rotator.rotate(rotation)
        log.info("admin rotation %s", "planned (dry run)" if result.dry_run else "done",
                 extra={"caller": caller.name, "scope": rotation.scope.value, "reason": rotation.reason,
                        "affected": len(result.affected_serials), "issued": len(result.new_serials)})
        record = dataclasses.replace(record, result="dry-run" if result.dry_run else "ok",
                                     affected_serials=result.affected_serials, new_serials=result.new_serials,
                                     detail=result.detail)
        return result_to_json(result), record

    def _compromise(self, action: str) -> Handler:
        async def handler(request: web.Request, caller: Caller, record: AuditRecord
                          ) -> tuple[dict[str, Any], AuditRecord]:
            asked = parse_compromise_body(await read_bounded(request), action, caller=caller.name)
            record = dataclasses.replace(record, reason=asked.reason, extra={
                "key_id": asked.key_id, "dry_run": asked.dry_run, "force": asked.force})
            if self._compromise_service is None:
                raise NotReadyError("the rotation engine is not running in this daemon")
            result = await self._compromise_service.handle(asked)
            record = dataclasses.replace(record, result="dry-run" if result.dry_run else "ok",
                                         affected_serials=(result.serial, *result.svids), detail=result.detail)
            return dataclasses.asdict(result), record

        return handler


class ParserErrorAudit:
    """Stands in for aiohttp's server logger (``AppRunner(logger=...)``): a request the HTTP parser
    refused (bad request line, oversized header, non-HTTP bytes) never reaches a handler, so this is
    where it gets its audit line, and one log line instead of a traceback."""

    def __init__(self, audit: AuditLog, metrics: StateMetrics) -> None:
        self._audit = audit
        self._metrics = metrics

    def _refused(self, remote: object, exc: BaseException | None) -> None:
        detail = f"{type(exc).__name__}: {exc}" if exc is not None else "bad request"
        self._audit.write(AuditRecord(caller="anonymous", action="http", result="bad-request",
                                      detail=detail[:MAX_AUDIT_DETAIL], remote=str(remote or "")))
        self._metrics.admin_requests.labels("http", "bad-request").inc()
        log.warning("HTTP request refused by the parser", extra={"remote": remote, "cause": detail})

    def exception(self, msg: str, *args: object, exc_info: object = None, **kw: object) -> None:
        if not self._is_parser_refusal(msg, exc_info):
            _AIOHTTP_SERVER_LOG.exception(msg, *args, exc_info=exc_info, **kw)  # type: ignore[arg-type]
            return
        self._refused(args[0] if args else "", exc_info if isinstance(exc_info, BaseException) else None)

    def debug(self, msg: str, *args: object, exc_info: object = None, **kw: object) -> None:
        if not self._is_parser_refusal(msg, exc_info):
            _AIOHTTP_SERVER_LOG.debug(msg, *args, exc_info=exc_info, **kw)  # type: ignore[arg-type]
            return
        self._refused(args[0] if args else "", exc_info if isinstance(exc_info, BaseException) else None)

    @staticmethod
    def _is_parser_refusal(msg: str, exc_info: object) -> bool:
        # aiohttp's handle_error() logs "Error handling request from %s" with the parser's exception.
        return msg.startswith("Error handling request") and isinstance(exc_info, HttpProcessingError)

    def __getattr__(self, name: str) -> Any:
        return getattr(_AIOHTTP_SERVER_LOG, name)


_AIOHTTP_SERVER_LOG = logging.getLogger("aiohttp.server")
# Parser messages quote the offending bytes; the audit line keeps enough to recognise them.
MAX_AUDIT_DETAIL = 512
