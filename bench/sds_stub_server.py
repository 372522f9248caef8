"""STUB SDS server: grpc.aio's own floor for the SDS fan-out bench.  NOT the daemon's SDS server.

A trivial Envoy SDS v3 ``StreamSecrets`` server: one fixed ``default`` secret (a real SVID, for
realistic message sizes) and one ``ROOTCA`` validation context; :func:`bump` re-pushes one of them to
every open stream with a new version.  It runs in its own process so that its memory and CPU are
measured apart from the load generator's.

With ``signing=True`` it is the *signing stub*: a forced re-issue signs a fresh key and SVID for every
``default`` stream on the daemon's own :class:`~ca_service.adapters.signing_pool.SigningPool` and pushes
each stream its own secret as its chunk comes back, as the daemon does, with none of the daemon's
bookkeeping (registry, ledger, expiry index, session versions, ACK tracking, metrics).  Its re-issue is
the floor of any design that signs on that pool on this machine.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import gc
import itertools
import multiprocessing
import os
import tempfile
from collections.abc import AsyncIterator, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from cryptography.hazmat.primitives import serialization
from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc

if TYPE_CHECKING:
    from ca_service.adapters.signing_pool import SigningPool
    from ca_service.services.authority import Authority

SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
KINDS = ("default", "ROOTCA")


def _materials(authority: Authority) -> dict[str, bytes]:
    from ca_service.pki.identity import SpiffeId
    from ca_service.pki.keys import generate_private_key, private_key_to_pem

    key = generate_private_key()
    svid = authority.issue_svid(SpiffeId.parse("spiffe://cluster.local/ns/bench/sa/stub"), key.public_key())
    roots = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in svid.roots)
    return {"chain": svid.chain_pem(), "key": private_key_to_pem(key), "roots": roots}


class StubSds(sds_pb2_grpc.SecretDiscoveryServiceServicer):
    def __init__(self, materials: dict[str, bytes], pool: SigningPool | None = None) -> None:
        self._materials = materials
        self.pool = pool
        self.versions = dict.fromkeys(KINDS, 1)
        # A stream's queue gets a version (send the shared secret again) or (chain, key): its own new SVID.
        self.queues: dict[str, set[asyncio.Queue[Any]]] = {kind: set() for kind in KINDS}
        self._defaults: dict[asyncio.Queue[Any], None] = {}  # open default streams, in the order they opened
        self._nonces = itertools.count(1)

    def _secret(self, name: str, chain: bytes | None = None, key: bytes | None = None) -> secret_pb2.Secret:
        if name == "default":
            return secret_pb2.Secret(name=name, tls_certificate=common_pb2.TlsCertificate(
                certificate_chain=base_pb2.DataSource(inline_bytes=chain or self._materials["chain"]),
                private_key=base_pb2.DataSource(inline_bytes=key or self._materials["key"])))
        return secret_pb2.Secret(name=name, validation_context=common_pb2.CertificateValidationContext(
            trusted_ca=base_pb2.DataSource(inline_bytes=self._materials["roots"])))

    def _response(self, name: str, own: tuple[bytes, bytes] | None = None) -> discovery_pb2.DiscoveryResponse:
        nonce = next(self._nonces)
        response = discovery_pb2.DiscoveryResponse(version_info=str(nonce if own else self.versions[name]),
                                                   type_url=SECRET_TYPE, nonce=str(nonce))
        response.resources.add().Pack(self._secret(name, *own) if own else self._secret(name))
        return response

    async def StreamSecrets(
        self, request_iterator: AsyncIterator[discovery_pb2.DiscoveryRequest], context: Any
    ) -> AsyncIterator[discovery_pb2.DiscoveryResponse]:
        first = await request_iterator.__anext__()
        name = first.resource_names[0] if first.resource_names[0] in KINDS else "default"
        pushes: asyncio.Queue[Any] = asyncio.Queue()
        self.queues[name].add(pushes)
        if name == "default":
            self._defaults[pushes] = None

        async def drain() -> None:  # ACKs and NACKs: a stub just reads them
            async for _ in request_iterator:
                pass

        reader = asyncio.ensure_future(drain())
        try:
            yield self._response(name)
            while True:
                item = await pushes.get()
                yield self._response(name, None if isinstance(item, int) else item)
        finally:
            reader.cancel()
            self.queues[name].discard(pushes)
            self._defaults.pop(pushes, None)

    def bump(self, kind: str) -> int:
        self.versions[kind] += 1
        for pushes in self.queues[kind]:
            pushes.put_nowait(self.versions[kind])
        return len(self.queues[kind])

    async def reissue(self) -> int:
        """The signing stub's forced re-issue: a new SVID per open default stream, pushed as its chunk returns."""
        from ca_service.pki.identity import SpiffeId
        from ca_service.services.workloads import SignedSvid

        assert self.pool is not None
        streams = list(self._defaults)
        ids = [SpiffeId.parse(f"spiffe://cluster.local/ns/bench/sa/node-{i}") for i in range(len(streams))]

        def push(start: int, chunk: Sequence[SignedSvid]) -> None:
            gc.freeze()  # the daemon's collector discipline at each wave (ca_service/adapters/collector.py)
            for index, signed in enumerate(chunk, start):
                streams[index].put_nowait((signed.svid.chain_pem(), signed.key_pem))

        await self.pool.issue_many(ids, now=dt.datetime.now(dt.UTC), on_chunk=push)
        return len(streams)


async def _serve(conn: Connection, disciplined: bool, signing: bool) -> None:
    from bench.common import fresh_authority
    from ca_service.clock import SystemClock

    with tempfile.TemporaryDirectory(prefix="ca-bench-stub-") as directory:  # the CA's keys go with it
        authority = fresh_authority(SystemClock(), Path(directory))
        pool = None
        if signing:  # the daemon's pool (its default worker count), warmed as the daemon warms it at start-up
            from ca_service.adapters.signing_pool import SigningPool
            from ca_service.pki.identity import SpiffeId

            pool = SigningPool(authority.issuer)
            await pool.issue_many([SpiffeId.parse("spiffe://cluster.local/warm-up")], now=dt.datetime.now(dt.UTC))
        await _run(conn, StubSds(_materials(authority), pool), disciplined)


async def _run(conn: Connection, service: StubSds, disciplined: bool) -> None:
    pool = service.pool
    server = grpc.aio.server(options=[("grpc.max_concurrent_streams", 1 << 20)])
    sds_pb2_grpc.add_SecretDiscoveryServiceServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    loop = asyncio.get_running_loop()
    # The daemon's collector discipline (ca_service/adapters/collector.py): no automatic full pass, and what
    # exists when a push begins is frozen out of its young passes.  Without it a push of the stub now and
    # then included a full pass over its ~1M objects (0.36-0.42 s of a 0.56 s bundle push), and the floor
    # moved with CPython's collector instead of grpc.aio's own cost.
    # ``disciplined=False`` is the plain stub of earlier runs, kept beside it so their figures stay comparable.
    if disciplined:
        gc.collect()
        gc.freeze()
        gc.set_threshold(*gc.get_threshold()[:2], 2**31 - 1)
    conn.send(port)
    try:
        while True:
            command = await loop.run_in_executor(None, conn.recv)
            if command == "stop":
                break
            if disciplined:
                gc.freeze()
            conn.send(await service.reissue() if pool is not None and command == "default" else service.bump(command))
    finally:
        if pool is not None:
            pool.close()
        # Cancelling thousands of open streams makes grpc print a CancelledError traceback for each.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        await server.stop(grace=None)
        conn.close()


def _main(conn: Connection, disciplined: bool, signing: bool) -> None:
    asyncio.run(_serve(conn, disciplined, signing))


class StubTarget:
    """The stub server in a child process, driven over a pipe (implements ``sds_fanout.SdsTarget``)."""

    def __init__(self, *, disciplined: bool = True, signing: bool = False) -> None:
        self._conn, child = multiprocessing.get_context("spawn").Pipe()
        # A daemonic process may not start the signing pool's workers; they end with it either way.
        self._process = multiprocessing.get_context("spawn").Process(
            target=_main, args=(child, disciplined, signing), daemon=not signing)
        self._process.start()
        if not self._conn.poll(60):
            self._process.kill()  # not daemonic when it signs: it would keep this process from exiting
            raise RuntimeError("the stub SDS server did not start")
        self.address = f"127.0.0.1:{self._conn.recv()}"
        self.pid = int(self._process.pid or 0)

    def _bump(self, kind: str) -> int:
        self._conn.send(kind)
        return int(self._conn.recv())

    def change_bundle(self) -> None:
        self._bump("ROOTCA")

    def reissue_all(self) -> None:
        self._bump("default")

    def close(self) -> None:
        self._conn.send("stop")
        self._process.join(10)
        if self._process.is_alive():
            self._process.kill()
