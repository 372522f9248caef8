"""Shared fixtures: a fake clock, a fresh CA on the real directory store, settings for tmp dirs."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from ca_service.config import Settings, load_settings
from ca_service.services.authority import Authority
from ca_service.storage.directory import DirectoryStore
from tests.clock import FakeClock

START = dt.datetime(2030, 1, 1, 12, 0, tzinfo=dt.UTC)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(START)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return load_settings(environ={}, overrides={"data_dir": str(tmp_path / "data")})


@pytest.fixture
def authority(settings: Settings, clock: FakeClock) -> Authority:
    auth = Authority(DirectoryStore(settings.data_dir / "state"), settings.domain, settings.ca, clock)
    auth.load_or_bootstrap()
    return auth


# The real Kubernetes API server (tests/kube.py): `k8s` is shared by the session, `private_k8s` is a test's own.
from tests.kube import k8s, private_k8s  # noqa: E402, F401
