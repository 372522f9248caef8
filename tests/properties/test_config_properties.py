"""The config loader on generated files: every input gives Settings or a ConfigError listing what is
wrong, never another exception, and accepted Settings satisfy every rule the daemon relies on."""

from __future__ import annotations

import atexit
import dataclasses
import datetime as dt
import shutil
import tempfile
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from ca_service.config import ConfigError, Settings, load_settings, validate
from ca_service.pki.identity import TrustDomain
from tests.properties.profiles import DEFAULT, SLOW, SLOW_TIMEOUT

# One file rewritten per example (Hypothesis and function-scoped tmp_path do not mix); removed at exit.
_DIR = Path(tempfile.mkdtemp(prefix="ca-config-properties-"))
atexit.register(shutil.rmtree, _DIR, ignore_errors=True)
_LEVELS = ("debug", "info", "warning", "error", "critical")


def _schema_keys(cls: Any) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**40), 2**70), st.floats(), st.text(max_size=12),
    st.sampled_from(["0s", "-5s", "1ms", "30s", "10m", "24h", "30d", "3650d", "99999999999d", ".inf", "1e400",
                     "cluster.local", "EX.ORG", "127.0.0.1:0", "unix:///tmp/x", "/dev/zero", "/", "info", "loud",
                     "json", "text", "https://peer", "static", "https_web", "ec-p256", "rsa-2048", "0x10"]),
)


def _value_for(tp: Any, depth: int) -> st.SearchStrategy[Any]:
    origin = typing.get_origin(tp)
    if origin is tuple and depth < 3:
        (item, _) = typing.get_args(tp)
        return st.one_of(st.lists(_value_for(item, depth + 1), max_size=2), SCALARS)
    if dataclasses.is_dataclass(tp) and depth < 3:
        return _section(tp, depth + 1)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if args and dataclasses.is_dataclass(args[0]):
        return _section(args[0], depth + 1)
    return SCALARS


def _section(cls: Any, depth: int = 0) -> st.SearchStrategy[dict[str, Any]]:
    known = {name: _value_for(tp, depth) for name, tp in _schema_keys(cls).items()}
    return st.fixed_dictionaries({}, optional={**known, "unknown_key": SCALARS})


DOCS = _section(Settings).map(lambda d: yaml.safe_dump(d).encode())
INPUTS = st.one_of(DOCS, st.binary(max_size=120), st.text(max_size=120).map(str.encode),
                   DOCS.flatmap(lambda raw: st.integers(0, max(len(raw) - 1, 0)).map(lambda i: raw[:i])))


def _durations(obj: Any) -> list[tuple[str, dt.timedelta]]:
    return [(f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj)
            if isinstance(getattr(obj, f.name), dt.timedelta)]


# Durations that may be 0 (config_checks): no backdate, re-issue everything at once, the SDS ACK gate alone.
_ZERO_MEANS_SOMETHING = ("backdate", "reissue_window", "root_min_propagation")


def check_config(raw: bytes) -> None:
    path = _DIR / "ca-service.yaml"
    path.write_bytes(raw)
    try:
        settings = load_settings(path, environ={})
    except ConfigError as exc:
        assert exc.problems and all(isinstance(p, str) and ": " in p for p in exc.problems)
        return
    assert validate(settings) == []
    TrustDomain(settings.trust_domain)
    assert settings.logging.level.lower() in _LEVELS
    for section in (settings.ca, settings.rotation):
        for name, value in _durations(section):
            if name in _ZERO_MEANS_SOMETHING:
                assert value >= dt.timedelta(0), f"{name} accepted as {value}"
            else:
                assert value > dt.timedelta(0), f"{name} accepted as {value}"
    assert settings.bundle_endpoint.refresh_hint > dt.timedelta(0)
    assert settings.ca.workload_ttl < settings.ca.intermediate_ttl < settings.ca.root_ttl


@DEFAULT
@given(INPUTS)
def test_a_config_file_gives_valid_settings_or_a_config_error(raw: bytes) -> None:
    check_config(raw)


@pytest.mark.slow
@pytest.mark.timeout(SLOW_TIMEOUT)
@SLOW
@given(INPUTS)
def test_ten_thousand_config_files_give_valid_settings_or_a_config_error(raw: bytes) -> None:
    check_config(raw)
