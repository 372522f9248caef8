"""``/healthz`` (the process is alive) and ``/readyz`` (send traffic here).

Ready means: not shutting down, a signing CA is active, and every check the assembly registered
(the gRPC listener serving, ...) passes.  On shutdown :meth:`Readiness.begin_shutdown` flips it first,
before any listener closes, so load balancers and kubelet stop routing while requests still succeed
(istio-csr and uvicorn do the same).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping

from aiohttp import web

from ca_service.errors import CAServiceError
from ca_service.pki.templates import CAKind
from ca_service.services.authority import Authority

ReadinessCheck = Callable[[], bool]
ReadinessDetail = Callable[[], str]


class Readiness:
    def __init__(self, authority: Authority, checks: Mapping[str, ReadinessCheck] | None = None) -> None:
        self._authority = authority
        self._checks: dict[str, ReadinessCheck] = dict(checks or {})
        self._shutting_down = False
        # Facts shown by /readyz?verbose that are not pass/fail (who leads, this replica's name).
        self.details: dict[str, ReadinessDetail] = {}

    def add_detail(self, name: str, detail: ReadinessDetail) -> None:
        self.details[name] = detail

    def detail_report(self) -> dict[str, str]:
        results: dict[str, str] = {}
        for name, detail in self.details.items():
            try:
                results[name] = str(detail())
            except Exception:
                results[name] = "unknown"  # like a failed check: /readyz must never 500
        return results

    def add_check(self, name: str, check: ReadinessCheck) -> None:
        self._checks[name] = check

    def begin_shutdown(self) -> None:
        """Answer not-ready from now on; the App calls this at the very start of ``stop()``."""
        self._shutting_down = True

    @property
    def shutting_down(self) -> bool:
        return self._shutting_down

    def _ca_active(self) -> bool:
        try:
            return self._authority.loaded and self._authority.state.active(CAKind.INTERMEDIATE).key is not None
        except CAServiceError:
            return False

    def report(self) -> dict[str, bool]:
        """Every check by name; ``shutting_down`` is reported as a failed ``not_shutting_down``."""
        results = {"not_shutting_down": not self._shutting_down, "ca_active": self._ca_active()}
        for name, check in self._checks.items():
            try:
                results[name] = bool(check())
            except Exception:
                # A check that raises is a check that failed; readiness must never 500.
                results[name] = False
        return results


async def healthz(_request: web.Request) -> web.Response:
    # Liveness says only "the event loop answers": restarting a daemon because its CA is not ready
    # would not make the CA ready.
    return web.Response(text="ok\n")


def readyz_handler(readiness: Readiness, on_result: Callable[[bool], None] | None = None
                   ) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def readyz(request: web.Request) -> web.Response:
        checks = readiness.report()
        ready = all(checks.values())
        if on_result is not None:
            on_result(ready)
        status = 200 if ready else 503
        if request.query.get("verbose") is not None:
            body = {"ready": ready, "checks": checks, **({"detail": readiness.detail_report()}
                                                          if readiness.details else {})}
            return web.Response(status=status, text=json.dumps(body) + "\n",
                                content_type="application/json")
        failed = ", ".join(name for name, ok in checks.items() if not ok)
        return web.Response(status=status, text="ready\n" if ready else f"not ready: {failed}\n")

    return readyz
