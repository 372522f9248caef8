"""The soak run's CI version (bench/soak.py for 35 s instead of 30 min, the intermediate rotated every ~20 s
instead of ~45 s): the real daemon, two real Envoys, a request every 50 ms on a fresh handshake, SVIDs
renewed every ~5 s and the intermediate rotated: not one request fails and the daemon's memory stays flat.
(issue 15, "soak run")"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.soak import run_soak

pytestmark = pytest.mark.envoy


async def test_traffic_through_leaf_and_intermediate_renewals_loses_no_request(tmp_path: Path) -> None:
    result = await run_soak(35, tmp_path, intermediate_ttl="40s")
    m = result.metrics
    assert m["failed_requests"] == 0, result.notes
    assert m["requests"] > 300  # ~20 a second for 35 s, unless the traffic loop stalled
    assert m["server_leaves_seen"] >= 5, "the server's SVID should have been renewed every ~5 s"
    assert m["intermediate_rotations"] >= 1
    # A size, not a time: growth across the run (last quarter vs second quarter of RSS samples).
    assert m["rss_growth_mb"] < 10, m
