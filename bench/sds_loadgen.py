"""Envoy-like SDS load generator: N ``StreamSecrets`` streams, two per node, in separate processes.

Each node opens a ``default`` and a ``ROOTCA`` stream (as an Istio sidecar does without ADS) with Istio
node metadata (``NAMESPACE``, ``SERVICE_ACCOUNT``), and ACKs every response like Envoy: a request that
echoes the response's ``version_info`` and ``nonce``.  Each worker process runs one asyncio loop with
many ``grpc.aio`` streams over a few channels.

Measurement is server-agnostic: the coordinator marks the stream state, triggers a change on the
server, and each worker reports the wall time of the ACK of the first response after the mark on the
last of its streams of that kind.  Times are ``time.time()`` on one machine, comparable across processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import random
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc
from google.protobuf import struct_pb2

SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
KINDS = ("default", "ROOTCA")
# Streams per HTTP/2 connection: Envoy has one connection per sidecar; a load generator cannot afford
# 10k sockets per process, and a few hundred streams per connection stays below any server's limit.
STREAMS_PER_CHANNEL = 500
CONNECTING = 200
FIRST_RESPONSE_TIMEOUT = 5.0


@dataclass
class StreamState:
    kind: str
    responses: int = 0
    mark: int = -1
    nacks: int = 0


@dataclass
class WorkerState:
    streams: list[StreamState] = field(default_factory=list)
    waiting: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    done: dict[str, asyncio.Event] = field(default_factory=lambda: {k: asyncio.Event() for k in KINDS})
    last_ack: dict[str, float] = field(default_factory=lambda: dict.fromkeys(KINDS, 0.0))
    initial: int = 0
    retries: int = 0
    connecting: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(CONNECTING))
    all_initial: asyncio.Event = field(default_factory=asyncio.Event)


def node_of(index: int) -> base_pb2.Node:
    namespace, account = f"bench-{index % 50}", f"sa-{index}"
    metadata = struct_pb2.Struct()
    metadata.update({"NAMESPACE": namespace, "SERVICE_ACCOUNT": account, "ISTIO_VERSION": "1.28.0"})
    return base_pb2.Node(id=f"sidecar~10.{index // 65536 % 256}.{index // 256 % 256}.{index % 256}~pod-{index}."
                            f"{namespace}~{namespace}.svc.cluster.local", cluster=f"{account}.{namespace}",
                         metadata=metadata)


async def _open(stub: sds_pb2_grpc.SecretDiscoveryServiceStub, node: base_pb2.Node, stream: StreamState,
                worker: WorkerState) -> tuple[object, discovery_pb2.DiscoveryResponse]:
    """Open the stream and get its first response, retrying like Envoy's SDS client if none comes.

    In a connect storm of thousands of streams, grpc.aio occasionally leaves a few RPCs that never
    reach the server handler; Envoy's initial-fetch timeout + reconnect covers the same case.
    """
    async with worker.connecting:  # ramp up: at most CONNECTING streams wait for a first response at once
        while True:
            call = stub.StreamSecrets()
            # Like Envoy: the node only on the first request of a stream.
            await call.write(discovery_pb2.DiscoveryRequest(node=node, resource_names=[stream.kind],
                                                            type_url=SECRET_TYPE))
            try:
                return call, await asyncio.wait_for(call.read(), FIRST_RESPONSE_TIMEOUT)
            except TimeoutError:
                call.cancel()
                worker.retries += 1
            except grpc.aio.AioRpcError as exc:
                # Shed by the daemon's stream admission (issue 15): back off and retry, as Envoy does.
                if exc.code() not in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE):
                    raise
                worker.retries += 1
                await asyncio.sleep(random.uniform(0, 1.0))


async def _stream(stub: sds_pb2_grpc.SecretDiscoveryServiceStub, node: base_pb2.Node, stream: StreamState,
                  worker: WorkerState) -> None:
    call, response = await _open(stub, node, stream, worker)
    while True:
        if response is grpc.aio.EOF:
            return
        await call.write(discovery_pb2.DiscoveryRequest(  # type: ignore[attr-defined]
            version_info=response.version_info, response_nonce=response.nonce, resource_names=[stream.kind],
            type_url=SECRET_TYPE))
        acked_at = time.time()
        stream.responses += 1
        if stream.responses == 1:
            worker.initial += 1
            if worker.initial == len(worker.streams):
                worker.all_initial.set()
        if stream.responses == stream.mark + 1:  # first response after the coordinator's mark
            worker.last_ack[stream.kind] = max(worker.last_ack[stream.kind], acked_at)
            worker.waiting[stream.kind] -= 1
            if worker.waiting[stream.kind] == 0:
                worker.done[stream.kind].set()
        response = await call.read()  # type: ignore[attr-defined]


async def _worker(conn: Connection, address: str, first_node: int, nodes: int) -> None:
    loop = asyncio.get_running_loop()
    worker = WorkerState()
    n_channels = max(1, (2 * nodes + STREAMS_PER_CHANNEL - 1) // STREAMS_PER_CHANNEL)
    options = [("grpc.max_receive_message_length", 16 << 20), ("grpc.use_local_subchannel_pool", 1)]
    # A distinct channel argument per channel forces a connection each (channels would share one otherwise).
    channels = [grpc.aio.insecure_channel(address, options=[*options, ("bench.channel", i)]) for i in range(n_channels)]
    stubs = [sds_pb2_grpc.SecretDiscoveryServiceStub(c) for c in channels]
    tasks = []
    for i in range(nodes):
        node = node_of(first_node + i)
        for kind in KINDS:
            stream = StreamState(kind)
            worker.streams.append(stream)
            tasks.append(asyncio.create_task(_stream(stubs[len(tasks) % n_channels], node, stream, worker)))
    await worker.all_initial.wait()
    conn.send(("ready", len(worker.streams), worker.retries))
    try:
        while True:
            command = await loop.run_in_executor(None, conn.recv)
            if command[0] == "mark":
                kind = command[1]
                mine = [s for s in worker.streams if s.kind == kind]
                for s in mine:
                    s.mark = s.responses
                worker.waiting[kind], worker.last_ack[kind] = len(mine), 0.0
                worker.done[kind].clear()
                conn.send(("marked", len(mine)))
            elif command[0] == "wait":
                await asyncio.wait_for(worker.done[command[1]].wait(), timeout=command[2])
                conn.send(("acked", worker.last_ack[command[1]]))
            else:
                break
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for channel in channels:
            await channel.close()


def _worker_main(conn: Connection, address: str, first_node: int, nodes: int) -> None:
    asyncio.run(_worker(conn, address, first_node, nodes))


class LoadGenerator:
    """``streams`` Envoy-like streams (``streams // 2`` nodes) against ``address``, in ``processes`` workers."""

    def __init__(self, address: str, streams: int, *, processes: int = 2, connect_timeout: float = 120.0) -> None:
        if streams < 2 or streams % 2:
            raise ValueError(f"streams must be an even number >= 2 (two per node), got {streams}")
        nodes = streams // 2
        processes = max(1, min(processes, nodes))
        ctx = multiprocessing.get_context("spawn")
        self._conns: list[Connection] = []
        self._procs = []
        share, extra = divmod(nodes, processes)
        first = 0
        for p in range(processes):
            count = share + (1 if p < extra else 0)
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker_main, args=(child, address, first, count), daemon=True)
            proc.start()
            self._conns.append(parent)
            self._procs.append(proc)
            first += count
        started = time.perf_counter()
        self.streams = self.retries = 0
        for conn in self._conns:
            if not conn.poll(connect_timeout - (time.perf_counter() - started)):
                self.close()
                raise TimeoutError(f"not every stream got its first response within {connect_timeout} s")
            _, streams, retries = conn.recv()
            self.streams, self.retries = self.streams + streams, self.retries + retries
        self.connect_seconds = time.perf_counter() - started

    def mark(self, kind: str) -> None:
        """Remember where every ``kind`` stream is; the next :meth:`wait_all_acked` waits for a newer response."""
        for conn in self._conns:
            conn.send(("mark", kind))
        for conn in self._conns:
            conn.recv()

    def wait_all_acked(self, kind: str, timeout: float = 120.0) -> float:
        """Wall time (``time.time()``) of the last ACK, on any stream of ``kind``, of a response after the mark."""
        for conn in self._conns:
            conn.send(("wait", kind, timeout))
        return max(float(conn.recv()[1]) for conn in self._conns)

    def close(self) -> None:
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.send(("stop",))
        for proc in self._procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
