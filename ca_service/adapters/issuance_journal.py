"""The issuance ledger on disk: JSON lines in ``<data_dir>/issued/``, across restarts and processes.

- The daemon appends one line per certificate to its own segment file, with one ``write`` each: a
  crash of the daemon loses nothing the kernel has, a line cut short by a crash of the machine (or a
  full disk) is skipped when read, and after a failed write the next record starts a new file rather
  than continue a broken line.  No fsync: the journal is an audit trail, not CA state.
- ``ca-service issue`` (another process) writes one file per certificate, atomically (temporary name,
  then rename); the daemon picks such files up when the ledger is listed.
- Files are named ``<issued_at ns>-<writer>-<unique>.jsonl``, so that names sort by time.  A file is
  deleted once every certificate in it has expired; a segment is closed after ``segment_records``.
- At start, the newest files are read until the ledger's capacity is reached; older ones stay on disk
  until they expire.

Everything here runs on the event loop: one small ``write`` per issuance, a directory scan per listing.
"""

from __future__ import annotations

import datetime as dt
import errno
import json
import logging
import os
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from json.encoder import encode_basestring_ascii as _escape
from pathlib import Path

from ca_service.services.issuance_ledger import IssuanceLedger, IssuanceRecord

log = logging.getLogger(__name__)

SUFFIX = ".jsonl"
DAEMON = "daemon"
CLI = "cli"
SEGMENT_RECORDS = 50_000
# A failed write is logged at most this often (a full disk fails every issuance).
ERROR_LOG_INTERVAL = dt.timedelta(minutes=1)


@dataclass
class _File:
    """What the journal knows of one file: the latest expiry in it (it is deleted after that)."""

    path: Path
    not_after: dt.datetime | None = None  # None: no record (yet); deleted like an expired file
    records: int = 0
    unreadable: bool = False  # never retried, never deleted by us: an operator should look at it

    def cover(self, entry: IssuanceRecord) -> None:
        self.records += 1
        if self.not_after is None or entry.not_after > self.not_after:
            self.not_after = entry.not_after


@dataclass
class _Segment:
    file: _File
    fd: int | None = None
    failed: bool = field(default=False)


def file_name(issued_at: dt.datetime, writer: str) -> str:
    ns = int(issued_at.timestamp() * 1_000_000) * 1000  # microseconds: what a datetime holds
    return f"{ns:020d}-{writer}-{secrets.token_hex(4)}{SUFFIX}"


# One line per record: what ``json.dumps(entry.to_json(), separators=(",", ":"))`` writes, byte for byte, with
# each string escaped by the function json.dumps itself uses for it (ASCII output, so a caller's node id
# cannot break the line).  Filled in directly, it takes 3 us where json.dumps took 7 us, and every SDS
# issuance writes one (the event loop's share of a forced re-issue of 5,000 nodes).
_LINE = ('{"serial":%s,"spiffe_id":%s,"caller":%s,"method":%s,"path":%s,"not_after":%s,"issuer":%s,'
         '"issued_at":%s}\n')


def encode(entry: IssuanceRecord) -> bytes:
    return (_LINE % (_escape(entry.serial), _escape(entry.spiffe_id), _escape(entry.caller), _escape(entry.method),
                     _escape(entry.path), _escape(entry.not_after.isoformat()), _escape(entry.issuer),
                     _escape(entry.issued_at.isoformat()))).encode()


def read_file(path: Path) -> tuple[list[IssuanceRecord], int]:
    """The records of one journal file, and how many lines were skipped (cut short or not a record).

    Raises:
        OSError: the file cannot be read.
    """
    records: list[IssuanceRecord] = []
    skipped = 0
    data = path.read_bytes()
    lines = data.split(b"\n")
    if lines and lines[-1]:
        skipped += 1  # a last line without its newline was cut short by a crash or a full disk
    for line in lines[:-1]:
        try:
            doc = json.loads(line)
            records.append(IssuanceRecord.from_json(doc))
        except (ValueError, TypeError, AttributeError):
            skipped += 1
    return records, skipped


def write_file(directory: Path, entries: Iterable[IssuanceRecord], *, writer: str = CLI) -> Path:
    """One finished file for another process's certificates (``ca-service issue``): written under a
    temporary name and renamed, so the daemon never reads half of it.

    Raises:
        OSError: the directory cannot be created or written.
    """
    entries = list(entries)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    final = directory / file_name(entries[0].issued_at, writer)
    tmp = directory / f".{final.name}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, b"".join(encode(e) for e in entries))
        os.fsync(fd)
    finally:
        os.close(fd)
    tmp.replace(final)
    return final


class IssuanceJournal:
    """The daemon's side (the ledger's :class:`~ca_service.services.issuance_ledger.Journal`)."""

    def __init__(self, directory: Path, *, segment_records: int = SEGMENT_RECORDS,
                 on_error: Callable[[], None] | None = None) -> None:
        self.directory = directory
        self.errors = 0
        self._segment_records = segment_records
        self._on_error = on_error
        self._files: dict[str, _File] = {}  # every file this journal has read or written, by name
        self._segment: _Segment | None = None
        self._last_error_log: dt.datetime | None = None

    def load(self, ledger: IssuanceLedger, now: dt.datetime) -> int:
        """Fill ``ledger`` with the live records on disk (newest files first, up to its capacity), and
        delete files whose certificates have all expired.  Returns how many records were restored."""
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            self._failed("cannot create the issuance journal directory", exc, now)
            return 0
        batches: list[list[IssuanceRecord]] = []
        wanted = ledger.capacity
        for name in sorted(self._names(), reverse=True):
            records = self._read(name, now)
            live = [r for r in records if r.not_after > now]
            if live and wanted > 0:
                batches.append(live)
                wanted -= len(live)
        restored = 0
        for batch in reversed(batches):
            for entry in batch:
                ledger.restore(entry)
                restored += 1
        self._delete_expired(now)
        return restored

    def append(self, entry: IssuanceRecord) -> None:
        segment = self._segment
        try:
            if segment is None or segment.fd is None or segment.file.records >= self._segment_records:
                segment = self._open(entry.issued_at)
            line = encode(entry)
            if os.write(segment.fd, line) != len(line):  # type: ignore[arg-type]
                raise OSError(errno.ENOSPC, "short write")  # a full disk may take part of a line
        except OSError as exc:
            self._close()  # a write cut short must not run into the next record's line
            self._failed("cannot append to the issuance journal", exc, entry.issued_at)
            return
        segment.file.cover(entry)

    def others(self, now: dt.datetime) -> list[IssuanceRecord]:
        """Records of files that appeared since the last call (``ca-service issue``, never our own)."""
        found: list[IssuanceRecord] = []
        try:
            names = self._names()
        except OSError as exc:
            self._failed("cannot list the issuance journal", exc, now)
            return found
        for name in sorted(names - self._files.keys()):
            found.extend(r for r in self._read(name, now) if r.not_after > now)
        self._delete_expired(now)
        return found

    def close(self) -> None:
        self._close()

    def _names(self) -> set[str]:
        return {entry.name for entry in os.scandir(self.directory)
                if entry.name.endswith(SUFFIX) and not entry.name.startswith(".")}

    def _read(self, name: str, now: dt.datetime) -> list[IssuanceRecord]:
        known = self._files[name] = _File(self.directory / name)
        try:
            records, skipped = read_file(known.path)
        except OSError as exc:
            self._failed(f"cannot read issuance journal file {name}", exc, now)
            known.unreadable = True
            return []
        if skipped:
            log.warning("issuance journal file has unreadable lines", extra={"file": name, "skipped": skipped})
        for entry in records:
            known.cover(entry)
        return records

    def _open(self, issued_at: dt.datetime) -> _Segment:
        self._close()
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self.directory / file_name(issued_at, DAEMON)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_EXCL, 0o600)
        self._files[path.name] = known = _File(path)
        self._segment = _Segment(known, fd)
        self._delete_expired(issued_at)
        return self._segment

    def _close(self) -> None:
        if self._segment is not None and self._segment.fd is not None:
            try:
                os.close(self._segment.fd)
            finally:
                self._segment.fd = None

    def _delete_expired(self, now: dt.datetime) -> None:
        current = self._segment.file.path.name if self._segment is not None else None
        for name, known in list(self._files.items()):
            if name == current or known.unreadable or (known.not_after is not None and known.not_after > now):
                continue
            try:
                known.path.unlink(missing_ok=True)
            except OSError as exc:
                self._failed(f"cannot delete expired issuance journal file {name}", exc, now)
                continue
            # Forgotten only once gone: a name still listed would be read again as new.
            del self._files[name]

    def _failed(self, what: str, exc: OSError, now: dt.datetime) -> None:
        self.errors += 1
        if self._on_error is not None:
            self._on_error()
        if self._last_error_log is None or now - self._last_error_log >= ERROR_LOG_INTERVAL:
            self._last_error_log = now
            log.error(what, extra={"directory": str(self.directory), "error": exc.strerror or type(exc).__name__,
                                   "errors_so_far": self.errors})
