"""``/metrics`` scrape latency with 100k live workload SVIDs (issue 15 item 3; target p99 < 50 ms).

The registry is filled through ``WorkloadRegistry._install`` (as the renewal bench does) with 100k distinct
identities over 100 namespaces and a few real SVIDs of different lifetimes, then the real side-port is
scraped sequentially and, in a second pass, by concurrent scrapers while an SDS-like probe task measures how
long the event loop is held (the issue's failure was that scrapes starved SDS).

    python bench/metrics_scrape.py [--svids 100000] [--scrapes 200]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ca_service.clock import SystemClock
from ca_service.config import load_settings
from ca_service.pki.identity import SpiffeId
from ca_service.services.authority import Authority
from ca_service.services.trust import TrustStore
from ca_service.services.workloads import WorkloadRegistry
from ca_service.storage.directory import DirectoryStore
from ca_service.telemetry import Telemetry
from ca_service.web.server import HttpSideport


def _populate(registry: WorkloadRegistry, count: int) -> None:
    now = dt.datetime.now(dt.UTC)
    templates = [registry.get_or_issue(f"template-{i}", SpiffeId.parse(f"spiffe://cluster.local/ns/t/sa/t{i}"))
                 for i in range(8)]
    for i in range(count):
        t = templates[i % len(templates)]
        spiffe_id = SpiffeId.parse(f"spiffe://cluster.local/ns/ns-{i % 100}/sa/sa-{i}")
        registry._install(f"node-{i}", spiffe_id, t.key_pem, t.svid, now, generation=1)


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _scrape(session: aiohttp.ClientSession, url: str) -> tuple[float, int]:
    started = time.perf_counter()
    async with session.get(url) as resp:
        body = await resp.read()
    return time.perf_counter() - started, len(body)


async def _loop_lag(stop: asyncio.Event, lags: list[float]) -> None:
    while not stop.is_set():
        started = time.perf_counter()
        await asyncio.sleep(0.005)
        lags.append(time.perf_counter() - started - 0.005)


async def run(svids: int, scrapes: int) -> dict[str, float]:
    base = Path(tempfile.mkdtemp(prefix="ca-bench-metrics-"))
    settings = load_settings(environ={}, overrides={"data_dir": str(base / "data"), "http": {"address": "127.0.0.1:0"}})
    clock = SystemClock()
    authority = Authority(DirectoryStore(settings.data_dir / "state"), settings.domain, settings.ca, clock)
    authority.load_or_bootstrap()
    registry = WorkloadRegistry(authority, settings.rotation, clock)
    started = time.perf_counter()
    _populate(registry, svids)
    fill_s = time.perf_counter() - started
    sideport = HttpSideport(settings, authority, Telemetry(), clock, registry=registry, trust=TrustStore(authority))
    await sideport.start()
    url = f"{sideport.url}/metrics"
    try:
        async with aiohttp.ClientSession() as session:
            sequential = [await _scrape(session, url) for _ in range(scrapes)]
            stop, lags = asyncio.Event(), []
            lag_task = asyncio.create_task(_loop_lag(stop, lags))
            concurrent = await asyncio.gather(*(_scrape(session, url) for _ in range(scrapes)))
            stop.set()
            await lag_task
    finally:
        await sideport.stop()
    seq = [s for s, _ in sequential]
    return {"svids": svids, "fill_s": round(fill_s, 2), "body_bytes": sequential[-1][1],
            "scrape_p50_ms": round(statistics.median(seq) * 1000, 2), "scrape_p99_ms": round(_p(seq, 0.99) * 1000, 2),
            "concurrent_scrapes": scrapes,
            "concurrent_p99_ms": round(_p([s for s, _ in concurrent], 0.99) * 1000, 2),
            "loop_lag_max_ms": round(max(lags, default=0.0) * 1000, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--svids", type=int, default=100_000)
    parser.add_argument("--scrapes", type=int, default=200)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args.svids, args.scrapes)), indent=2))


if __name__ == "__main__":
    main()
