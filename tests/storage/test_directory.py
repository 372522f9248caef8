"""The directory store: compare-and-swap, file modes, refusal of unsafe or corrupt records, failed writes."""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import threading
from pathlib import Path

import pytest

from ca_service.config import Settings
from ca_service.errors import ConflictError, StorageError
from ca_service.services.authority import Authority
from ca_service.storage.base import AUTHORITY_RECORD
from ca_service.storage.directory import DirectoryStore


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_first_write_needs_expected_version_none(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path / "s")
    record = store.write("authority", {"a": b"1"}, expected_version=None)
    assert store.read("authority") == record
    with pytest.raises(ConflictError, match="expected None"):
        store.write("authority", {"a": b"2"}, expected_version=None)


def test_a_stale_version_loses_and_leaves_the_record_unchanged(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path / "s")
    v1 = store.write("authority", {"a": b"1"}, expected_version=None)
    v2 = store.write("authority", {"a": b"2"}, expected_version=v1.version)
    with pytest.raises(ConflictError):
        store.write("authority", {"a": b"3"}, expected_version=v1.version)
    current = store.read("authority")
    assert current is not None and current.data == {"a": b"2"} and current.version == v2.version


def test_two_store_instances_on_one_directory_cannot_both_win(tmp_path: Path) -> None:
    a, b = DirectoryStore(tmp_path / "s"), DirectoryStore(tmp_path / "s")
    base = a.write("authority", {"x": b"0"}, expected_version=None)
    a.write("authority", {"x": b"a"}, expected_version=base.version)
    with pytest.raises(ConflictError):
        b.write("authority", {"x": b"b"}, expected_version=base.version)


def test_missing_record_reads_as_none(tmp_path: Path) -> None:
    assert DirectoryStore(tmp_path / "s").read("authority") is None


def test_directory_is_0700_and_records_are_0600(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path / "s")
    store.write("authority", {"a": b"1"}, expected_version=None)
    assert _mode(tmp_path / "s") == 0o700
    assert _mode(tmp_path / "s" / "authority.json") == 0o600


def test_a_too_open_directory_is_tightened(tmp_path: Path) -> None:
    (tmp_path / "s").mkdir(mode=0o755)
    (tmp_path / "s").chmod(0o755)
    DirectoryStore(tmp_path / "s")
    assert _mode(tmp_path / "s") == 0o700


def test_a_record_readable_by_others_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path / "s")
    store.write("authority", {"a": b"1"}, expected_version=None)
    path = tmp_path / "s" / "authority.json"
    path.chmod(0o644)
    with pytest.raises(StorageError, match=r"refusing to load .*0644.*chmod 600"):
        store.read("authority")


@pytest.mark.parametrize("content", [b"{not json", b'{"version": "1"}', b'{"version": "1", "data": {"a": "!!"}}', b""],
                         ids=["not json", "no data", "bad base64", "empty"])
def test_a_corrupt_record_is_a_storage_error(tmp_path: Path, content: bytes) -> None:
    store = DirectoryStore(tmp_path / "s")
    path = tmp_path / "s" / "authority.json"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(StorageError, match="corrupt"):
        store.read("authority")


def test_a_corrupt_state_document_is_a_storage_error(authority: Authority, settings: Settings) -> None:
    store = DirectoryStore(settings.data_dir / "state")
    record = store.read(AUTHORITY_RECORD)
    assert record is not None
    store.write(AUTHORITY_RECORD, {"state.json": b'{"format": 1}'}, expected_version=record.version)
    with pytest.raises(StorageError, match="malformed"):
        authority.load()


def test_a_symlinked_record_is_not_followed(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path / "s")
    target = tmp_path / "elsewhere.json"
    target.write_bytes(b"{}")
    (tmp_path / "s" / "authority.json").symlink_to(target)
    with pytest.raises(StorageError, match="cannot open"):
        store.read("authority")


def test_bad_record_names_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="record name"):
        DirectoryStore(tmp_path / "s").read("../etc/passwd")


def test_a_full_disk_keeps_the_previous_state_and_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = DirectoryStore(tmp_path / "s")
    v1 = store.write("authority", {"a": b"old"}, expected_version=None)

    def full(fd: int, data: object) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(StorageError, match=r"disk full.*previous state is unchanged"):
        store.write("authority", {"a": b"new" * 1000}, expected_version=v1.version)
    monkeypatch.undo()
    assert store.read("authority") == v1
    assert not list((tmp_path / "s").glob(".tmp-*")), "the failed write left its temp file behind"
    # The store still works once space is back.
    assert store.write("authority", {"a": b"new"}, expected_version=v1.version).version != v1.version


def test_a_failed_fsync_keeps_the_previous_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = DirectoryStore(tmp_path / "s")
    v1 = store.write("authority", {"a": b"old"}, expected_version=None)

    def broken(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fsync", broken)
    with pytest.raises(StorageError, match="previous state is unchanged"):
        store.write("authority", {"a": b"new"}, expected_version=v1.version)
    monkeypatch.undo()
    assert store.read("authority") == v1


def test_a_failed_commit_leaves_the_authority_on_its_previous_state(
    authority: Authority, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = authority.state

    def full(fd: int, data: object) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(StorageError, match="disk full"):
        authority.commit(before.replace(extra={"x": "y"}))
    monkeypatch.undo()
    assert authority.state is before
    assert authority.load() is not None and authority.state.revision == before.revision


def test_stale_temp_files_are_removed_on_open_and_never_read(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path / "s")
    v1 = store.write("authority", {"a": b"committed"}, expected_version=None)
    stale = tmp_path / "s" / ".tmp-authority.json.99999"
    stale.write_bytes(b'{"version": "7", "data": {"a": "dG9ybg=="}}')
    assert store.read("authority") == v1
    DirectoryStore(tmp_path / "s")
    assert not stale.exists()


def test_opening_a_store_never_deletes_a_temp_file_of_a_writer_that_holds_the_lock(tmp_path: Path) -> None:
    """A reader opening the store next to a running writer must not break the writer's rename."""
    writer = DirectoryStore(tmp_path / "s")
    live_tmp = tmp_path / "s" / ".tmp-authority.json.12345"
    live_tmp.write_bytes(b"half written")
    fd = os.open(tmp_path / "s" / ".lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # the writer is mid-write
    try:
        opened = threading.Event()
        threading.Thread(target=lambda: (DirectoryStore(tmp_path / "s"), opened.set()), daemon=True).start()
        assert not opened.wait(0.3), "the store opened (and could clean up) while a writer held the lock"
        assert live_tmp.exists()
    finally:
        os.close(fd)
    assert opened.wait(5)
    assert not live_tmp.exists(), "once the writer is gone, its leftover is stale and removed"
    assert writer.read("authority") is None
