"""The grpc.aio ``envoy.service.secret.v3.SecretDiscoveryService``: StreamSecrets, DeltaSecrets, FetchSecrets.

One servicer per listener (each listener has its own authenticator and policy); all share the
catalog and the hub.  A stream is one reader task (woken only by client requests) feeding the same
queue the hub pushes changes into, and one handler loop that sleeps on that queue.  The session
(``sds_sessions``) decides what to send; this loop writes it, counts it, logs it and records pushes
and ACKs in the hub's :class:`~ca_service.rpc.sds_acks.AckLedger`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc
from google.protobuf import json_format  # type: ignore[import-untyped]  # no types-protobuf in the venv

from ca_service.config import ListenerPolicy
from ca_service.errors import CAServiceError, NotFoundError
from ca_service.rpc.authn import Authenticator, CallCredentials, Caller, authenticate, check_policy
from ca_service.rpc.sds_hub import Changed, Shutdown, StreamWatch, WatchHub
from ca_service.rpc.sds_resources import SECRET_TYPE_URL, SecretCatalog
from ca_service.rpc.sds_sessions import DeltaSession, SessionStep, SotwSession
from ca_service.rpc.status import abort_with, status_for
from ca_service.telemetry import Telemetry

if TYPE_CHECKING:
    from prometheus_client import Counter

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]


class _EndOfStream:
    """The client half-closed (or the connection went away)."""


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
                     session_type: Callable[[SecretCatalog, Caller], SotwSession | DeltaSession]) -> None:
        watch = self._hub.open()
        reader = asyncio.create_task(_pump(requests, watch.queue))
        self._telemetry.sds_streams.labels(api).inc()
        stream = _StreamRecord(api, watch)
        session: SotwSession | DeltaSession | None = None
        try:
            while True:
                item = await watch.queue.get()
                if isinstance(item, Shutdown | _EndOfStream):
                    return
                try:
                    if isinstance(item, Changed):
                        if session is None:
                            continue
                        step: SessionStep[Any] = session.on_change(item.keys)
                    else:
                        if session is None:
                            session = session_type(self._catalog, await self._caller(item.node, context))
                        step = session.on_request(item)
                except CAServiceError as exc:
                    self._denied(exc)
                    await abort_with(context, exc, rpc=f"SDS {api}")
                self._hub.set_keys(watch, session.watched_keys)
                self._record(stream, session, step)
                for response in step.responses:
                    await context.write(response)
        finally:
            reader.cancel()
            self._hub.close_watch(watch)
            self._telemetry.sds_streams.labels(api).dec()

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
        if not self._peer_certificate_verified:
            return None
        values = list(context.auth_context().get("x509_pem_cert") or [])
        return bytes(values[0]) if values else None

    def _denied(self, exc: BaseException) -> None:
        self._telemetry.sds_denied.labels(status_for(exc)[0].name.lower()).inc()


class _StreamRecord:
    """What the servicer keeps per stream besides the session: push time, the pushes counter child."""

    def __init__(self, api: str, watch: StreamWatch) -> None:
        self.api, self.watch = api, watch
        self.pushed_at = 0.0
        self.pushes: Counter | None = None


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
