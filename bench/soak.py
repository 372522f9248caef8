"""Soak: the real daemon (a subprocess, so its memory is its own) with two real Envoys (A → B over mTLS,
every certificate from our SDS), a request every 50 ms on a fresh TLS handshake, second-scale SVIDs
(renewed every ~5 s) and a 90 s intermediate (rotated every ~45 s), for ``--duration`` seconds (30 min
by default; the test suite runs 35 s with a 40 s intermediate).

Reports failed requests (target 0), distinct server leaves A saw, intermediate rotations, and the
daemon's RSS over time (target: flat, i.e. the last quarter's mean within a few MB of the second
quarter's, after warm-up).

    python bench/soak.py [--duration SECONDS]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import Result  # noqa: E402
from tests.envoy_harness import (  # noqa: E402
    ClientListener,
    EnvoyConfig,
    EnvoyProcess,
    HttpResult,
    NodeIdentity,
    SdsServer,
    ServerListener,
    free_port,
    http_get,
)

REQUEST_INTERVAL = 0.05  # the "a request every 50 ms"
RSS_INTERVAL = 2.0
NODE_A = NodeIdentity(service_account="soak-a")
NODE_B = NodeIdentity(service_account="soak-b")


def soak_config(data: Path, grpc_port: int, http_port: int, intermediate_ttl: str = "90s") -> dict[str, object]:
    return {
        "data_dir": str(data),
        "grpc": [{"address": f"127.0.0.1:{grpc_port}", "trust_node_metadata": True}],
        "http": {"address": f"127.0.0.1:{http_port}"},
        "bundle_endpoint": {"enabled": False},
        "ca": {"root_ttl": "30d", "intermediate_ttl": intermediate_ttl, "istiod_intermediate_ttl": "10d",
               "workload_ttl": "10s", "max_workload_ttl": "10s", "backdate": "1s"},
        "istiod": {"max_workload_ttl": "1d"},
        "rotation": {"tick_interval": "200ms", "reissue_window": "1s"},
        "logging": {"level": "warning"},
    }


@dataclass
class Soak:
    url: str = ""
    metrics_url: str = ""
    daemon_pid: int = 0
    results: list[HttpResult | BaseException] = field(default_factory=list)
    serials: list[int] = field(default_factory=list)
    rss: list[tuple[float, float]] = field(default_factory=list)  # (seconds since start, MB)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    async def traffic(self) -> None:
        while not self.done.is_set():
            try:
                result = await http_get(self.url, timeout=5)
                self.results.append(result)
                cert = result.upstream_peer_certificate()
                if cert is not None and (not self.serials or self.serials[-1] != cert.serial_number):
                    self.serials.append(cert.serial_number)
            except (OSError, TimeoutError) as exc:
                self.results.append(exc)
            await asyncio.sleep(REQUEST_INTERVAL)

    async def sample_rss(self, started: float) -> None:
        while not self.done.is_set():
            self.rss.append((time.monotonic() - started, _rss_mb(self.daemon_pid)))
            await asyncio.sleep(RSS_INTERVAL)

    def failures(self) -> list[HttpResult | BaseException]:
        return [r for r in self.results if not isinstance(r, HttpResult) or r.status != 200]


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _metric(url: str, name: str, **labels: str) -> float:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"^{re.escape(name)}(?:\{{(.*)\}})? (\S+)$", line)
        if match and all(part in (match[1] or "") for part in want.split(",") if part):
            total += float(match[2])
    return total


def _start_daemon(workdir: Path, intermediate_ttl: str) -> tuple[subprocess.Popen[bytes], int, int]:
    grpc_port, http_port = free_port(), free_port()
    config = workdir / "soak.yaml"
    config.write_text(json.dumps(soak_config(workdir / "data", grpc_port, http_port, intermediate_ttl)))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("CA_SERVICE_CONFIG", None)
    log = (workdir / "daemon.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "ca_service", "--config", str(config), "serve"],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=workdir)
    return proc, grpc_port, http_port


async def _wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError):
            urllib.request.urlopen(url, timeout=2).read()
            return
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"daemon did not come up (exit {proc.poll()})")
        await asyncio.sleep(0.1)


async def run_soak(duration: float, workdir: Path, *, intermediate_ttl: str = "90s") -> Result:
    """``intermediate_ttl``: the intermediate is rotated at half of it (the suite's short run shortens it)."""
    result = Result("soak")
    proc, grpc_port, http_port = _start_daemon(workdir, intermediate_ttl)
    soak = Soak(metrics_url=f"http://127.0.0.1:{http_port}/metrics", daemon_pid=proc.pid)
    try:
        await _wait_http(f"http://127.0.0.1:{http_port}/healthz", proc)
        sds = SdsServer.tcp(grpc_port)
        server = ServerListener(allowed_peer_spiffe_ids=(NODE_A.spiffe_id,))
        async with contextlib.AsyncExitStack() as stack:
            envoy_b = await stack.enter_async_context(
                EnvoyProcess(EnvoyConfig(NODE_B, sds, server_listener=server), workdir / "b"))
            to_b = ClientListener("to-b", await envoy_b.server_port(), (NODE_B.spiffe_id,))
            envoy_a = await stack.enter_async_context(
                EnvoyProcess(EnvoyConfig(NODE_A, sds, client_listeners=(to_b,)), workdir / "a"))
            for node, envoy in ((NODE_A, envoy_a), (NODE_B, envoy_b)):
                await envoy.wait_for_certificate(uri_san=node.spiffe_id)
                await envoy.wait_for_secret("ROOTCA")
            soak.url = await envoy_a.client_url("to-b")
            rotations_before = _metric(soak.metrics_url, "ca_rotations_total", kind="intermediate")
            started = time.monotonic()
            tasks = [asyncio.create_task(soak.traffic()), asyncio.create_task(soak.sample_rss(started))]
            await asyncio.sleep(duration)
            soak.done.set()
            await asyncio.gather(*tasks)
            rotations = _metric(soak.metrics_url, "ca_rotations_total", kind="intermediate") - rotations_before
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    _report(result, soak, duration, rotations)
    return result


def _report(result: Result, soak: Soak, duration: float, rotations: float) -> None:
    samples = [mb for _, mb in soak.rss]
    quarter = max(1, len(samples) // 4)
    # Growth: the last quarter's mean against the second quarter's (the first quarter is warm-up:
    # imports settle, caches fill, the first intermediate rotation allocates its state).
    growth = (sum(samples[-quarter:]) / quarter - sum(samples[quarter:2 * quarter]) / quarter
              if len(samples) >= 4 else 0.0)
    result.metrics.update({
        "duration_s": duration, "requests": len(soak.results), "failed_requests": len(soak.failures()),
        "server_leaves_seen": len(set(soak.serials)), "intermediate_rotations": rotations,
        "rss_start_mb": samples[0] if samples else 0.0, "rss_end_mb": samples[-1] if samples else 0.0,
        "rss_max_mb": max(samples, default=0.0), "rss_growth_mb": growth,
    })
    result.target("0 failed requests", "failed_requests", "<=", 0)
    result.target("flat memory (last quarter vs second, MB)", "rss_growth_mb", "<", 10)
    failures = soak.failures()[:5]
    if failures:
        result.notes.append(f"first failures: {failures!r}")


def run(quick: bool) -> Result:
    """``bench/run.py`` entry: 60 s with --quick, else 30 minutes."""
    with tempfile.TemporaryDirectory(prefix="ca-soak-") as tmp:
        return asyncio.run(run_soak(60 if quick else 1800, Path(tmp)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=1800)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ca-soak-") as tmp:
        result = asyncio.run(run_soak(args.duration, Path(tmp)))
    print(json.dumps(result.as_dict(), indent=2))


if __name__ == "__main__":
    main()
