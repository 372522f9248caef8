"""The issuance ledger's journal on real files: restarts, another process's certificates, torn lines, expiry,
capacity, permissions, and a full disk (a real tmpfs)."""

from __future__ import annotations

import datetime as dt
import json
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from ca_service.adapters.issuance_journal import IssuanceJournal, encode, read_file, write_file
from ca_service.services.issuance_ledger import IssuanceLedger, IssuanceRecord

T0 = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)


def _record(n: int, *, at: dt.datetime = T0, ttl: dt.timedelta = dt.timedelta(hours=1),
            path: str = "sds") -> IssuanceRecord:
    return IssuanceRecord(serial=f"{n:x}", spiffe_id=f"spiffe://cluster.local/ns/ns{n % 3}/sa/sa{n}",
                          caller=f"node-{n}", method="sds", path=path, not_after=at + ttl, issuer="k1",
                          issued_at=at)


def _restart(directory: Path, capacity: int = 1000, now: dt.datetime = T0) -> tuple[IssuanceJournal, IssuanceLedger]:
    journal = IssuanceJournal(directory)
    ledger = IssuanceLedger(capacity, journal)
    journal.load(ledger, now)
    return journal, ledger


def _serials(ledger: IssuanceLedger, now: dt.datetime = T0) -> list[str]:
    return [r.serial for r in ledger.live(now)]


def test_records_survive_a_restart_and_expired_ones_do_not_come_back(tmp_path: Path) -> None:
    journal, ledger = _restart(tmp_path / "issued")
    for n in range(5):
        ledger.record(_record(n, ttl=dt.timedelta(minutes=10 * (n + 1))))
    journal.close()
    _, again = _restart(tmp_path / "issued", now=T0 + dt.timedelta(minutes=25))
    assert _serials(again, T0 + dt.timedelta(minutes=25)) == ["2", "3", "4"]
    assert again.live(T0).__next__().to_json() == _record(2, ttl=dt.timedelta(minutes=30)).to_json()


def test_a_certificate_of_another_process_is_listed_once(tmp_path: Path) -> None:
    journal, ledger = _restart(tmp_path / "issued")
    ledger.record(_record(1))
    write_file(tmp_path / "issued", [_record(99, path="cli")])
    assert _serials(ledger) == ["1", "63"]
    assert _serials(ledger) == ["1", "63"]  # read once, not again at every listing
    journal.close()
    _, again = _restart(tmp_path / "issued")
    assert sorted(_serials(again)) == ["1", "63"]
    assert {r.path for r in again.live(T0)} == {"sds", "cli"}


def test_a_torn_last_line_and_garbage_lines_are_skipped_and_the_rest_is_kept(tmp_path: Path) -> None:
    journal, ledger = _restart(tmp_path / "issued")
    for n in range(3):
        ledger.record(_record(n))
    journal.close()
    (segment,) = (tmp_path / "issued").iterdir()
    data = segment.read_bytes()
    segment.write_bytes(b'{"not": "a record"}\n' + b"\xff\xfe garbage\n" + data[:-7])  # the last line torn
    records, skipped = read_file(segment)
    assert [r.serial for r in records] == ["0", "1"]
    assert skipped == 3
    _, again = _restart(tmp_path / "issued")
    assert _serials(again) == ["0", "1"]


def test_files_are_deleted_once_every_certificate_in_them_has_expired(tmp_path: Path) -> None:
    directory = tmp_path / "issued"
    journal = IssuanceJournal(directory, segment_records=2)
    ledger = IssuanceLedger(1000, journal)
    journal.load(ledger, T0)
    for n in range(6):  # three segments: minutes 10/20, 30/40, 50/60
        ledger.record(_record(n, ttl=dt.timedelta(minutes=10 * (n + 1))))
    cli = write_file(directory, [_record(50, ttl=dt.timedelta(minutes=45), path="cli")])
    assert len(list(directory.iterdir())) == 4
    journal.close()
    journal, _ = _restart(directory, now=T0 + dt.timedelta(minutes=41))
    left = sorted(p.name for p in directory.iterdir())
    assert len(left) == 2 and cli.name in left  # the 10/20 and 30/40 segments are gone
    journal.others(T0 + dt.timedelta(minutes=46))
    assert cli.exists() is False
    assert len(list(directory.iterdir())) == 1


def test_a_restart_restores_the_newest_records_up_to_the_capacity(tmp_path: Path) -> None:
    directory = tmp_path / "issued"
    journal = IssuanceJournal(directory, segment_records=2)
    ledger = IssuanceLedger(1000, journal)
    for n in range(10):
        ledger.record(_record(n, at=T0 + dt.timedelta(seconds=n)))
    journal.close()
    _, small = _restart(directory, capacity=3, now=T0 + dt.timedelta(seconds=10))
    assert _serials(small, T0 + dt.timedelta(seconds=10)) == ["7", "8", "9"]


def test_journal_files_are_private(tmp_path: Path) -> None:
    journal, ledger = _restart(tmp_path / "issued")
    ledger.record(_record(1))
    written = write_file(tmp_path / "issued", [_record(2, path="cli")])
    assert stat.S_IMODE((tmp_path / "issued").stat().st_mode) == 0o700
    assert {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "issued").iterdir()} == {0o600}
    assert json.loads(written.read_text())["serial"] == "2"
    journal.close()


def test_a_record_is_refused_by_from_json_unless_complete_and_aware() -> None:
    good = _record(1).to_json()
    assert IssuanceRecord.from_json(good) == _record(1)
    for broken in ({**good, "serial": 5}, {k: v for k, v in good.items() if k != "issuer"},
                   {**good, "not_after": "2030-01-01T01:00:00"}, {**good, "issued_at": "yesterday"}):
        with pytest.raises(ValueError):
            IssuanceRecord.from_json(broken)


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    mountpoint = tmp_path / "issued"
    mountpoint.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(mountpoint)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"mount failed (the fault tests need root): {proc.stderr}"
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True, check=False)


def test_a_full_disk_loses_no_record_from_memory_and_the_journal_resumes_in_a_clean_file(tiny_fs: Path) -> None:
    errors: list[int] = []
    journal = IssuanceJournal(tiny_fs, on_error=lambda: errors.append(1))
    ledger = IssuanceLedger(100_000, journal)
    n = 0
    while not errors:  # fill the 64 KiB tmpfs with records
        ledger.record(_record(n))
        n += 1
    for m in range(n, n + 50):  # every further record fails on disk, none in memory
        ledger.record(_record(m))
    assert len(ledger) == n + 50
    assert journal.errors >= 51
    for path in tiny_fs.iterdir():
        os.remove(path)  # the operator frees space
    ledger.record(_record(10_000))
    journal.close()
    (fresh,) = tiny_fs.iterdir()
    records, skipped = read_file(fresh)
    assert [r.serial for r in records] == [f"{10_000:x}"] and skipped == 0


_ANY_TEXT = st.text(st.characters(codec=None, exclude_categories=()), max_size=40)  # lone surrogates included
_INSTANTS = st.datetimes(timezones=st.sampled_from([dt.UTC, dt.timezone(dt.timedelta(hours=-7, minutes=-30))]))


@given(serial=_ANY_TEXT, spiffe_id=_ANY_TEXT, caller=_ANY_TEXT, method=_ANY_TEXT, path=_ANY_TEXT, issuer=_ANY_TEXT,
       not_after=_INSTANTS, issued_at=_INSTANTS)
@example(serial="1", spiffe_id="spiffe://td/\u2028", caller='a"b\\c\nd\x00\ud800', method="sds", path="sds",
         issuer="k", not_after=T0, issued_at=T0)
def test_a_journal_line_is_what_json_dumps_writes_and_reads_back_as_the_record(
        serial: str, spiffe_id: str, caller: str, method: str, path: str, issuer: str, not_after: dt.datetime,
        issued_at: dt.datetime) -> None:
    """The line is filled in by hand for speed: it must stay json.dumps's own line, one line, read back whole."""
    entry = IssuanceRecord(serial=serial, spiffe_id=spiffe_id, caller=caller, method=method, path=path,
                           not_after=not_after, issuer=issuer, issued_at=issued_at)
    line = encode(entry)
    assert line == json.dumps(entry.to_json(), separators=(",", ":")).encode() + b"\n"
    assert line.count(b"\n") == 1 and line.isascii()
    assert IssuanceRecord.from_json(json.loads(line)) == entry
