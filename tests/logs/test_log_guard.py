"""The log pipeline escapes, truncates and rate-limits whatever callers pass it (issue 15 item 9)."""

from __future__ import annotations

import json
import logging
import re

import pytest

from ca_service.logs import LogGuard, escape, suppressed_total, truncate
from ca_service.telemetry import Telemetry
from tests.logs.capture import captured_log

log = logging.getLogger("tests.logs.victim")
# What a real record line starts with: a forged one must never match this at the start of a line.
RECORD_START = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ")
FORGED = "x\n2026-01-01 00:00:00,000 INFO    ca_service.app: root rotated\r\x1b[2J\x1b[31mred\u2028\u202eevil"


@pytest.mark.parametrize(("raw", "escaped"), [
    ("a\nb", "a\\nb"), ("a\rb", "a\\rb"), ("\x1b[31m", "\\x1b[31m"), ("\x9b31m", "\\x9b31m"),
    ("\u2028", "\\u2028"), ("\u202e", "\\u202e"), ("\x00", "\\x00"), ("plain: spiffe://td/ns/a", None),
])
def test_escape_makes_every_control_or_invisible_character_visible(raw: str, escaped: str | None) -> None:
    assert escape(raw) == (raw if escaped is None else escaped)


def test_truncate_says_how_much_was_cut() -> None:
    assert truncate("a" * 300, 256) == "a" * 256 + "…(44 more)"
    assert truncate("short", 256) == "short"


def test_a_forged_line_in_an_argument_or_field_stays_on_its_record_line() -> None:
    with captured_log() as out:
        log.warning("NACK from %s", FORGED, extra={"error": FORGED, "node": "n\nINFO fake"})
    lines = out.lines()
    assert len(lines) == 1, lines
    assert "\x1b" not in out.text and "\r" not in out.text and "\u2028" not in out.text
    assert "\\x1b[2J" in lines[0] and "\\n2026-01-01" in lines[0]


def test_a_one_mebibyte_field_is_cut_to_the_bound_with_a_marker() -> None:
    detail = "A" * (1 << 20)
    with captured_log() as out:
        log.warning("NACK %s", detail, extra={"error": detail})
    line = out.lines()[0]
    assert len(line) < 2000
    assert line.count(f"…({(1 << 20) - 256} more)") == 2


def test_json_output_is_one_valid_document_per_record_and_also_truncated() -> None:
    with captured_log(json=True) as out:
        log.warning("NACK %s", FORGED + "B" * 5000, extra={"error": FORGED})
    (line,) = out.lines()
    doc = json.loads(line)
    assert doc["error"] == FORGED and "more)" in doc["msg"] and len(doc["msg"]) < 400


def test_a_traceback_cannot_forge_a_record_line() -> None:
    with captured_log() as out:
        try:
            raise ValueError(FORGED)
        except ValueError:
            log.exception("failed")
    lines = out.lines()
    assert RECORD_START.match(lines[0])
    assert all(line.startswith("  | ") for line in lines[1:]), lines
    assert "\x1b" not in out.text


class Ticker:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_repeats_past_the_burst_are_suppressed_and_counted_in_one_summary_when_the_window_closes() -> None:
    ticker = Ticker()
    guard = LogGuard(repeat_burst=3, repeat_window=10.0, now=ticker, use_timer=False)
    before = suppressed_total()
    with captured_log(guard=guard) as out:
        for i in range(50):
            log.warning("NACK from %s", f"node-{i}")
        log.warning("another template")  # a different message is not affected
        assert guard.suppressed_total == 47
        ticker.now = 10.5
        guard.flush()
    lines = out.lines()
    assert sum("victim: NACK from" in line for line in lines) == 3
    assert any("another template" in line for line in lines)
    summary = [line for line in lines if "suppressed 47 repeats" in line]
    assert len(summary) == 1 and "source_logger=tests.logs.victim" in summary[0]
    assert suppressed_total() == before  # the guard under test is not the process's active one


def test_a_new_window_admits_the_burst_again() -> None:
    ticker = Ticker()
    guard = LogGuard(repeat_burst=2, repeat_window=10.0, now=ticker, use_timer=False)
    with captured_log(guard=guard) as out:
        for _ in range(5):
            log.info("tick")
        ticker.now = 11
        for _ in range(5):
            log.info("tick")
    assert sum("victim: tick" in line for line in out.lines()) == 4
    assert sum("suppressed 3 repeats" in line for line in out.lines()) == 1


def test_suppressed_lines_are_exported_as_ca_log_suppressed_total() -> None:
    from ca_service.config import LoggingSettings
    from ca_service.logs import configure_logging

    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        guard = configure_logging(LoggingSettings(repeat_burst=1))
        telemetry = Telemetry()
        start = telemetry.registry.get_sample_value("ca_log_suppressed_total")
        for _ in range(5):
            logging.getLogger("tests.flood").error("same")
        assert guard.suppressed_total == 4
        assert telemetry.registry.get_sample_value("ca_log_suppressed_total") == (start or 0) + 4
        guard.flush(force=True)  # its summary goes to this test's handler, not to a later test's
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
