"""Loading settings: the YAML file, environment overrides, and validation that reports every problem at once.

This module is the only reader of the environment.  The settings themselves are the frozen dataclasses
of :mod:`ca_service.settings` (re-exported here, so ``from ca_service.config import Settings`` works).

Environment overrides: ``CA_SERVICE_<KEY>`` for top-level keys and ``CA_SERVICE_<SECTION>__<KEY>`` for
nested ones (``CA_SERVICE_CA__WORKLOAD_TTL=12h``); ``CA_SERVICE_DATA_DIR`` moves the data directory;
``CA_SERVICE_CONFIG`` names the file.  Precedence: defaults < file < environment < command-line flags.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import math
import os
import socket
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from ca_service.config_checks import MAX_SIGNING_WORKERS, validate
from ca_service.config_checks import Problems as _Problems
from ca_service.config_file import check_yaml_shape, read_config_document
from ca_service.errors import ConfigError
from ca_service.settings import (
    AdminSettings,
    BundleEndpointSettings,
    BundleProfile,
    CacertsSecretSettings,
    CASettings,
    FederationSettings,
    GrpcListener,
    HttpSettings,
    IstiodSettings,
    KubernetesStorageSettings,
    ListenerPolicy,
    LogFormat,
    LoggingSettings,
    PeerSettings,
    RootCertConfigMapSettings,
    RotationSettings,
    Settings,
    StorageBackend,
    StorageSettings,
    TLSSettings,
    TrustBundleConfigMapSettings,
    format_duration,
    parse_duration,
)

__all__ = [
    "ENV_PREFIX",
    "MAX_SIGNING_WORKERS",
    "AdminSettings",
    "BundleEndpointSettings",
    "BundleProfile",
    "CASettings",
    "CacertsSecretSettings",
    "ConfigError",
    "FederationSettings",
    "GrpcListener",
    "HttpSettings",
    "IstiodSettings",
    "KubernetesStorageSettings",
    "ListenerPolicy",
    "LogFormat",
    "LoggingSettings",
    "PeerSettings",
    "RootCertConfigMapSettings",
    "RotationSettings",
    "Settings",
    "StorageBackend",
    "StorageSettings",
    "TLSSettings",
    "TrustBundleConfigMapSettings",
    "format_duration",
    "load_settings",
    "parse_duration",
    "replica_id",
    "validate",
]

ENV_PREFIX = "CA_SERVICE_"

# ---------------------------------------------------------------- loading


def _convert(tp: Any, value: Any, key: str, problems: _Problems) -> Any:
    """Convert a YAML/env value to the annotated type, recording a problem instead of raising."""
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else _convert(args[0], value, key, problems)
    if origin is tuple:
        if not isinstance(value, list):
            problems.add(key, f"expected a list, got {type(value).__name__}")
            return ()
        (item_tp, _) = typing.get_args(tp)
        items = (_convert(item_tp, v, f"{key}[{i}]", problems) for i, v in enumerate(value))
        # A failed item is already a problem; dropping it keeps validate() from meeting a None.
        return tuple(item for item in items if item is not None)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key, problems)
    try:
        return _scalar(tp, value)
    except (ValueError, TypeError, OverflowError) as exc:
        problems.add(key, str(exc))
        return None


def _scalar(tp: Any, value: Any) -> Any:
    if tp is dt.timedelta:
        return parse_duration(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ValueError(f"{value!r} is not a boolean")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ValueError(f"{value!r} is not an integer")
        return int(value, 0) if isinstance(value, str) else value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ValueError(f"{value!r} is not a number")
        number = float(value)
        if not math.isfinite(number):
            raise ValueError(f"{value!r} is not a finite number")
        return number
    if tp is str:
        if not isinstance(value, str) or "\x00" in value:
            raise ValueError(f"{value!r} is not a string")
        return value
    if tp is Path:
        if not isinstance(value, str) or not value or "\x00" in value:
            raise ValueError(f"{value!r} is not a path")
        return Path(value)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        allowed = ", ".join(str(m.value) for m in tp)
        try:
            return tp(value)
        except ValueError:
            raise ValueError(f"{value!r} is not one of: {allowed}") from None
    raise TypeError(f"unsupported setting type {tp!r}")


def _build(cls: Any, value: Any, key: str, problems: _Problems) -> Any:
    if value is None:
        value = {}
    if not isinstance(value, Mapping):
        problems.add(key or "<top>", f"expected a mapping, got {type(value).__name__}")
        return cls()
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for unknown in sorted(str(k) for k in set(value) - names):
        problems.add(f"{key}.{unknown}" if key else str(unknown), f"unknown key (known: {', '.join(sorted(names))})")
    kwargs = {}
    for name in names & set(value):
        sub = f"{key}.{name}" if key else name
        if value[name] is None and not _nullable(hints[name]):
            # `key:` with nothing after it: YAML null, which only an optional setting can hold.
            problems.add(sub, "is empty; give a value or remove the key for the default")
            continue
        converted = _convert(hints[name], value[name], sub, problems)
        if converted is not None or value[name] is None:
            kwargs[name] = converted
    return cls(**kwargs)


def _nullable(tp: Any) -> bool:
    """Whether ``None`` is a value of ``tp`` (``X | None``), or stands for an empty section (a dataclass)."""
    return type(None) in typing.get_args(tp) or dataclasses.is_dataclass(tp)


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """``CA_SERVICE_A__B=v`` -> ``{"a": {"b": "v"}}``.  YAML-parsed so numbers and booleans keep their type."""
    tree: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or name == ENV_PREFIX + "CONFIG":
            continue
        path = name[len(ENV_PREFIX) :].lower().split("__")
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        try:
            if raw:
                check_yaml_shape(raw)  # an alias bomb in a variable must fail as fast as one in the file
            node[path[-1]] = yaml.safe_load(raw) if raw else raw
        except (yaml.YAMLError, ValueError):
            node[path[-1]] = raw
        if isinstance(node[path[-1]], int | float | bool) and path[-1] in _STRINGY:
            node[path[-1]] = raw
    return tree


_STRINGY = {"trust_domain", "data_dir", "address", "level"}


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_settings(
    path: Path | None = None, *, environ: Mapping[str, str] | None = None, overrides: Mapping[str, Any] | None = None
) -> Settings:
    """Read ``path`` (optional: without it the embedded default applies), apply the environment and
    ``overrides`` (command-line flags), and validate.

    Raises:
        ConfigError: listing every problem found, each prefixed by its key.
    """
    env = os.environ if environ is None else environ
    problems = _Problems()
    doc: dict[str, Any] = {}
    if path is None and env.get(ENV_PREFIX + "CONFIG"):
        path = Path(env[ENV_PREFIX + "CONFIG"])
    if path is not None:
        doc = _read_yaml(path, problems)
    env_tree = _env_overrides(env)
    from_file = "data_dir" in doc and "data_dir" not in env_tree and "data_dir" not in (overrides or {})
    doc = _merge(_merge(doc, env_tree), overrides or {})
    settings: Settings = _build(Settings, doc, "", problems)
    if path is not None and from_file and not settings.data_dir.is_absolute():
        # A relative data_dir in a file is relative to that file, not to wherever the daemon was started;
        # one from the environment or a flag is relative to the working directory, as a shell user expects.
        settings = dataclasses.replace(settings, data_dir=path.parent / settings.data_dir)
    problems.extend(validate(settings))
    if problems:
        raise ConfigError(problems)
    return settings


def _read_yaml(path: Path, problems: _Problems) -> dict[str, Any]:
    try:
        return read_config_document(path)
    except ValueError as exc:
        problems.add("config", str(exc))
        return {}


def replica_id(settings: Settings, environ: Mapping[str, str] | None = None) -> str:
    """This replica's identity for leases: the configured one, else $POD_NAME (unique and stable for the
    pod's life), else the hostname (a pod's hostname is its name too)."""
    env = os.environ if environ is None else environ
    return settings.storage.kubernetes.replica_id or env.get("POD_NAME") or socket.gethostname()


