"""The cluster-wide ACK gate of a root rotation, as a pure decision over replicas' published frontiers.

Each replica publishes the lowest trust-bundle sequence that *every* one of its SDS streams has ACKed
(its frontier) and how many streams it has.  The cluster may sign under the bundle with sequence N only
when every live replica with streams has a frontier at or past N.  A record older than its own
time-to-live belongs to a replica that is gone: its Envoys reconnect to another replica and ACK there,
so it no longer holds the gate.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class ReplicaFrontier:
    replica: str
    acked_sequence: int | None  # lowest bundle sequence ACKed by all its streams; None: nothing ACKed yet
    streams: int
    updated_at: dt.datetime
    ttl: dt.timedelta  # the record's lifetime (the replica's lease duration)

    def is_live(self, now: dt.datetime) -> bool:
        return now - self.updated_at < self.ttl

    def is_behind(self, bundle_sequence: int) -> bool:
        """Whether a stream of this replica has not ACKed ``bundle_sequence`` (never, without streams)."""
        return self.streams > 0 and (self.acked_sequence is None or self.acked_sequence < bundle_sequence)


def live_frontiers(frontiers: Iterable[ReplicaFrontier], now: dt.datetime) -> tuple[ReplicaFrontier, ...]:
    return tuple(f for f in frontiers if f.is_live(now))


def replicas_behind(frontiers: Iterable[ReplicaFrontier], bundle_sequence: int,
                    now: dt.datetime) -> tuple[ReplicaFrontier, ...]:
    """The live replicas that still hold the gate for ``bundle_sequence``."""
    return tuple(f for f in live_frontiers(frontiers, now) if f.is_behind(bundle_sequence))


def may_sign_under(frontiers: Iterable[ReplicaFrontier], bundle_sequence: int, now: dt.datetime) -> bool:
    """Whether every connected stream on every live replica has ACKed the bundle ``bundle_sequence``."""
    return not replicas_behind(frontiers, bundle_sequence, now)
