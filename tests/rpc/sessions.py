"""Drive an SDS session's two phases synchronously, as the servicer does, for tests without gRPC."""

from __future__ import annotations

from typing import Any

from ca_service.errors import NotFoundError
from ca_service.rpc.sds_resources import Resolved, SecretCatalog
from ca_service.rpc.sds_sessions import DeltaSession, SessionStep, SotwSession, Wanted


def settle(catalog: SecretCatalog, session: SotwSession | DeltaSession, outcome: SessionStep[Any] | Wanted,
           ) -> SessionStep[Any]:
    """Phase two of ``outcome`` with the catalog's in-thread resolution (the servicer's skips NotFoundError
    the same way when the session allows it)."""
    if isinstance(outcome, SessionStep):
        return outcome
    resolved: dict[str, Resolved | None] = {}
    for name in outcome.names:
        try:
            resolved[name] = catalog.resolve(session.caller, name)
        except NotFoundError:
            if not outcome.missing_ok:
                raise
    return session.complete(outcome, resolved)  # type: ignore[arg-type]


def on_request(catalog: SecretCatalog, session: SotwSession | DeltaSession, request: Any) -> SessionStep[Any]:
    return settle(catalog, session, session.on_request(request))
