"""Fixtures for the rotation tests (helpers live in rotation_kit)."""

from __future__ import annotations

import pytest
from rotation_kit import Env, make_env

from ca_service.config import Settings
from tests.clock import FakeClock


@pytest.fixture
def env(settings: Settings, clock: FakeClock) -> Env:
    return make_env(settings, clock)
