"""Envoy-like SDS clients on several replicas, one asyncio loop in a thread, and the invariant of a root
rotation checked at every leaf they receive: no client ever gets a leaf that some *connected* client
does not yet trust.

Each client opens ``ROOTCA`` and ``default`` streams (as an Istio sidecar without ADS does) and ACKs
like Envoy; a client trusts a bundle from the moment it ACKs it (Envoy ACKs after applying), so a
client with ``ack_delay`` keeps trusting the old roots that long.  A client whose stream breaks (its
replica was killed) reconnects to the next address and is not "connected" until it ACKs a bundle on
the new stream.  A client "trusts" a leaf when the leaf's intermediate is directly issued by one of
the roots of the last bundle it ACKed.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc

from tests.rpc.sds_fixtures import node

SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
# A stream that breaks is reopened after this pause (Envoy's SDS client backs off similarly, ~0.5 s).
RECONNECT_DELAY = 0.3


def _secret(response: Any) -> secret_pb2.Secret:
    secret = secret_pb2.Secret()
    assert response.resources[0].Unpack(secret)
    return secret


def _trusts(roots: tuple[x509.Certificate, ...], chain: list[x509.Certificate]) -> bool:
    issuer = chain[-1]
    for root in roots:
        try:
            issuer.verify_directly_issued_by(root)
        except (ValueError, TypeError, InvalidSignature):  # another root
            continue
        return True
    return False


@dataclass
class Client:
    name: str
    addresses: list[str]  # first is home; the others are where it reconnects, in turn
    ack_delay: float = 0.0
    trusted: tuple[x509.Certificate, ...] | None = None  # roots of the bundle ACKed on the current stream
    chains: list[list[x509.Certificate]] = field(default_factory=list)
    reconnects: int = 0
    home: int = 0


class Fleet:
    """Clients on replicas; :attr:`violations` lists every leaf some connected client did not trust."""

    def __init__(self) -> None:
        self.clients: list[Client] = []
        self.violations: list[str] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="sds-fleet", daemon=True)
        self._tasks: list[asyncio.Future[Any]] = []
        self._thread.start()

    def add(self, name: str, addresses: list[str], *, ack_delay: float = 0.0) -> Client:
        client = Client(name, list(addresses), ack_delay)
        self.clients.append(client)
        self._tasks.append(asyncio.run_coroutine_threadsafe(self._run(client), self._loop))
        return client

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` in the fleet's loop (a consistent snapshot of the clients)."""
        async def run() -> Any:
            return fn()
        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(10)

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    # ------------------------------------------------------------ in the loop

    async def _run(self, client: Client) -> None:
        n = node(client.name, "fleet")
        while True:
            address = client.addresses[client.home % len(client.addresses)]
            try:
                async with grpc.aio.insecure_channel(address) as channel:
                    stub = sds_pb2_grpc.SecretDiscoveryServiceStub(channel)
                    await asyncio.gather(self._bundle(stub, n, client), self._leaf(stub, n, client))
            except grpc.aio.AioRpcError:
                pass
            client.trusted = None  # not connected until it ACKs a bundle on the new stream
            client.reconnects += 1
            client.home += 1
            await asyncio.sleep(RECONNECT_DELAY)

    async def _bundle(self, stub: Any, n: Any, client: Client) -> None:
        call = stub.StreamSecrets()
        await call.write(discovery_pb2.DiscoveryRequest(node=n, resource_names=["ROOTCA"], type_url=SECRET_TYPE))
        while (response := await call.read()) is not grpc.aio.EOF:
            pem = _secret(response).validation_context.trusted_ca.inline_bytes
            if client.ack_delay:
                await asyncio.sleep(client.ack_delay)
            await call.write(discovery_pb2.DiscoveryRequest(version_info=response.version_info,
                                                            response_nonce=response.nonce,
                                                            resource_names=["ROOTCA"], type_url=SECRET_TYPE))
            client.trusted = tuple(x509.load_pem_x509_certificates(pem))
        raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata())

    async def _leaf(self, stub: Any, n: Any, client: Client) -> None:
        call = stub.StreamSecrets()
        await call.write(discovery_pb2.DiscoveryRequest(node=n, resource_names=["default"], type_url=SECRET_TYPE))
        while (response := await call.read()) is not grpc.aio.EOF:
            chain = x509.load_pem_x509_certificates(_secret(response).tls_certificate.certificate_chain.inline_bytes)
            self._check(client, chain)
            client.chains.append(chain)
            await call.write(discovery_pb2.DiscoveryRequest(version_info=response.version_info,
                                                            response_nonce=response.nonce,
                                                            resource_names=["default"], type_url=SECRET_TYPE))
        raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata())

    def _check(self, receiver: Client, chain: list[x509.Certificate]) -> None:
        for other in self.clients:
            if other.trusted is not None and not _trusts(other.trusted, chain):
                self.violations.append(
                    f"{receiver.name} got leaf {chain[0].serial_number:x} (issuer {chain[-1].issuer.rfc4514_string()}) "
                    f"that connected client {other.name} does not trust yet")

    # ------------------------------------------------------------ questions (thread-safe)

    def connected(self) -> int:
        return int(self.call(lambda: sum(1 for c in self.clients if c.trusted is not None)))

    def all_under(self, root: x509.Certificate) -> bool:
        """Every client is connected, trusts exactly ``root``, and its latest leaf chains to it."""
        def check() -> bool:
            # Certificates compare by their DER encoding.
            return all(c.trusted == (root,) and c.chains and _trusts((root,), c.chains[-1]) for c in self.clients)
        return bool(self.call(check))


def close_quietly(fleet: Fleet) -> None:
    with contextlib.suppress(Exception):
        fleet.close()
