"""A full disk and a read-only filesystem under the real daemon's state directory (a real tmpfs, mounted by
the test): a rotation that cannot be written fails with a clear error, the previous state stays current
and on disk, the daemon keeps serving, and the same rotation succeeds once the fault is gone.
(issue 15, "Fault injection": disk full and EROFS)"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.daemon import Daemon, check_consistent, read_state, write_config


def _mount(*args: str) -> None:
    proc = subprocess.run(["mount", *args], capture_output=True, text=True, check=False)
    # Not a skip: the suite runs as root on these machines (scripts/setup installs as root too).
    assert proc.returncode == 0, f"mount {' '.join(args)} failed (the fault tests need root): {proc.stderr}"


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs for the daemon's state directory (``<data>/state``); yields the data directory.

    Only the state gets the fault: the audit log stays writable (the daemon holds it open for append,
    which would also keep a remount read-only from succeeding).
    """
    mountpoint = tmp_path / "data" / "state"
    mountpoint.mkdir(parents=True)
    _mount("-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(mountpoint))
    try:
        yield mountpoint.parent
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True, check=False)


def _fill(directory: Path) -> Path:
    filler = directory / "filler"
    with filler.open("wb") as handle, contextlib.suppress(OSError):
        while True:
            handle.write(b"\0" * 65536)
            handle.flush()
    with pytest.raises(OSError) as full:
        (directory / "probe").write_bytes(b"\0" * 65536)
    assert full.value.errno == errno.ENOSPC
    return filler


@pytest.fixture
def daemon(small_fs: Path, tmp_path: Path) -> Iterator[Daemon]:
    config = write_config(tmp_path / "config.yaml")
    running = Daemon(small_fs, config)
    try:
        running.wait_ready()
        yield running
    finally:
        running.stop()


def _assert_refused_and_unchanged(daemon: Daemon, config: Path, revision: int) -> None:
    status, body = daemon.rotate("intermediate")
    # A server-side failure (5xx, never a client error), explained: the operator must learn what broke.
    assert status in (500, 503), f"a rotation that cannot be persisted was answered {status}: {body}"
    assert "previous state is unchanged" in body.get("error", ""), body
    assert read_state(daemon.data).revision == revision, "the state on disk changed"
    assert daemon.healthy(), "the daemon stopped serving"
    status, doc = daemon.admin("GET", "/admin/v1/status")
    assert status == 200 and doc["revision"] == revision, "the daemon's current state is not the persisted one"
    check_consistent(daemon.data, config, revision)


def test_a_full_disk_refuses_the_rotation_keeps_the_state_and_recovers(daemon: Daemon, tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    revision = read_state(daemon.data).revision
    filler = _fill(daemon.data / "state")
    _assert_refused_and_unchanged(daemon, config, revision)
    filler.unlink()
    status, body = daemon.rotate("intermediate")
    assert status == 200, body
    assert read_state(daemon.data).revision == revision + 1
    assert not list((daemon.data / "state").glob(".tmp-*")), "the failed write left its temp file"


def test_a_read_only_filesystem_refuses_the_rotation_keeps_the_state_and_recovers(
        daemon: Daemon, tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    revision = read_state(daemon.data).revision
    state_dir = daemon.data / "state"
    _mount("-o", "remount,ro", str(state_dir))
    try:
        with pytest.raises(OSError) as readonly:
            (state_dir / "probe").write_bytes(b"x")
        assert readonly.value.errno == errno.EROFS
        _assert_refused_and_unchanged(daemon, config, revision)
    finally:
        _mount("-o", "remount,rw", str(state_dir))
    status, body = daemon.rotate("intermediate")
    assert status == 200, body
    assert read_state(daemon.data).revision == revision + 1
    assert os.access(daemon.data / "state" / "authority.json", os.R_OK)
