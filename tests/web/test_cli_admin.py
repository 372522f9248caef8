"""`ca-service admin` against a real daemon process (`python -m ca_service serve`), data dir in tmp_path."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def cli(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ca_service", "--data-dir", str(data_dir), *args],
                          capture_output=True, text=True, timeout=30, cwd=ROOT)


@pytest.fixture
def running_daemon(tmp_path: Path) -> Iterator[tuple[Path, subprocess.Popen[str]]]:
    data_dir = tmp_path / "data"
    proc = subprocess.Popen(
        [sys.executable, "-m", "ca_service", "--data-dir", str(data_dir), "serve", "--http-address", "127.0.0.1:0",
         "--grpc-address", "127.0.0.1:0", "--bundle-address", "127.0.0.1:0"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "CA_SERVICE_CONFIG": ""},
    )
    address_file = data_dir / "sideport.address"
    deadline = time.monotonic() + 20
    while not address_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            _out, err = proc.communicate()
            pytest.fail(f"daemon did not start: {err}")
        time.sleep(0.05)
    try:
        yield data_dir, proc
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)


def test_admin_status_and_rotate_work_out_of_the_box_against_a_running_daemon(
        running_daemon: tuple[Path, subprocess.Popen[str]]) -> None:
    data_dir, proc = running_daemon
    token_file = data_dir / "admin-token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    status = cli(data_dir, "admin", "status", "--json")
    assert status.returncode == 0, status.stderr
    doc = json.loads(status.stdout)
    assert doc["trust_domain"] == "cluster.local" and len(doc["certificates"]) == 3
    text = cli(data_dir, "admin", "status")
    assert text.returncode == 0 and "intermediate" in text.stdout

    bad = cli(data_dir, "admin", "rotate", "--scope", "workload", "--reason", "x")
    assert bad.returncode == 1 and "spiffe_id" in bad.stderr and "HTTP 400" in bad.stderr
    before = json.loads(cli(data_dir, "admin", "status", "--json").stdout)["certificates"]
    dry = cli(data_dir, "admin", "rotate", "--scope", "intermediate", "--reason", "drill", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    active = next(c for c in before if c["kind"] == "intermediate" and c["state"] == "active")
    assert json.loads(dry.stdout)["dry_run"] is True
    assert active["serial"] in json.loads(dry.stdout)["affected_serials"]
    after = json.loads(cli(data_dir, "admin", "status", "--json").stdout)["certificates"]
    assert [c["serial"] for c in after] == [c["serial"] for c in before], "a dry run changed the CA"

    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=20)
    records = [json.loads(line) for line in (data_dir / "audit.log").read_text().splitlines()]
    assert [(r["action"], r["result"]) for r in records] == [
        ("status", "ok"), ("status", "ok"), ("rotate", "invalid"), ("status", "ok"), ("rotate", "dry-run"),
        ("status", "ok")]
    assert token_file.read_text().strip() not in stderr + status.stdout + text.stdout
    assert "PRIVATE KEY" not in stderr
    assert not (data_dir / "sideport.address").exists()


def test_admin_without_a_running_daemon_says_so(tmp_path: Path) -> None:
    result = cli(tmp_path / "data", "admin", "status")
    assert result.returncode == 1 and "admin token" in result.stderr
