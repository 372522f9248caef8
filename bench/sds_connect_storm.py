"""Connect storm: N Envoy-like SDS clients start at once against the real daemon (issue 15 item 7).

Every client opens ``StreamSecrets`` for ``default`` with Istio node metadata and waits for its first
response; on any failure (RESOURCE_EXHAUSTED from admission, UNAVAILABLE, a timeout) it retries with
Envoy's xDS backoff (jittered exponential: uniform(0, min(500 ms * 2^n, 30 s))).  The streams stay open
until every client is served, as sidecars' streams do.  Reported: served / failed, attempts, time to be
served (p50/p99/max), and what the daemon counted as shed.

    python bench/sds_connect_storm.py --clients 10000            # the target: all served
    python bench/sds_connect_storm.py --clients 1000 --workers 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sds_loadgen import SECRET_TYPE, node_of

ROOT = Path(__file__).resolve().parent.parent
BACKOFF_BASE, BACKOFF_MAX = 0.5, 30.0  # Envoy's xDS stream retry defaults
INITIAL_FETCH_TIMEOUT = 15.0  # Envoy's initial_fetch_timeout default
CLIENTS_PER_CHANNEL = 250


async def _client(stub: sds_pb2_grpc.SecretDiscoveryServiceStub, index: int, started: float,
                  deadline: float, held: list[Any]) -> dict[str, Any]:
    attempts, codes = 0, {}
    while time.monotonic() < deadline:
        attempts += 1
        call = stub.StreamSecrets()
        try:
            await call.write(discovery_pb2.DiscoveryRequest(node=node_of(index), resource_names=["default"],
                                                            type_url=SECRET_TYPE))
            response = await asyncio.wait_for(call.read(), INITIAL_FETCH_TIMEOUT)
            if response is not grpc.aio.EOF:
                held.append(call)
                return {"served_s": time.monotonic() - started, "attempts": attempts, "codes": codes}
            code = "EOF"
        except grpc.aio.AioRpcError as exc:
            code = exc.code().name
        except (TimeoutError, grpc.aio.UsageError, asyncio.InvalidStateError) as exc:
            code = type(exc).__name__
        call.cancel()
        codes[code] = codes.get(code, 0) + 1
        await asyncio.sleep(random.uniform(0, min(BACKOFF_BASE * 2 ** (attempts - 1), BACKOFF_MAX)))
    return {"served_s": None, "attempts": attempts, "codes": codes}


async def _worker_main(address: str, first: int, count: int, timeout: float) -> list[dict[str, Any]]:
    started = time.monotonic()
    channels = [grpc.aio.insecure_channel(address) for _ in range((count + CLIENTS_PER_CHANNEL - 1)
                                                                   // CLIENTS_PER_CHANNEL)]
    held: list[Any] = []
    try:
        results = await asyncio.gather(*(
            _client(sds_pb2_grpc.SecretDiscoveryServiceStub(channels[i // CLIENTS_PER_CHANNEL]), first + i,
                    started, started + timeout, held) for i in range(count)))
    finally:
        for call in held:
            call.cancel()
        for channel in channels:
            await channel.close()
    return list(results)


def _worker(args: tuple[str, int, int, float]) -> list[dict[str, Any]]:
    return asyncio.run(_worker_main(*args))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_daemon(base: Path, extra: str) -> tuple[subprocess.Popen[bytes], str]:
    address = f"127.0.0.1:{_free_port()}"
    config = base / "ca-service.yaml"
    config.write_text(f'data_dir: {base / "data"}\ngrpc: [{{address: "{address}", trust_node_metadata: true}}]\n'
                      f'http: {{address: "127.0.0.1:0"}}\nbundle_endpoint: {{enabled: false}}\n'
                      f'logging: {{level: warning}}\n{extra}')
    log = (base / "daemon.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "ca_service", "--config", str(config), "serve"], stdout=log,
                            stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=base)
    deadline = time.monotonic() + 60
    while not (base / "data" / "sideport.address").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError((base / "daemon.log").read_text())
        time.sleep(0.1)
    return proc, address


def _shed(base: Path) -> float:
    url = (base / "data" / "sideport.address").read_text().strip()
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith("ca_sds_streams_shed_total"):
                return float(line.split()[1])
    return 0.0


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2) if ordered else 0.0


def run(clients: int, workers: int, timeout: float, extra: str) -> dict[str, Any]:
    base = Path(tempfile.mkdtemp(prefix="ca-bench-storm-"))
    proc, address = _start_daemon(base, extra)
    try:
        counts = [clients // workers + (1 if w < clients % workers else 0) for w in range(workers)]
        share = [(address, sum(counts[:w]), counts[w], timeout) for w in range(workers)]
        started = time.monotonic()
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            results = [r for chunk in pool.map(_worker, share) for r in chunk]
        wall = time.monotonic() - started
        shed = _shed(base)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    served = [r["served_s"] for r in results if r["served_s"] is not None]
    codes: dict[str, int] = {}
    for r in results:
        for code, n in r["codes"].items():
            codes[code] = codes.get(code, 0) + n
    return {"clients": clients, "served": len(served), "failed": clients - len(served), "wall_s": round(wall, 2),
            "served_p50_s": _pct(served, 0.5), "served_p99_s": _pct(served, 0.99), "served_max_s": _pct(served, 1.0),
            "attempts_max": max(r["attempts"] for r in results), "retry_codes": codes, "daemon_shed": shed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=2, help="client processes")
    parser.add_argument("--timeout", type=float, default=600.0, help="give up on a client after this (s)")
    parser.add_argument("--config", default="", help="extra YAML appended to the daemon's config, e.g. "
                        "'sds: {admission_rate: 200, admission_burst: 100}'")
    args = parser.parse_args()
    print(json.dumps(run(args.clients, args.workers, args.timeout, args.config), indent=2))


if __name__ == "__main__":
    main()
