"""Start-up: ``python -m ca_service serve`` with existing state (embedded default) until it is ready.

Ready is ``/readyz`` answering 200 when the daemon has an HTTP side-port (it logs "HTTP side-port
listening" with its URL); without one (before the side-port branch is merged) it is the log line
"ca-service ready".  Listeners are moved to port 0 so runs never collide.  Same-run baselines: a bare
``python -c pass`` and ``python -c "import ca_service.cli"``.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from bench.common import ROOT, Result

READY_LINE = "ca-service ready"
SIDE_PORT_LINE = "HTTP side-port listening"
TIMEOUT_S = 30.0


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CA_SERVICE_")}
    env["CA_SERVICE_LOGGING__FORMAT"] = "json"
    env["PYTHONPATH"] = str(ROOT)
    return env


def _wall(argv: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, check=True, env=_env(), cwd=ROOT, capture_output=True)
    return time.perf_counter() - started


def _readyz(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/readyz", timeout=0.5) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def _read_lines(stream: object, events: queue.Queue[tuple[str, str]]) -> None:
    for raw in stream:  # type: ignore[attr-defined]
        try:
            doc = json.loads(raw)
        except ValueError:
            continue
        if doc.get("msg") == READY_LINE:
            events.put(("ready", ""))
        elif doc.get("msg") == SIDE_PORT_LINE and doc.get("url"):
            events.put(("url", str(doc["url"]).rstrip("/")))


def measure_once(data_dir: Path) -> tuple[float, str]:
    """Seconds from spawning the daemon to ready, and how readiness was seen (``/readyz`` or ``log``)."""
    argv = [sys.executable, "-m", "ca_service", "--data-dir", str(data_dir), "serve",
            "--grpc-address", "127.0.0.1:0", "--http-address", "127.0.0.1:0", "--bundle-address", "127.0.0.1:0"]
    events: queue.Queue[tuple[str, str]] = queue.Queue()
    started = time.perf_counter()
    proc = subprocess.Popen(argv, env=_env(), cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    threading.Thread(target=_read_lines, args=(proc.stderr, events), daemon=True).start()
    url, log_ready = "", False
    try:
        while time.perf_counter() - started < TIMEOUT_S:
            try:
                kind, value = events.get(timeout=0.002)
                url, log_ready = (value, log_ready) if kind == "url" else (url, True)
            except queue.Empty:
                pass
            if url and _readyz(url):
                return time.perf_counter() - started, "/readyz"
            if log_ready and not url:
                return time.perf_counter() - started, "log"
            if proc.poll() is not None:
                raise RuntimeError(f"ca-service serve exited with {proc.returncode} before it was ready")
        raise RuntimeError(f"ca-service serve was not ready within {TIMEOUT_S} s")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run(quick: bool) -> Result:
    runs = 2 if quick else 7
    with tempfile.TemporaryDirectory(prefix="ca-bench-start-") as tmp:
        data_dir = Path(tmp) / "data"
        subprocess.run([sys.executable, "-m", "ca_service", "--data-dir", str(data_dir), "init"], check=True,
                       env=_env(), cwd=ROOT, capture_output=True)
        times, modes = [], set()
        bare, imports = [], []
        for _ in range(runs):  # interleaved with the baselines so noise hits all of them alike
            seconds, mode = measure_once(data_dir)
            times.append(seconds)
            modes.add(mode)
            bare.append(_wall([sys.executable, "-c", "pass"]))
            imports.append(_wall([sys.executable, "-c", "import ca_service.cli, ca_service.app"]))
    result = Result("startup")
    result.metrics.update({
        "start_to_ready_s": statistics.median(times), "start_to_ready_min_s": min(times),
        "python_bare_s": statistics.median(bare), "import_cli_s": statistics.median(imports),
        "runs": float(runs),
    })
    result.notes.append(f"readiness seen via {', '.join(sorted(modes))}")
    result.target("start-up to ready < 1 s", "start_to_ready_s", "<", 1.0)
    return result
