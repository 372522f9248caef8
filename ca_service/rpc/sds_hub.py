"""Fan-out of certificate and bundle changes to exactly the SDS streams that depend on them.

Each stream owns one :class:`StreamWatch` (a queue plus the change keys it watches).  Registry and
trust-store listeners put a :class:`Changed` into the queues of the watches whose keys match; a
stream's handler sleeps on its queue, so an idle stream costs no wake-ups and no timer.  The hub
also answers the root-rotation ACK gate (:class:`~ca_service.services.ports.AckTracker`).
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from ca_service.pki.identity import TrustDomain
from ca_service.rpc.sds_acks import AckLedger
from ca_service.rpc.sds_resources import TRUST_SET, ChangeKey, bundle_key, svid_key
from ca_service.services.workloads import WorkloadCert


@dataclass(frozen=True)
class Changed:
    keys: frozenset[ChangeKey]


class Shutdown:
    """Put into every queue on graceful stop: the handler ends its stream with OK."""


@dataclass(eq=False)
class StreamWatch:
    queue: asyncio.Queue[Any]
    keys: frozenset[ChangeKey] = frozenset()
    node_id: str | None = None  # set once the stream's caller is authenticated


class NodeTracker(Protocol):
    """Told when a node gains its first open stream and loses its last (the registry forgets idle nodes)."""

    def node_connected(self, node_id: str) -> None: ...

    def node_disconnected(self, node_id: str) -> None: ...


class WatchHub:
    """Maps change keys to watching streams; implements :class:`AckTracker`."""

    def __init__(self, nodes: NodeTracker | None = None) -> None:
        self._nodes = nodes
        self._streams_of: dict[str, int] = {}  # node id -> open streams
        self._by_key: dict[ChangeKey, set[StreamWatch]] = defaultdict(set)
        self._watches: set[StreamWatch] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        # The ACK gate's bookkeeping, one entry per open watch (the servicer records pushes and ACKs).
        self.acks = AckLedger()

    def open(self) -> StreamWatch:
        self._loop = asyncio.get_running_loop()
        watch = StreamWatch(asyncio.Queue())
        if self._closed:
            watch.queue.put_nowait(Shutdown())
        self._watches.add(watch)
        self.acks.open(watch)
        return watch

    def close_watch(self, watch: StreamWatch) -> None:
        self.set_keys(watch, frozenset())
        self._watches.discard(watch)
        self.acks.close(watch)
        node_id, watch.node_id = watch.node_id, None
        if node_id is not None:
            left = self._streams_of.pop(node_id) - 1
            if left:
                self._streams_of[node_id] = left
            elif self._nodes is not None:
                self._nodes.node_disconnected(node_id)

    def attach_node(self, watch: StreamWatch, node_id: str) -> None:
        """Record that ``watch`` is a stream of ``node_id`` (once per watch)."""
        watch.node_id = node_id
        self._streams_of[node_id] = self._streams_of.get(node_id, 0) + 1
        if self._streams_of[node_id] == 1 and self._nodes is not None:
            self._nodes.node_connected(node_id)

    def touch_node(self, node_id: str) -> None:
        """A node used a one-shot call (FetchSecrets): without an open stream its grace period starts now."""
        if node_id not in self._streams_of and self._nodes is not None:
            self._nodes.node_disconnected(node_id)

    def open_streams(self, node_id: str) -> int:
        return self._streams_of.get(node_id, 0)

    def set_keys(self, watch: StreamWatch, keys: frozenset[ChangeKey]) -> None:
        if keys is watch.keys:  # the servicer calls this after every step; most change nothing
            return
        for key in watch.keys - keys:
            watchers = self._by_key.get(key)
            if watchers is not None:
                watchers.discard(watch)
                if not watchers:
                    del self._by_key[key]
        for key in keys - watch.keys:
            self._by_key[key].add(watch)
        watch.keys = keys

    def shutdown(self) -> None:
        self._closed = True
        for watch in list(self._watches):
            watch.queue.put_nowait(Shutdown())

    # ------------------------------------------------------------ listeners (registry, trust store)

    def on_workload(self, cert: WorkloadCert) -> None:
        self.notify([svid_key(cert.node_id, cert.spiffe_id)])

    def on_trust(self, changed: frozenset[TrustDomain]) -> None:
        self.notify([TRUST_SET, *(bundle_key(td) for td in changed)])

    def notify(self, keys: Iterable[ChangeKey]) -> None:
        """Wake the streams watching any of ``keys`` (safe to call from a non-loop thread)."""
        keyset = frozenset(keys)
        loop = self._loop
        if loop is None:
            return  # no stream was ever opened
        if loop.is_running() and _in_loop_thread(loop):
            self._deliver(keyset)
        else:
            loop.call_soon_threadsafe(self._deliver, keyset)

    def _deliver(self, keys: frozenset[ChangeKey]) -> None:
        targets: set[StreamWatch] = set()
        for key in keys:
            targets |= self._by_key.get(key, set())
        for watch in targets:
            watch.queue.put_nowait(Changed(keys & watch.keys))

    # ------------------------------------------------------------ AckTracker

    def connected_streams(self) -> int:
        return self.acks.connected_streams()

    def streams_behind(self, bundle_sequence: int) -> int:
        return self.acks.streams_behind(bundle_sequence)

    def lowest_acked_bundle_sequence(self) -> int | None:
        """This replica's ACK frontier (published for the cluster-wide gate); None without such streams."""
        return self.acks.lowest_acked()


def _in_loop_thread(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:  # called from a thread without a loop (a scheduler thread)
        return False
