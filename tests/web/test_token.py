"""The admin token file: generated once at the default path, never at a configured one."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from ca_service.errors import ConfigError
from ca_service.web.auth import AdminAuth, ensure_admin_token


def test_a_token_is_generated_once_with_mode_0600_and_then_reused(tmp_path: Path) -> None:
    path = tmp_path / "data" / "admin-token"
    first = ensure_admin_token(path, generate=True)
    assert len(first) >= 40 and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert ensure_admin_token(path, generate=True) == first


def test_a_configured_token_file_that_is_missing_or_empty_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        ensure_admin_token(tmp_path / "nope", generate=False)
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="empty"):
        ensure_admin_token(tmp_path / "empty", generate=False)


def test_the_allow_list_takes_exact_ids_and_globs() -> None:
    auth = AdminAuth("t", ["spiffe://cluster.local/ns/ops/sa/*", "spiffe://cluster.local/admin"])
    assert auth.is_allowed_id("spiffe://cluster.local/ns/ops/sa/sre")
    assert auth.is_allowed_id("spiffe://cluster.local/admin")
    assert not auth.is_allowed_id("spiffe://cluster.local/ns/shop/sa/web")
    assert not auth.is_allowed_id("spiffe://other.td/ns/ops/sa/sre")
