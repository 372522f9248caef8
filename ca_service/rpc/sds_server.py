"""The grpc.aio ``envoy.service.secret.v3.SecretDiscoveryService``: StreamSecrets, DeltaSecrets, FetchSecrets.

One servicer per listener (each listener has its own authenticator and policy); all share the
catalog and the hub.  A stream is one reader task (woken only by client requests) feeding the same
queue the hub pushes changes into, and one handler loop that sleeps on that queue.  The reader records
a plain ACK itself when the handler is idle with nothing queued (every push is answered by one, and
handing it over cost a task wake-up per push); anything else goes through the queue, in order.  The session
(``sds_sessions``) says what to resolve and, given the resolutions, what to send; this loop resolves
(a first SVID is signed on the signing pool, off the loop), writes it, counts it, logs it and records pushes
and ACKs in the hub's :class:`~ca_service.rpc.sds_acks.AckLedger`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, NoReturn

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc
from google.protobuf import json_format  # type: ignore[import-untyped]  # no types-protobuf in the venv
from google.protobuf.message import DecodeError  # type: ignore[import-untyped]

from ca_service.config import ListenerPolicy
from ca_service.errors import CAServiceError, InvalidRequestError, NotFoundError
from ca_service.rpc.admission import RequestLimitError, StreamAdmission, check_request
from ca_service.rpc.authn import (
    Authenticator,
    CallCredentials,
    Caller,
    authenticate,
    check_policy,
    verified_peer_certificate,
)
from ca_service.rpc.sds_hub import Changed, Shutdown, StreamWatch, WatchHub
from ca_service.rpc.sds_resources import SECRET_TYPE_URL, Resolved, SecretCatalog
from ca_service.rpc.sds_sessions import DeltaSession, SessionStep, SotwSession, Wanted
from ca_service.rpc.status import abort_with, status_for
from ca_service.settings import SdsLimits
from ca_service.telemetry import Telemetry

if TYPE_CHECKING:
    from prometheus_client import Counter

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]

# Requests of one stream read ahead of the handler.  The reader stops here until the handler has
# answered (and written, which waits on the client's flow-control window), so a client that sends
# without reading is held by gRPC's own window instead of growing a queue in the server.
MAX_PENDING_REQUESTS = 4


class _EndOfStream:
    """The client half-closed (or the connection went away)."""


class _Malformed:
    """A request frame that is not a valid protobuf message of the method's type."""


MALFORMED = _Malformed()
_STREAM_ENDS = (Shutdown, _EndOfStream)  # a tuple: "Shutdown | _EndOfStream" built a new union per request
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
            if request is MALFORMED:
                raise _MALFORMED_ERROR
            check_request(request, self._limits)
            caller = await self._caller(request.node, context)
            if not request.resource_names:
                raise NotFoundError("FetchSecrets needs explicit resource names")
            resolved = []
            try:
                for name in request.resource_names:
                    item = await self._catalog.obtain(caller, name)
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
                     session_type: Callable[[SecretCatalog, Caller], SotwSession | DeltaSession]) -> None:
        if self._admission is not None and not self._admission.admit():
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, StreamAdmission.MESSAGE)
        watch = self._hub.open()
        slots = asyncio.Semaphore(MAX_PENDING_REQUESTS)
        stream = _StreamRecord(api, watch)
        reader = asyncio.create_task(_pump(requests, watch.queue, slots, lambda r: self._ack_in_place(stream, r)))
        self._telemetry.sds_streams.labels(api).inc()
        try:
            await self._serve(watch, slots, context, stream, session_type)
        finally:
            reader.cancel()
            self._hub.close_watch(watch)
            self._telemetry.sds_streams.labels(api).dec()

    async def _serve(self, watch: StreamWatch, slots: asyncio.Semaphore, context: Context, stream: _StreamRecord,
                     session_type: Callable[[SecretCatalog, Caller], SotwSession | DeltaSession]) -> None:
        while True:
            stream.busy = False
            item = await watch.queue.get()
            stream.busy = True
            if isinstance(item, _STREAM_ENDS):
                return
            # A step is a method of its own so that its request and responses are dropped before the stream
            # waits again: an idle stream holding its last response (a whole secret) cost ~3 KB more.
            await self._step(item, watch, slots, context, stream, session_type)
            del item

    async def _step(self, item: Any, watch: StreamWatch, slots: asyncio.Semaphore, context: Context,
                    stream: _StreamRecord,
                    session_type: Callable[[SecretCatalog, Caller], SotwSession | DeltaSession]) -> None:
        session = stream.session
        try:
            if item is MALFORMED:
                raise _MALFORMED_ERROR
            if isinstance(item, Changed):
                if session is None:
                    return
                outcome: SessionStep[Any] | Wanted = session.on_change(item.keys)
            else:
                check_request(item, self._limits)
                if session is None:
                    caller = await self._caller(item.node, context)
                    self._hub.attach_node(watch, caller.node_id)
                    session = stream.session = session_type(self._catalog, caller)
                outcome = session.on_request(item)
            if isinstance(outcome, SessionStep):
                step = outcome
            else:
                if not outcome.change:
                    # Watch new names before resolving them: a change while a first SVID is signed
                    # wakes the stream again instead of being missed.  (A change re-resolves names
                    # already watched.)
                    self._hub.set_keys(watch, session.watched_keys)
                step = session.complete(outcome, await self._resolve(session.caller, outcome))
        except CAServiceError as exc:
            await self._refuse(context, exc, rpc=f"SDS {stream.api}")
        self._hub.set_keys(watch, session.watched_keys)
        self._record(stream, session, step)
        for response in step.responses:
            await context.write(response)
        if not isinstance(item, Changed):
            slots.release()  # answered and written: the reader may take the next request

    def _ack_in_place(self, stream: _StreamRecord, request: Any) -> bool:
        """Record ``request`` here, in the reader, if it is a plain ACK and the handler is idle with nothing
        queued (so nothing is reordered and no step is half done); False: queue it for the handler."""
        session = stream.session
        if session is None or stream.busy or not stream.watch.queue.empty() or request is MALFORMED:
            return False
        try:
            check_request(request, self._limits)
        except CAServiceError:
            return False  # the handler refuses it, in its turn
        step = session.acknowledged(request)
        if step is None:
            return False
        self._record(stream, session, step)
        return True

    async def _resolve(self, caller: Caller, wanted: Wanted) -> dict[str, Resolved | None]:
        """Phase two of a session step: resolve what the session asked for (a first SVID is signed off
        the loop, see :meth:`SecretCatalog.obtain`); names that no longer exist are skipped if allowed."""
        out: dict[str, Resolved | None] = {}
        for name in wanted.names:
            try:
                out[name] = await self._catalog.obtain(caller, name)
            except NotFoundError:
                if not wanted.missing_ok:
                    raise
        return out

    async def _refuse(self, context: Context, exc: CAServiceError, *, rpc: str) -> NoReturn:
        self._denied(exc)
        if isinstance(exc, RequestLimitError):
            # Our own numbers only (no client input): clear to the client, bounded in the log.
            log.warning("%s refused: %s", rpc, exc, extra={"peer": context.peer()})
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        await abort_with(context, exc, rpc=rpc)

    def _record(self, stream: _StreamRecord, session: SotwSession | DeltaSession, step: SessionStep[Any]) -> None:
        """Metrics, logs and the ACK ledger for one session step (the session itself does none of these)."""
        acks = self._hub.acks
        if step.stale_nonce is not None:
            log.debug("stale SDS nonce ignored", extra={"node": session.caller.node_id, "nonce": step.stale_nonce})
        if step.ack is not None and step.ack.error is not None:
            self._telemetry.sds_nacks.labels(stream.api).inc()
            acks.nacked(stream.watch, step.ack.nonce)
            # Envoy keeps the previous secret; resending the same content would be rejected again.
            log.warning("SDS NACK", extra={"node": session.caller.node_id, "spiffe_id": str(session.caller.spiffe_id),
                                           "api": stream.api, "error": step.ack.error,
                                           "names": sorted(session.names)})
        elif step.ack is not None:
            self._telemetry.sds_ack_latency.observe(time.monotonic() - stream.pushed_at)
            acks.acked(stream.watch)  # the last nonce: covers every earlier push on the stream
        if step.pushed is not None:
            stream.pushed_at = time.monotonic()
            acks.pushed(stream.watch, step.pushed.nonce, step.pushed.own_bundle_sequence)
            if stream.pushes is None:  # the labelled child, looked up at the stream's first push
                stream.pushes = self._telemetry.sds_pushes.labels(stream.api)
            stream.pushes.inc()

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
        return verified_peer_certificate(context.auth_context(), verified=self._peer_certificate_verified)

    def _denied(self, exc: BaseException) -> None:
        self._telemetry.sds_denied.labels(status_for(exc)[0].name.lower()).inc()


class _StreamRecord:
    """What the servicer keeps per stream besides the session: push time, the pushes counter child."""

    def __init__(self, api: str, watch: StreamWatch) -> None:
        self.api, self.watch = api, watch
        self.pushed_at = 0.0
        self.pushes: Counter | None = None
        self.session: SotwSession | DeltaSession | None = None  # once the first request is authenticated
        self.busy = False  # the handler is in a step (not waiting on the queue)


async def _pump(requests: AsyncIterator[Any], queue: asyncio.Queue[Any], slots: asyncio.Semaphore,
                in_place: Callable[[Any], bool]) -> None:
    """Move client requests into the stream's queue, at most MAX_PENDING_REQUESTS ahead of the handler,
    unless ``in_place`` dealt with one already; a broken read ends the stream like a half-close."""
    iterator = aiter(requests)
    try:
        while True:
            await slots.acquire()
            try:
                request = await anext(iterator)
            except StopAsyncIteration:
                break
            try:
                handled = in_place(request)
            except Exception:  # a bug there must not end the stream: the handler takes the request instead
                log.exception("recording an SDS ACK in the stream's reader failed")
                handled = False
            if handled:
                slots.release()
                continue
            queue.put_nowait(request)
    except grpc.aio.AioRpcError:
        pass
    except Exception:
        log.debug("SDS stream read failed", exc_info=True)
    finally:
        queue.put_nowait(_EndOfStream())
