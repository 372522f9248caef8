"""Signing-pool workers hold the signing key: they must die with the daemon however it dies (issue 15, item 2)."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.processes import alive, children_of, kill_all, wait_gone

REPO = Path(__file__).resolve().parents[1]


def _start_daemon(tmp_path: Path) -> subprocess.Popen[bytes]:
    config = tmp_path / "ca.yaml"
    config.write_text("ca: {signing_workers: 2}\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("CA_SERVICE_CONFIG", None)
    args = [sys.executable, "-m", "ca_service", "--config", str(config), "--data-dir", str(tmp_path / "data"),
            "serve", "--grpc-address", "127.0.0.1:0", "--http-address", "127.0.0.1:0",
            "--bundle-address", "127.0.0.1:0"]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)


def _wait_for(proc: subprocess.Popen[bytes], marker: bytes, timeout: float = 60) -> bytes:
    assert proc.stdout is not None
    seen = b""
    deadline = time.monotonic() + timeout
    while marker not in seen:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no {marker!r} within {timeout}s: {seen.decode()}"
        ready, _, _ = select.select([proc.stdout], [], [], remaining)
        chunk = os.read(proc.stdout.fileno(), 65536) if ready else b""
        assert chunk or proc.poll() is None, f"daemon exited early ({proc.returncode}): {seen.decode()}"
        seen += chunk
    return seen


def test_signing_workers_exit_when_the_daemon_is_killed_with_sigkill(tmp_path: Path) -> None:
    proc = _start_daemon(tmp_path)
    workers: set[int] = set()
    try:
        _wait_for(proc, b"signing pool ready")
        workers = children_of(proc.pid)
        assert len(alive(workers)) >= 2, "the pool's workers should be running before the kill"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        left = wait_gone(workers, timeout=10)
        assert not left, f"signing workers {sorted(left)} outlived the daemon, still holding the signing key"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        kill_all(workers)
