"""The real daemon as an SDS fan-out target — a DRAFT for after the SDS server (issue 3) is merged.

Not exercised on the ``bench`` branch (there is no SDS server here); ``sds_fanout.start_daemon_target``
uses it only when ``ca_service.rpc.sds_server`` exists.  It runs ``python -m ca_service serve`` on port-0
listeners with JSON logs, reads the bound SDS address and side-port URL from the log, and triggers
pushes through the admin API with the generated admin token:

* ``change_bundle``: ``POST /admin/v1/rotate {"scope": "root"}`` (the first phase publishes A+B);
* ``reissue_all``: ``POST /admin/v1/rotate {"scope": "all-workloads"}`` with ``reissue_window`` 0 so the
  whole fleet is re-issued at once (the default 30 s window would spread it on purpose).
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


class DaemonTarget:
    def __init__(self, timeout: float = 30.0) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="ca-bench-sds-")
        data_dir = Path(self._tmp.name) / "data"
        env = {**_env(), "CA_SERVICE_ROTATION__REISSUE_WINDOW": "0s"}
        argv = [sys.executable, "-m", "ca_service", "--data-dir", str(data_dir), "serve", "--grpc-address",
                "127.0.0.1:0", "--http-address", "127.0.0.1:0", "--bundle-address", "127.0.0.1:0"]
        self._proc = subprocess.Popen(argv, env=env, cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                      text=True)
        self.pid = self._proc.pid
        lines: queue.Queue[dict[str, object]] = queue.Queue()
        threading.Thread(target=self._read, args=(lines,), daemon=True).start()
        self.address, self._url = "", ""
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
                lines.put(json.loads(raw))
            except ValueError:
                continue

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
