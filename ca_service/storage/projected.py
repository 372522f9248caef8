"""Publishing a set of files atomically, the way kubelet projects Secrets and ConfigMaps.

Layout: ``DIR/..<stamp>/`` holds one version of every file; ``DIR/..data`` is a symlink to the
current version; ``DIR/<name>`` is a symlink to ``..data/<name>``.  A new version is written and
fsynced in full, then ``..data`` is switched with one rename, so a reader (istiod's file watcher,
Envoy's watched directory) sees the old set or the new set, never a mix.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

from ca_service.errors import StorageError

DATA_LINK = "..data"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_projected(directory: Path, files: Mapping[str, bytes], *, modes: Mapping[str, int] | None = None,
                    now: dt.datetime | None = None) -> Path:
    """Atomically replace the set of files in ``directory``; returns the new version directory.

    Names must be plain file names.  Previous versions are removed after the switch.  Files default
    to mode 0644; pass ``modes`` (e.g. 0600 for a key) to tighten.

    Raises:
        StorageError: if anything fails before the switch; the previous set stays in place.
    """
    for name in files:
        if "/" in name or name.startswith(".."):
            raise ValueError(f"file name {name!r} is not a plain name")
    stamp = (now or dt.datetime.now(dt.UTC)).strftime("%Y_%m_%d_%H_%M_%S.%f")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        version = directory / f"..{stamp}.{os.getpid()}"
        version.mkdir(mode=0o755)
        for name, data in files.items():
            mode = (modes or {}).get(name, 0o644)
            fd = os.open(version / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(version)
        tmp_link = directory / f"{DATA_LINK}_tmp"
        with contextlib.suppress(FileNotFoundError):
            tmp_link.unlink()
        tmp_link.symlink_to(version.name)
        old_target = os.readlink(directory / DATA_LINK) if (directory / DATA_LINK).is_symlink() else None
        os.rename(tmp_link, directory / DATA_LINK)
        for name in files:
            link = directory / name
            if not link.is_symlink():
                with contextlib.suppress(FileNotFoundError):
                    link.unlink()  # a plain file from an older, non-projected writer
                link.symlink_to(f"{DATA_LINK}/{name}")
        _fsync_dir(directory)
    except OSError as exc:
        raise StorageError(f"cannot publish files to {directory}: {exc}") from None
    if old_target and old_target != version.name:
        shutil.rmtree(directory / old_target, ignore_errors=True)
    return version


def read_projected(directory: Path) -> dict[str, bytes]:
    """The current set, read through ``..data`` (empty if nothing was published yet)."""
    data = directory / DATA_LINK
    if not data.exists():
        return {}
    return {p.name: p.read_bytes() for p in sorted(data.iterdir()) if p.is_file()}
