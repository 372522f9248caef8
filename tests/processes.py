"""Process-tree helpers for tests that kill a daemon: find its children, and make sure none outlive the test."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import time
from pathlib import Path


def children_of(pid: int) -> set[int]:
    """PIDs whose parent is ``pid`` (read from /proc; Linux only, as the daemon is)."""
    out = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
            fields = stat.read_text().rpartition(")")[2].split()
            if int(fields[1]) == pid:
                out.add(int(stat.parent.name))
    return out


def alive(pids: set[int]) -> set[int]:
    """The subset of ``pids`` still running (zombies count as gone: they hold no memory)."""
    out = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
            if state != "Z":
                out.add(pid)
    return out


def wait_gone(pids: set[int], timeout: float) -> set[int]:
    """Wait up to ``timeout`` seconds for ``pids`` to exit; returns the ones still alive."""
    deadline = time.monotonic() + timeout
    while (left := alive(pids)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def kill_all(pids: set[int]) -> None:
    """Clean-up after a failed test: no process may outlive it."""
    for pid in alive(pids):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def stop(proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """SIGTERM a daemon and wait for it (draining a piped output); SIGKILL it past ``timeout``."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def is_spawned_worker(pid: int) -> bool:
    """A ``multiprocessing`` spawn child (a pool worker), not its resource tracker or anything else."""
    try:
        return b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def read_until(proc: subprocess.Popen[bytes], marker: bytes, timeout: float = 30) -> bytes:
    """Read a daemon's combined output until ``marker`` appears; fails with the output so far on a timeout
    or an early exit (a test then says why the daemon did not come up)."""
    assert proc.stdout is not None
    seen = b""
    deadline = time.monotonic() + timeout
    while marker not in seen:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no {marker.decode()!r} within {timeout}s: {seen.decode(errors='replace')}"
        ready, _, _ = select.select([proc.stdout], [], [], remaining)
        chunk = os.read(proc.stdout.fileno(), 65536) if ready else b""
        assert chunk or proc.poll() is None, f"exited early ({proc.returncode}): {seen.decode(errors='replace')}"
        seen += chunk
    return seen
