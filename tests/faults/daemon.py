"""A real ``ca-service serve`` in a subprocess (through ``launcher.py``, which can inject a crash into the
state write), driven over its real admin API, plus the consistency check every fault test ends with."""

from __future__ import annotations

import contextlib
import datetime as dt
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from ca_service.config import load_settings
from ca_service.pki.keys import same_public_key
from ca_service.pki.templates import CAKind
from ca_service.pki.verify import verify_ca_chain
from ca_service.rotation.state import AuthorityState
from ca_service.storage.base import AUTHORITY_RECORD
from ca_service.storage.codec import decode_state
from ca_service.storage.directory import DirectoryStore
from tests.processes import children_of, kill_all

REPO = Path(__file__).resolve().parents[2]
LAUNCHER = Path(__file__).with_name("launcher.py")

# Second-scale lifetimes so that one root rotation (publish, gate, sign, re-issue, retire) takes a few
# seconds, and kills land in every phase of it.
FAST: dict[str, Any] = {
    "ca": {"root_ttl": "2h", "intermediate_ttl": "1h", "istiod_intermediate_ttl": "30m", "workload_ttl": "2s",
           "max_workload_ttl": "2s", "backdate": "200ms", "signing_workers": 0},
    "istiod": {"max_workload_ttl": "2s"},
    "rotation": {"tick_interval": "100ms", "root_min_propagation": "1s", "root_ack_timeout": "30s",
                 "reissue_window": "1s", "misfire_grace": "5s"},
    "bundle_endpoint": {"enabled": False},
}


class Daemon:
    """One run of the daemon; its output is collected by a thread so the pipe never fills."""

    def __init__(self, data: Path, config: Path, *, fault: str = "none", nth: int = 0) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        env.pop("CA_SERVICE_CONFIG", None)
        args = [sys.executable, str(LAUNCHER), fault, str(nth), "--", "--config", str(config), "--data-dir",
                str(data), "serve", "--grpc-address", "127.0.0.1:0", "--http-address", "127.0.0.1:0"]
        self.data = data
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=data.parent)
        self.output = b""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.url = ""

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output += line

    def wait_ready(self, timeout: float = 30, *, crash_expected: bool = False) -> bool:
        """Wait for "ready"; False if an injected crash (``crash_expected``) killed the daemon first."""
        deadline = time.monotonic() + timeout
        while b"ca-service ready" not in self.output:
            if crash_expected and self.proc.poll() == -signal.SIGKILL:
                return False
            assert self.proc.poll() is None, f"daemon exited ({self.proc.returncode}): {self.output.decode()[-3000:]}"
            assert time.monotonic() < deadline, f"daemon not ready in {timeout}s: {self.output.decode()[-3000:]}"
            time.sleep(0.02)
        found = re.search(rb"HTTP side-port listening url=(\S+)", self.output)
        assert found, self.output.decode()
        self.url = found[1].decode()
        return True

    def admin(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
        token = (self.data / "admin-token").read_text().strip()
        payload = json.dumps(body).encode() if body else None
        request = urllib.request.Request(self.url + path, method=method, data=payload,
                                         headers={"Authorization": f"Bearer {token}",
                                                  "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                return exc.code, json.loads(raw or b"{}")
            except ValueError:
                return exc.code, {"raw": raw.decode(errors="replace")}
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError):
            return 0, {}  # the daemon died mid-request: what an injected crash inside the commit does

    def rotate(self, scope: str) -> tuple[int, dict[str, Any]]:
        return self.admin("POST", "/admin/v1/rotate", {"scope": scope, "reason": "fault injection"})

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/healthz", timeout=5) as response:
                return response.status == 200
        except OSError:
            return False

    def kill(self) -> None:
        workers = children_of(self.proc.pid)
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self._reader.join(5)
        kill_all(workers)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()
        self._reader.join(5)
        return self.proc.returncode


def write_config(path: Path, **sections: Any) -> Path:
    path.write_text(json.dumps({**FAST, **sections}))  # JSON is YAML
    return path


def read_state(data: Path) -> AuthorityState:
    record = DirectoryStore(data / "state").read(AUTHORITY_RECORD)
    assert record is not None, "the committed state vanished"
    return decode_state(dict(record.data))


def check_consistent(data: Path, config: Path, last_revision: int) -> AuthorityState:
    """What a restarted daemon relies on: the record loads, every key matches its certificate, every
    intermediate chains to a root in the bundle, and the revision never went backwards."""
    settings = load_settings(config, environ={}, overrides={"data_dir": str(data)})
    state = read_state(data)
    assert state.trust_domain == settings.domain
    for entry in state.entries:
        if entry.key is not None:
            assert same_public_key(entry.key.public_key(), entry.cert.public_key()), f"{entry.kind} key/cert mismatch"
    now = dt.datetime.now(dt.UTC)
    for kind in (CAKind.INTERMEDIATE, CAKind.ISTIOD_INTERMEDIATE):
        for entry in state.of_kind(kind):
            verify_ca_chain(entry.cert, list(entry.chain_above), state.roots, now=now)
    assert state.revision >= last_revision, f"revision went backwards: {state.revision} < {last_revision}"
    return state
