"""Hostile admin API input: oversized and deeply nested bodies, garbage the HTTP parser refuses, and a
reason that tries to forge log lines (issue 15 items 9 and 10)."""

from __future__ import annotations

import asyncio
import json
from urllib.parse import urlsplit

import pytest

from tests.logs.capture import captured_log
from tests.logs.test_log_guard import RECORD_START
from tests.web.conftest import Daemon

ROTATE = "/admin/v1/rotate"


async def test_a_reason_with_a_forged_line_and_ansi_reaches_the_log_escaped_on_one_line(daemon: Daemon) -> None:
    reason = "drill\n2026-01-01 00:00:00,000 INFO    ca_service.app: root rotated\r\x1b[2J\x1b[31m"
    with captured_log() as out:
        async with daemon.session.post(daemon.url + ROTATE, headers=daemon.auth(),
                                       json={"scope": "all-workloads", "reason": reason, "dry_run": True}) as resp:
            assert resp.status == 200
    lines = [line for line in out.lines() if "admin rotation" in line]
    assert len(lines) == 1 and "\\n2026-01-01" in lines[0] and "\\x1b[2J" in lines[0]
    assert all(RECORD_START.match(line) for line in out.lines())
    assert "\x1b" not in out.text and "\r" not in out.text


async def test_a_ten_mebibyte_body_is_refused_with_413_and_audited(daemon: Daemon) -> None:
    body = b'{"scope": "root", "reason": "' + b"x" * (10 << 20) + b'"}'
    async with daemon.session.post(daemon.url + ROTATE, headers=daemon.auth(), data=body) as resp:
        assert resp.status == 413
        assert (await resp.json())["field"] == "body"
    assert json.loads(daemon.audit_lines()[-1])["result"] == "too-large"


async def test_a_chunked_body_without_a_length_is_bounded_too(daemon: Daemon) -> None:
    async def chunks():  # type: ignore[no-untyped-def]
        for _ in range(200):
            yield b"x" * 65536

    async with daemon.session.post(daemon.url + ROTATE, headers=daemon.auth(), data=chunks()) as resp:
        assert resp.status == 413


@pytest.mark.parametrize("depth", [10_000, 30_000])
async def test_deeply_nested_json_is_refused_with_400(daemon: Daemon, depth: int) -> None:
    body = b"[" * depth + b"]" * depth  # both under the 64 KiB body limit
    async with daemon.session.post(daemon.url + ROTATE, headers=daemon.auth(), data=body) as resp:
        assert resp.status == 400
        assert (await resp.json())["field"] == "body"


@pytest.mark.parametrize("garbage", [
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40,  # a TLS ClientHello on the plain port
    b"GET /admin/v1/status HTTP/1.1\r\nHost: x\r\nBad Header\x01: y\r\n\r\n",
    b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
])
async def test_a_request_the_http_parser_refuses_is_answered_400_and_audited_without_a_traceback(
        daemon: Daemon, garbage: bytes) -> None:
    url = urlsplit(daemon.url)
    with captured_log() as out:
        reader, writer = await asyncio.open_connection(url.hostname, url.port)
        writer.write(garbage)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(4096), 10)
        writer.close()
    assert answer.split(b" ")[1] == b"400", answer[:80]
    audit = json.loads(daemon.audit_lines()[-1])
    assert audit["action"] == "http" and audit["result"] == "bad-request" and audit["remote"] == "127.0.0.1"
    assert "Traceback" not in out.text
    assert sum("refused by the parser" in line for line in out.lines()) == 1


async def test_a_rotation_on_a_read_only_state_directory_is_503_and_audited(daemon: Daemon) -> None:
    from tests.test_cli_errors import read_only

    before = daemon.authority.state
    with read_only(daemon.settings.data_dir / "state"):
        async with daemon.session.post(daemon.url + ROTATE, headers=daemon.auth(),
                                       json={"scope": "intermediate", "reason": "drill"}) as resp:
            assert resp.status == 503
            assert "Read-only file system" in (await resp.json())["error"]
    assert daemon.authority.state == before
    assert json.loads(daemon.audit_lines()[-1])["result"] == "storage-unavailable"
