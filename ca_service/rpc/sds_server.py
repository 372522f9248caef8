"""The grpc.aio ``envoy.service.secret.v3.SecretDiscoveryService``: StreamSecrets, DeltaSecrets, FetchSecrets.

One servicer per listener (each listener has its own authenticator and policy); all share the
catalog and the hub.  A stream is one reader task (woken only by client requests) feeding the same
queue the hub pushes changes into, and one handler loop that sleeps on that queue.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc
from google.protobuf import json_format  # type: ignore[import-untyped]  # no types-protobuf in the venv
from google.protobuf.message import DecodeError  # type: ignore[import-untyped]

from ca_service.config import ListenerPolicy
from ca_service.errors import CAServiceError, InvalidRequestError, NotFoundError
from ca_service.rpc.authn import Authenticator, CallCredentials, Caller, authenticate, check_policy
from ca_service.rpc.sds_hub import Changed, Shutdown, WatchHub
from ca_service.rpc.sds_resources import SECRET_TYPE_URL, SecretCatalog
from ca_service.rpc.sds_sessions import DeltaSession, SotwSession
from ca_service.rpc.status import abort_with, status_for
from ca_service.telemetry import Telemetry

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]


class _EndOfStream:
    """The client half-closed (or the connection went away)."""


class _Malformed:
    """A request frame that is not a valid protobuf message of the method's type."""


MALFORMED = _Malformed()
_MALFORMED_ERROR = InvalidRequestError("request frame is not a valid protobuf message")


def _tolerant(message_type: Any) -> Callable[[bytes], Any]:
    """A deserializer that turns a bad frame into :data:`MALFORMED` for the handler to refuse with
    INVALID_ARGUMENT; grpc's own would end a stream with OK (or a unary call with UNKNOWN)."""
    def deserialize(raw: bytes) -> Any:
        try:
            return message_type.FromString(raw)
        except DecodeError:
            return MALFORMED
    return deserialize


def add_sds_servicer(servicer: SdsServicer, server: grpc.aio.Server) -> None:
    """Register ``servicer`` like ``sds_pb2_grpc.add_SecretDiscoveryServiceServicer_to_server``, but
    with deserializers that let the handlers refuse malformed frames themselves."""
    request, delta = discovery_pb2.DiscoveryRequest, discovery_pb2.DeltaDiscoveryRequest
    handlers = {
        "DeltaSecrets": grpc.stream_stream_rpc_method_handler(
            servicer.DeltaSecrets, request_deserializer=_tolerant(delta),
            response_serializer=discovery_pb2.DeltaDiscoveryResponse.SerializeToString),
        "StreamSecrets": grpc.stream_stream_rpc_method_handler(
            servicer.StreamSecrets, request_deserializer=_tolerant(request),
            response_serializer=discovery_pb2.DiscoveryResponse.SerializeToString),
        "FetchSecrets": grpc.unary_unary_rpc_method_handler(
            servicer.FetchSecrets, request_deserializer=_tolerant(request),
            response_serializer=discovery_pb2.DiscoveryResponse.SerializeToString),
    }
    service = "envoy.service.secret.v3.SecretDiscoveryService"
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))


class SdsServicer(sds_pb2_grpc.SecretDiscoveryServiceServicer):  # type: ignore[misc]
    def __init__(self, catalog: SecretCatalog, hub: WatchHub, authenticator: Authenticator, *,
                 policy: ListenerPolicy, telemetry: Telemetry, peer_certificate_verified: bool) -> None:
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
            if request is MALFORMED:
                raise _MALFORMED_ERROR
            caller = await self._caller(request.node, context)
            if not request.resource_names:
                raise NotFoundError("FetchSecrets needs explicit resource names")
            resolved = []
            for name in request.resource_names:
                item = self._catalog.resolve(caller, name)
                if item is None:
                    raise NotFoundError(f"secret {name!r} does not exist (yet)")
                resolved.append(item)
        except CAServiceError as exc:
            self._denied(exc)
            await abort_with(context, exc, rpc="FetchSecrets")
        self._telemetry.sds_pushes.labels("fetch").inc()
        version = ",".join(r.version for r in resolved)
        return discovery_pb2.DiscoveryResponse(
            version_info=version, resources=[r.packed() for r in resolved], type_url=SECRET_TYPE_URL)

    async def _drive(self, requests: AsyncIterator[Any], context: Context, api: str,
                     session_type: Callable[..., SotwSession | DeltaSession]) -> None:
        watch = self._hub.open()
        reader = asyncio.create_task(_pump(requests, watch.queue))
        self._telemetry.sds_streams.labels(api).inc()
        session: SotwSession | DeltaSession | None = None
        try:
            while True:
                item = await watch.queue.get()
                if isinstance(item, Shutdown | _EndOfStream):
                    return
                try:
                    if item is MALFORMED:
                        raise _MALFORMED_ERROR
                    if isinstance(item, Changed):
                        responses = session.on_change(item.keys) if session is not None else []
                    else:
                        if session is None:
                            caller = await self._caller(item.node, context)
                            session = session_type(self._catalog, self._hub, watch, caller, self._telemetry)
                        responses = session.on_request(item)
                except CAServiceError as exc:
                    self._denied(exc)
                    await abort_with(context, exc, rpc=f"SDS {api}")
                for response in responses:
                    await context.write(response)
        finally:
            reader.cancel()
            self._hub.close_watch(watch)
            self._telemetry.sds_streams.labels(api).dec()

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


async def _pump(requests: AsyncIterator[Any], queue: asyncio.Queue[Any]) -> None:
    """Move client requests into the stream's queue; a broken read ends the stream like a half-close."""
    try:
        async for request in requests:
            queue.put_nowait(request)
    except grpc.aio.AioRpcError:
        pass
    except Exception:
        log.debug("SDS stream read failed", exc_info=True)
    finally:
        queue.put_nowait(_EndOfStream())
