"""The grpc.aio ``envoy.service.secret.v3.SecretDiscoveryService``: StreamSecrets, DeltaSecrets, FetchSecrets.

One servicer per listener (each listener has its own authenticator and policy); all share the
catalog and the hub.  A stream is one reader task (woken only by client requests) feeding the same
queue the hub pushes changes into, and one handler loop that sleeps on that queue.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, NoReturn

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc
from google.protobuf import json_format  # type: ignore[import-untyped]  # no types-protobuf in the venv

from ca_service.config import ListenerPolicy
from ca_service.errors import CAServiceError, NotFoundError
from ca_service.rpc.admission import RequestLimitError, StreamAdmission, check_request
from ca_service.rpc.authn import Authenticator, CallCredentials, Caller, authenticate, check_policy
from ca_service.rpc.sds_hub import Changed, Shutdown, StreamWatch, WatchHub
from ca_service.rpc.sds_resources import SECRET_TYPE_URL, SecretCatalog
from ca_service.rpc.sds_sessions import DeltaSession, SotwSession
from ca_service.rpc.status import abort_with, status_for
from ca_service.settings import SdsLimits
from ca_service.telemetry import Telemetry

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]


class _EndOfStream:
    """The client half-closed (or the connection went away)."""


# Requests of one stream read ahead of the handler.  The reader stops here until the handler has
# answered (and written, which waits on the client's flow-control window), so a client that sends
# without reading is held by gRPC's own window instead of growing a queue in the server.
MAX_PENDING_REQUESTS = 4


class SdsServicer(sds_pb2_grpc.SecretDiscoveryServiceServicer):  # type: ignore[misc]
    def __init__(self, catalog: SecretCatalog, hub: WatchHub, authenticator: Authenticator, *,
                 policy: ListenerPolicy, telemetry: Telemetry, peer_certificate_verified: bool,
                 limits: SdsLimits | None = None, admission: StreamAdmission | None = None) -> None:
        self._limits = limits or SdsLimits()
        self._admission = admission
        self._catalog = catalog
        self._hub = hub
        self._authenticator = authenticator
        self._policy = policy
        self._telemetry = telemetry
        # Only a listener that requires and verifies client certificates may believe the peer's certificate.
        self._peer_certificate_verified = peer_certificate_verified

    async def StreamSecrets(self, request_iterator: AsyncIterator[Any], context: Context) -> None:
        await self._drive(request_iterator, context, "sotw", SotwSession)

    async def DeltaSecrets(self, request_iterator: AsyncIterator[Any], context: Context) -> None:
        await self._drive(request_iterator, context, "delta", DeltaSession)

    async def FetchSecrets(
        self, request: discovery_pb2.DiscoveryRequest, context: Context
    ) -> discovery_pb2.DiscoveryResponse:
        try:
            check_request(request, self._limits)
            caller = await self._caller(request.node, context)
            if not request.resource_names:
                raise NotFoundError("FetchSecrets needs explicit resource names")
            resolved = []
            try:
                for name in request.resource_names:
                    item = self._catalog.resolve(caller, name)
                    if item is None:
                        raise NotFoundError(f"secret {name!r} does not exist (yet)")
                    resolved.append(item)
            finally:
                self._hub.touch_node(caller.node_id)  # no stream: what it was issued ages out after node_grace
        except CAServiceError as exc:
            await self._refuse(context, exc, rpc="FetchSecrets")
        self._telemetry.sds_pushes.labels("fetch").inc()
        version = ",".join(r.version for r in resolved)
        return discovery_pb2.DiscoveryResponse(
            version_info=version, resources=[r.packed() for r in resolved], type_url=SECRET_TYPE_URL)

    async def _drive(self, requests: AsyncIterator[Any], context: Context, api: str,
                     session_type: Callable[..., SotwSession | DeltaSession]) -> None:
        if self._admission is not None and not self._admission.admit():
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, StreamAdmission.MESSAGE)
        watch = self._hub.open()
        slots = asyncio.Semaphore(MAX_PENDING_REQUESTS)
        reader = asyncio.create_task(_pump(requests, watch.queue, slots))
        self._telemetry.sds_streams.labels(api).inc()
        try:
            await self._serve(watch, slots, context, api, session_type)
        finally:
            reader.cancel()
            self._hub.close_watch(watch)
            self._telemetry.sds_streams.labels(api).dec()

    async def _serve(self, watch: StreamWatch, slots: asyncio.Semaphore, context: Context, api: str,
                     session_type: Callable[..., SotwSession | DeltaSession]) -> None:
        session: SotwSession | DeltaSession | None = None
        while True:
            item = await watch.queue.get()
            if isinstance(item, Shutdown | _EndOfStream):
                return
            try:
                if isinstance(item, Changed):
                    responses = session.on_change(item.keys) if session is not None else []
                else:
                    check_request(item, self._limits)
                    if session is None:
                        caller = await self._caller(item.node, context)
                        self._hub.attach_node(watch, caller.node_id)
                        session = session_type(self._catalog, self._hub, watch, caller, self._telemetry)
                    responses = session.on_request(item)
            except CAServiceError as exc:
                await self._refuse(context, exc, rpc=f"SDS {api}")
            for response in responses:
                await context.write(response)
            if not isinstance(item, Changed):
                slots.release()  # answered and written: the reader may take the next request

    async def _refuse(self, context: Context, exc: CAServiceError, *, rpc: str) -> NoReturn:
        self._denied(exc)
        if isinstance(exc, RequestLimitError):
            # Our own numbers only (no client input): clear to the client, bounded in the log.
            log.warning("%s refused: %s", rpc, exc, extra={"peer": context.peer()})
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        await abort_with(context, exc, rpc=rpc)

    async def _caller(self, node: base_pb2.Node, context: Context) -> Caller:
        credentials = CallCredentials(
            node_id=node.id,
            node_metadata=json_format.MessageToDict(node.metadata),
            peer_certificate_pem=self._peer_certificate(context),
            invocation_metadata={k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)},
            peer=context.peer(),
        )
        caller = await authenticate(self._authenticator, credentials)
        check_policy(self._policy, caller)
        log.debug("SDS caller", extra={"node": caller.node_id, "spiffe_id": str(caller.spiffe_id),
                                      "method": caller.method})
        return caller

    def _peer_certificate(self, context: Context) -> bytes | None:
        if not self._peer_certificate_verified:
            return None
        values = list(context.auth_context().get("x509_pem_cert") or [])
        return bytes(values[0]) if values else None

    def _denied(self, exc: BaseException) -> None:
        self._telemetry.sds_denied.labels(status_for(exc)[0].name.lower()).inc()


async def _pump(requests: AsyncIterator[Any], queue: asyncio.Queue[Any], slots: asyncio.Semaphore) -> None:
    """Move client requests into the stream's queue, at most MAX_PENDING_REQUESTS ahead of the handler;
    a broken read ends the stream like a half-close."""
    iterator = aiter(requests)
    try:
        while True:
            await slots.acquire()
            try:
                request = await anext(iterator)
            except StopAsyncIteration:
                break
            queue.put_nowait(request)
    except grpc.aio.AioRpcError:
        pass
    except Exception:
        log.debug("SDS stream read failed", exc_info=True)
    finally:
        queue.put_nowait(_EndOfStream())
