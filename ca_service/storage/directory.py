"""Local directory store: one file per record, written atomically, keys never readable by others.

Write path: temp file in the same directory (0600) → write → fsync → rename over the record →
fsync the directory.  rename(2) is atomic on POSIX, and the two fsyncs make the new content and the
new directory entry durable in that order, so a crash (kill -9, power loss) leaves the old or the new
record, never a torn one.  Compare-and-swap across processes holds an exclusive flock on ``.lock``
while it reads the current version and writes.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import stat
from collections.abc import Iterator, Mapping
from pathlib import Path

from ca_service.errors import ConflictError, StorageError
from ca_service.storage.base import Record

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{0,99}$")
_SUFFIX = ".json"
_TMP_PREFIX = ".tmp-"


def _check_name(name: str) -> None:
    if not _NAME.match(name):
        raise ValueError(f"record name {name!r} must match {_NAME.pattern}")


class DirectoryStore:
    """Records as ``<dir>/<name>.json``; the directory is 0700 and every record 0600."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create state directory {self.directory}: {exc.strerror}") from None
        try:
            self._check_directory_mode()
            self._remove_stale_temp_files()
        except OSError as exc:
            # A group/other-readable directory we may not chmod (another owner, a read-only mount).
            raise StorageError(f"state directory {self.directory} is not usable: {exc.strerror}; it must be a "
                               "directory of the daemon's user with mode 0700") from None

    def describe(self) -> str:
        return f"directory {self.directory.resolve()}"

    def _check_directory_mode(self) -> None:
        mode = stat.S_IMODE(self.directory.stat().st_mode)
        if mode & 0o077:
            # Fix rather than refuse: the directory may have been created by a umask-less tool; the
            # record files themselves are checked strictly on load.
            log.warning("state directory %s had mode %o; setting 0700", self.directory, mode)
            self.directory.chmod(0o700)

    def _remove_stale_temp_files(self) -> None:
        # Leftovers of a write that crashed before its rename: never the committed record.  Writers
        # create temp files only while holding the lock, so under the lock every temp file is stale;
        # without it a reader (``ca-service status`` next to a running daemon) would delete a live
        # writer's file mid-write.
        try:
            with self._locked():
                for tmp in self.directory.glob(_TMP_PREFIX + "*"):
                    with contextlib.suppress(OSError):
                        tmp.unlink()
        except StorageError:
            # A read-only state directory can still be read (``status``, a daemon serving what it has);
            # nobody can have left a temp file there since it became read-only, and writes fail clearly.
            log.warning("state directory %s is not writable; serving the stored state read-only", self.directory)

    def _path(self, name: str) -> Path:
        _check_name(name)
        return self.directory / (name + _SUFFIX)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            fd = os.open(self.directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            # A read-only or full filesystem fails here, before anything was written.
            raise StorageError(f"cannot lock {self.directory} for writing: {exc.strerror}; "
                               "the previous state is unchanged") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def read(self, name: str) -> Record | None:
        path = self._path(name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageError(f"cannot open {path}: {exc.strerror}") from None
        with os.fdopen(fd, "rb") as handle:
            mode = stat.S_IMODE(os.fstat(handle.fileno()).st_mode)
            if mode & 0o077:
                raise StorageError(
                    f"refusing to load {path}: mode {mode:04o} lets others read CA keys; run chmod 600 {path}"
                )
            raw = handle.read()
        return _decode(name, path, raw)

    def write(self, name: str, data: Mapping[str, bytes], *, expected_version: str | None) -> Record:
        path = self._path(name)
        with self._locked():
            current = self.read(name)
            current_version = current.version if current else None
            if current_version != expected_version:
                raise ConflictError(
                    f"record {name!r} is at version {current_version}, expected {expected_version}"
                )
            version = str(int(current_version or "0") + 1)
            payload = _encode(version, data)
            self._atomic_write(path, payload)
        return Record(name, dict(data), version)

    def _atomic_write(self, path: Path, payload: bytes) -> None:
        tmp = self.directory / f"{_TMP_PREFIX}{path.name}.{os.getpid()}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            try:
                view = memoryview(payload)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, path)
            dir_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            hint = " (disk full)" if exc.errno == errno.ENOSPC else ""
            raise StorageError(f"cannot write {path}{hint}: {exc.strerror}; the previous state is unchanged") from None


def _encode(version: str, data: Mapping[str, bytes]) -> bytes:
    body = {"version": version, "data": {k: base64.b64encode(v).decode() for k, v in sorted(data.items())}}
    return json.dumps(body, indent=1).encode()


def _decode(name: str, path: Path, raw: bytes) -> Record:
    try:
        body = json.loads(raw)
        data = {k: base64.b64decode(v, validate=True) for k, v in body["data"].items()}
        version = body["version"]
        # The next write computes version + 1: anything but a plain counter would fail there instead.
        if not isinstance(version, str) or not version.isdigit() or not version.isascii():
            raise ValueError(f"version {version!r} is not a counter")
    except (ValueError, KeyError, TypeError, AttributeError, binascii.Error) as exc:
        # Cannot happen through our writer (rename is atomic); means the file was edited or the disk lies.
        raise StorageError(f"{path} is corrupt ({exc}); restore it from backup") from None
    return Record(name, data, version)
