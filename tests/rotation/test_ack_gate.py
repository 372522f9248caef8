"""The cluster-wide ACK gate as a pure decision over replica frontiers."""

from __future__ import annotations

import datetime as dt

from ca_service.rotation.ack_gate import ReplicaFrontier, live_frontiers, may_sign_under, replicas_behind

NOW = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
TTL = dt.timedelta(seconds=15)


def _f(replica: str, acked: int | None, streams: int, age_s: float = 1) -> ReplicaFrontier:
    return ReplicaFrontier(replica, acked, streams, NOW - dt.timedelta(seconds=age_s), TTL)


def test_the_cluster_may_sign_under_n_when_every_live_replica_acked_n() -> None:
    assert may_sign_under([_f("a", 5, 3), _f("b", 6, 1)], 5, NOW)


def test_one_replica_behind_closes_the_gate() -> None:
    frontiers = [_f("a", 5, 3), _f("b", 4, 1)]
    assert not may_sign_under(frontiers, 5, NOW)
    assert [f.replica for f in replicas_behind(frontiers, 5, NOW)] == ["b"]


def test_a_replica_with_streams_that_acked_nothing_yet_closes_the_gate() -> None:
    assert not may_sign_under([_f("a", None, 2)], 1, NOW)


def test_a_replica_without_streams_never_holds_the_gate() -> None:
    assert may_sign_under([_f("a", None, 0), _f("b", 1, 0)], 5, NOW)


def test_a_replica_whose_record_is_older_than_its_ttl_is_gone() -> None:
    frontiers = [_f("dead", 1, 9, age_s=15), _f("alive", 5, 1, age_s=14.9)]
    assert [f.replica for f in live_frontiers(frontiers, NOW)] == ["alive"]
    assert may_sign_under(frontiers, 5, NOW)


def test_no_replicas_at_all_opens_the_gate() -> None:
    assert may_sign_under([], 5, NOW)
