"""The real daemon as the SDS fan-out target.

It runs ``python -m ca_service serve`` on port-0 listeners with JSON logs, reads the bound SDS address and
side-port URL from the log, and triggers pushes through the admin API with the generated admin token:

* ``change_bundle``: ``POST /admin/v1/rotate {"scope": "root"}`` (the first phase publishes A+B);
* ``reissue_all``: ``POST /admin/v1/rotate {"scope": "all-workloads"}`` with ``reissue_window`` 0 so the
  whole fleet is re-issued at once (the default 30 s window would spread it on purpose).  The daemon's
  default signing pool signs it; :meth:`DaemonTarget.pool_signed` counts what the pool signed, from the
  daemon's "workload certificates re-issued" log lines.
"""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from bench.common import ROOT
from bench.startup import _env

SDS_LINE = "SDS listening"
SIDE_PORT_LINE = "HTTP side-port listening"
POOL_BATCH_LINE = "workload certificates re-issued"


class DaemonTarget:
    def __init__(self, timeout: float = 30.0, *, signing_workers: int | None = None) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="ca-bench-sds-")
        data_dir = Path(self._tmp.name) / "data"
        # Admission of new streams is not what this bench measures (bench/sds_connect_storm.py does): let the
        # 10k streams in as fast as they come, so the push figures are comparable with the stub's.
        env = {**_env(), "CA_SERVICE_ROTATION__REISSUE_WINDOW": "0s", "CA_SERVICE_SDS__ADMISSION_RATE": "1000000",
               "CA_SERVICE_SDS__ADMISSION_BURST": "1000000"}
        if signing_workers is not None:
            env["CA_SERVICE_CA__SIGNING_WORKERS"] = str(signing_workers)
        argv = [sys.executable, "-m", "ca_service", "--data-dir", str(data_dir), "serve", "--grpc-address",
                "127.0.0.1:0", "--http-address", "127.0.0.1:0", "--bundle-address", "127.0.0.1:0"]
        self._proc = subprocess.Popen(argv, env=env, cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                      text=True)
        self.pid = self._proc.pid
        lines: queue.Queue[dict[str, object]] = queue.Queue()
        self.address, self._url, self._pool_signed = "", "", 0
        threading.Thread(target=self._read, args=(lines,), daemon=True).start()
        deadline = time.monotonic() + timeout
        while not (self.address and self._url):
            doc = lines.get(timeout=max(0.01, deadline - time.monotonic()))
            if doc.get("msg") == SDS_LINE:
                self.address = str(doc["address"])
            elif doc.get("msg") == SIDE_PORT_LINE:
                self._url = str(doc["url"]).rstrip("/")
        self._token = (data_dir / "admin-token").read_text().strip()

    def _read(self, lines: queue.Queue[dict[str, object]]) -> None:
        assert self._proc.stderr is not None
        for raw in self._proc.stderr:  # keep draining, or the daemon blocks on a full pipe
            try:
                doc = json.loads(raw)
            except ValueError:
                continue
            if doc.get("msg") == POOL_BATCH_LINE:
                self._pool_signed += int(doc.get("count", 0))
            elif not (self.address and self._url):
                lines.put(doc)

    def pool_signed(self) -> int:
        """SVIDs the daemon's signing pool has signed so far (batches it logged)."""
        time.sleep(0.2)  # the log line follows the batch; let the reader catch up
        return self._pool_signed

    def _rotate(self, scope: str) -> None:
        body = json.dumps({"scope": scope, "reason": "bench: SDS fan-out"}).encode()
        request = urllib.request.Request(f"{self._url}/admin/v1/rotate", data=body, method="POST", headers={
            "Authorization": f"Bearer {self._token}", "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            response.read()

    def change_bundle(self) -> None:
        self._rotate("root")

    def reissue_all(self) -> None:
        self._rotate("all-workloads")

    def close(self) -> None:
        self._proc.send_signal(signal.SIGTERM)
        try:
            self._proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._tmp.cleanup()
