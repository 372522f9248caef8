"""The HTTP side-port: app factory and the :class:`HttpSideport` component the assembly starts.

One aiohttp listener (plain HTTP, or HTTPS with optional client certificates) serving ``/metrics``,
``/healthz``, ``/readyz`` and the admin API.  It is its own listener, apart from gRPC, so a wedged
SDS server never hides its own metrics and readiness.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

from aiohttp import web

from ca_service.clock import Clock
from ca_service.config import Settings
from ca_service.services.authority import Authority
from ca_service.services.compromise import Compromiser
from ca_service.services.issuance_ledger import IssuanceLedger
from ca_service.services.ports import Rotator
from ca_service.services.state_changes import StateChange
from ca_service.services.trust import TrustStore
from ca_service.services.workloads import WorkloadRegistry
from ca_service.telemetry import Telemetry
from ca_service.web.admin import AdminApi, ParserErrorAudit
from ca_service.web.audit import AuditLog
from ca_service.web.auth import AdminAuth, ensure_admin_token
from ca_service.web.connections import CappedTCPSite, runner_kwargs
from ca_service.web.health import Readiness, ReadinessCheck, healthz, readyz_handler
from ca_service.web.metrics import StateMetrics
from ca_service.web.tls import SideportTls

log = logging.getLogger(__name__)

METRICS_KEY = web.AppKey("metrics", StateMetrics)
READINESS_KEY = web.AppKey("readiness", Readiness)
AUDIT_KEY = web.AppKey("audit", AuditLog)
ADDRESS_FILE = "sideport.address"  # in the data dir: where the CLI finds a daemon bound to port 0


def build_web_app(metrics: StateMetrics, readiness: Readiness, audit: AuditLog, admin: AdminApi) -> web.Application:
    """The aiohttp application (no listener): tests and the component both use this factory."""
    app = web.Application()
    app[METRICS_KEY] = metrics
    app[READINESS_KEY] = readiness
    app[AUDIT_KEY] = audit
    app.cleanup_ctx.append(_telemetry_ctx)
    app.add_routes([
        web.get("/metrics", metrics.handle),
        web.get("/healthz", healthz),
        web.get("/readyz", readyz_handler(readiness, lambda ok: metrics.ready.set(1 if ok else 0))),
        *admin.routes(),
    ])
    return app


async def _telemetry_ctx(app: web.Application) -> AsyncIterator[None]:
    # Subscribe and open the audit file only while the app runs; unsubscribe so a stopped side-port
    # is not kept alive (and recomputing gauges) by the authority's listener list.
    app[METRICS_KEY].attach()
    app[AUDIT_KEY].open()
    yield
    app[AUDIT_KEY].close()
    app[METRICS_KEY].detach()


def _split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


class HttpSideport:
    """The side-port component.

    The assembly must call :meth:`begin_shutdown` at the start of ``App.stop()`` (before any
    component stops) and add this component *first*, so it stops last and ``/readyz`` answers 503
    while the gRPC listeners drain.
    """

    name = "http"

    def __init__(self, settings: Settings, authority: Authority, telemetry: Telemetry, clock: Clock, *,
                 registry: WorkloadRegistry | None = None, trust: TrustStore | None = None,
                 rotator: Rotator | None = None, readiness_checks: Mapping[str, ReadinessCheck] | None = None,
                 ledger: IssuanceLedger | None = None, compromise: Compromiser | None = None) -> None:
        self._ledger = ledger
        self._settings = settings
        self._compromise = compromise
        self._authority = authority
        self.readiness = Readiness(authority, readiness_checks)
        self.metrics = StateMetrics(telemetry, authority, registry=registry, trust=trust, clock=clock,
                                    max_identity_series=settings.http.metrics.max_identity_series)
        self.audit = AuditLog(settings.audit_log_file, clock)
        self._telemetry = telemetry
        self._registry, self._trust, self._rotator = registry, trust, rotator
        self._tls = SideportTls(settings.http.tls, authority) if settings.http.tls.enabled else None
        self._runner: web.AppRunner | None = None
        self.url = ""

    @property
    def address_file(self) -> Path:
        return self._settings.data_dir / ADDRESS_FILE

    def on_state_change(self, change: StateChange) -> None:
        """State reaction (registered by the assembly): new roots are trusted for client certificates."""
        if self._tls is not None:
            self._tls.on_state_change(change)

    def begin_shutdown(self) -> None:
        self.readiness.begin_shutdown()

    async def start(self) -> None:
        # Generated only at the default location: an operator-configured path that is missing is an error.
        token = ensure_admin_token(self._settings.admin_token_file,
                                   generate=self._settings.http.admin.token_file is None)
        auth = AdminAuth(token, self._settings.http.admin.allowed_spiffe_ids)
        admin = AdminApi(self._authority, self._telemetry, auth, self.audit, self.metrics, rotator=self._rotator,
                         trust=self._trust, registry=self._registry, ledger=self._ledger,
                         compromise=self._compromise)
        app = build_web_app(self.metrics, self.readiness, self.audit, admin)
        # access_log=None: the access log would print every scrape; admin calls have the audit log.
        limits = self._settings.http.connections
        runner = web.AppRunner(app, access_log=None, handle_signals=False,
                               logger=ParserErrorAudit(self.audit, self.metrics), **runner_kwargs(limits))
        await runner.setup()
        host, port = _split_address(self._settings.http.address)
        ssl_context = self._tls.context() if self._tls is not None else None
        site = CappedTCPSite(runner, host, port, ssl_context=ssl_context, limits=limits, name="http",
                             refused=self._telemetry.connections_refused)
        await site.start()
        self._runner = runner
        if self._tls is not None:
            self._tls.start_renewal()
        bound = runner.addresses[0]
        scheme = "https" if ssl_context is not None else "http"
        self.url = f"{scheme}://{_format_host(bound[0])}:{bound[1]}"
        self.address_file.parent.mkdir(parents=True, exist_ok=True)
        self.address_file.write_text(self.url + "\n")
        log.info("HTTP side-port listening", extra={"url": self.url, "tls": ssl_context is not None,
                                                     "audit_log": str(self.audit.path)})

    async def stop(self) -> None:
        self.begin_shutdown()
        if self._tls is not None:
            await self._tls.stop()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self.address_file.exists() and self.address_file.read_text().strip() == self.url:
            self.address_file.unlink()


def _format_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
