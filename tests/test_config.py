"""Configuration: the documented example, environment overrides, and every problem reported at once with its key."""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml

from ca_service.config import ConfigError, Settings, load_settings, parse_duration
from ca_service.pki.keys import KeyAlgorithm
from ca_service.settings import GrpcListener, StorageBackend, format_duration

EXAMPLE = Path(__file__).resolve().parents[1] / "config" / "ca-service.yaml"


def _load(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> Settings:
    path = tmp_path / "ca-service.yaml"
    path.write_text(text)
    return load_settings(path, environ=environ or {})


def _problems(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, text, environ)
    return info.value.problems


def test_the_embedded_default_needs_no_file() -> None:
    settings = load_settings(environ={})
    assert settings.trust_domain == "cluster.local"
    assert settings.data_dir == Path("./var/ca-service")
    assert all(listener.address.startswith("127.0.0.1:") for listener in settings.grpc)
    assert settings.http.address.startswith("127.0.0.1:")


def test_the_documented_example_loads_and_equals_the_defaults() -> None:
    settings = load_settings(EXAMPLE, environ={})
    assert dataclasses.replace(settings, data_dir=Path("./var/ca-service")) == Settings()
    assert settings.data_dir == EXAMPLE.parent / "var/ca-service"


def _keys(cls: Any, prefix: str = "") -> set[str]:
    out = set()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        out.add(key)
        if dataclasses.is_dataclass(hints[f.name]):
            out |= _keys(hints[f.name], key + ".")
    return out


def _doc_keys(doc: Any, prefix: str = "") -> set[str]:
    out: set[str] = set()
    if isinstance(doc, list) and doc and isinstance(doc[0], dict):
        return _doc_keys(doc[0], prefix)
    if isinstance(doc, dict):
        for k, v in doc.items():
            out.add(f"{prefix}{k}")
            out |= _doc_keys(v, f"{prefix}{k}.")
    return out


def test_the_example_documents_every_key() -> None:
    documented = _doc_keys(yaml.safe_load(EXAMPLE.read_text()))
    # grpc is a list of listeners: its entries' keys are documented from the first element.
    grpc_keys = {f"grpc.{k}" for k in _keys(GrpcListener)}
    missing = (_keys(Settings) | grpc_keys) - documented
    assert not missing, f"config/ca-service.yaml does not document {sorted(missing)}"


ERRORS: dict[str, tuple[str, dict[str, str], str]] = {
    "if a serving DNS name is not a DNS name, should name grpc[0].tls.dns_names[0]":
        ("grpc:\n- address: 127.0.0.1:0\n  tls: {enabled: true, dns_names: ['a b']}\n", {},
         "grpc[0].tls.dns_names[0]: 'a b' is not a lowercase DNS name"),
    "if a trusted node account is not <ns>/<sa>, should name it":
        ("istio_ca: {trusted_node_accounts: [ztunnel]}\n", {}, "istio_ca.trusted_node_accounts[0]"),
    "if the trust domain is uppercase, should name trust_domain": ("trust_domain: Cluster.Local\n", {},
                                                                   "trust_domain: trust domain 'Cluster.Local'"),
    "if the workload TTL reaches the intermediate TTL, should name ca.workload_ttl":
        ("ca: {workload_ttl: 30d, max_workload_ttl: 30d}\n", {}, "ca.workload_ttl"),
    "if a top-level key is unknown, should name it": ("trust_domian: x\n", {}, "trust_domian: unknown key"),
    "if a nested key is unknown, should name it with its section": ("ca: {workload_tll: 1h}\n", {},
                                                                    "ca.workload_tll: unknown key"),
    "if a duration is malformed, should name the key": ("ca: {root_ttl: ten years}\n", {},
                                                        "ca.root_ttl: 'ten years' is not a duration"),
    "if an enum value is unknown, should list the allowed ones":
        ("storage: {backend: etcd}\n", {}, "storage.backend: 'etcd' is not one of: directory, kubernetes"),
    "if a log format is unknown, should list the allowed ones": ("logging: {format: xml}\n", {}, "logging.format"),
    "if a section is not a mapping, should say so": ("ca: 5\n", {}, "ca: expected a mapping"),
    "if a list is a scalar, should say so": ("grpc: 127.0.0.1:1\n", {}, "grpc: expected a list"),
    "if an address is not host:port, should name it": ("http: {address: nowhere}\n", {}, "http.address"),
    "if two listeners share an address, should name the second":
        ("http: {address: '127.0.0.1:15012'}\n", {}, "http.address: 127.0.0.1:15012 is already used by grpc[0]"),
    "if a boolean is not a boolean, should name it": ("bundle_endpoint: {enabled: maybe}\n", {},
                                                      "bundle_endpoint.enabled"),
    "if an env override is a bad duration, should name the key":
        ("", {"CA_SERVICE_CA__WORKLOAD_TTL": "soon"}, "ca.workload_ttl: 'soon' is not a duration"),
    "if an env override names an unknown key, should name it":
        ("", {"CA_SERVICE_CA__NOPE": "1"}, "ca.nope: unknown key"),
    "if a referenced file is unreadable, should name the key":
        ("http: {tls: {enabled: true, cert_file: /nonexistent/c.pem, key_file: /nonexistent/k.pem}}\n", {},
         "http.tls.cert_file: file /nonexistent/c.pem does not exist"),
    "if the YAML is not YAML, should say so": ("ca: [\n", {}, "config: "),
    "if the top level is a list, should say so": ("- a\n", {}, "must hold a mapping at the top level"),
    "if renew_fraction is out of range, should name it": ("rotation: {renew_fraction: 0.95}\n", {},
                                                          "rotation.renew_fraction"),
    "if a federation peer is our own trust domain, should name it":
        ("federation: {peers: [{trust_domain: cluster.local, profile: static, bundle_file: /x}]}\n", {},
         "federation.peers[0].trust_domain: is our own trust domain"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_config_errors_name_their_key(case: str, tmp_path: Path) -> None:
    text, environ, fragment = ERRORS[case]
    problems = _problems(tmp_path, text, environ)
    assert any(fragment in problem for problem in problems), problems


def test_all_problems_are_reported_at_once(tmp_path: Path) -> None:
    problems = _problems(tmp_path, "trust_domain: BAD\nbogus: 1\nca: {root_ttl: x, extra: 2}\n"
                                   "logging: {format: xml}\n")
    keys = [p.split(":")[0] for p in problems]
    for key in ("trust_domain", "bogus", "ca.root_ttl", "ca.extra", "logging.format"):
        assert key in keys, problems


def test_an_unreadable_file_is_reported(tmp_path: Path) -> None:
    # A directory in place of the file: unreadable even for root (file modes would not stop root).
    path = tmp_path / "secret.yaml"
    path.mkdir()
    with pytest.raises(ConfigError, match=r"config: cannot read .*secret.yaml"):
        load_settings(path, environ={})


def test_a_file_without_read_permission_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The suite may run as root, whom file modes do not stop: make the read itself fail with EACCES.
    path = tmp_path / "secret.yaml"
    path.write_text("trust_domain: x\n")

    real_open = os.open

    def denied(target: object, *args: object, **kwargs: object) -> int:
        if str(target) == str(path):
            raise PermissionError(13, "Permission denied", str(target))
        return real_open(target, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(ConfigError, match=r"config: cannot read .*secret.yaml: Permission denied"):
        load_settings(path, environ={})


def test_a_missing_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "absent.yaml", environ={})


def test_env_overrides_apply_over_the_file(tmp_path: Path) -> None:
    settings = _load(tmp_path, "trust_domain: us.cluster.local\nca: {workload_ttl: 2h}\n",
                     {"CA_SERVICE_CA__WORKLOAD_TTL": "12h", "CA_SERVICE_DATA_DIR": "/srv/ca",
                      "CA_SERVICE_CA__KEY_ALGORITHM": "ec-p384", "CA_SERVICE_LOGGING__LEVEL": "debug"})
    assert settings.trust_domain == "us.cluster.local"
    assert settings.ca.workload_ttl == dt.timedelta(hours=12)
    assert settings.data_dir == Path("/srv/ca")
    assert settings.ca.key_algorithm is KeyAlgorithm.EC_P384
    assert settings.logging.level == "debug"


def test_a_relative_data_dir_from_env_is_relative_to_the_working_directory(tmp_path: Path) -> None:
    settings = _load(tmp_path, "data_dir: state\n", {"CA_SERVICE_DATA_DIR": "elsewhere"})
    assert settings.data_dir == Path("elsewhere")
    assert _load(tmp_path, "data_dir: state\n").data_dir == tmp_path / "state"


def test_the_config_file_can_come_from_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("trust_domain: eu.cluster.local\n")
    assert load_settings(environ={"CA_SERVICE_CONFIG": str(path)}).trust_domain == "eu.cluster.local"


def test_command_line_overrides_win_over_the_environment(tmp_path: Path) -> None:
    settings = load_settings(environ={"CA_SERVICE_TRUST_DOMAIN": "env.local"},
                             overrides={"trust_domain": "flag.local"})
    assert settings.trust_domain == "flag.local"


def test_a_numeric_looking_trust_domain_from_env_stays_a_string() -> None:
    assert load_settings(environ={"CA_SERVICE_TRUST_DOMAIN": "1234"}).trust_domain == "1234"


@pytest.mark.parametrize(("text", "expected"), [("90s", 90), ("15m", 900), ("24h", 86400), ("30d", 2592000),
                                                ("500ms", 0.5), (42, 42)])
def test_durations(text: object, expected: float) -> None:
    assert parse_duration(text) == dt.timedelta(seconds=expected)


@pytest.mark.parametrize("text", ["", "1y", "h", "-5m", True, None])
def test_bad_durations(text: object) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


def test_format_duration_shows_the_two_largest_units() -> None:
    assert format_duration(dt.timedelta(days=29, hours=23, minutes=5)) == "29d 23h"
    assert format_duration(dt.timedelta(seconds=42)) == "42s"
    assert format_duration(-dt.timedelta(hours=2)) == "-2h"


def test_the_kubernetes_storage_backend_is_accepted(tmp_path: Path) -> None:
    s = load_settings(environ={}, overrides={"data_dir": str(tmp_path), "storage": {"backend": "kubernetes"}})
    assert s.storage.backend is StorageBackend.KUBERNETES


def test_the_kubernetes_backend_with_a_missing_kubeconfig_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(environ={}, overrides={"data_dir": str(tmp_path), "storage": {
            "backend": "kubernetes", "kubernetes": {"kubeconfig": str(tmp_path / "missing")}}})
    assert any(p.startswith("storage.kubernetes.kubeconfig:") for p in info.value.problems)


@pytest.mark.parametrize("override", [
    {"sds": {"admission_rate": 0}}, {"sds": {"max_node_id_bytes": -1}}, {"sds": {"node_grace": "0s"}},
    {"http": {"connections": {"max_connections": 0}}}, {"bundle_endpoint": {"connections": {"header_timeout": 0}}},
    {"http": {"metrics": {"max_identity_series": -1}}},
])
def test_a_limit_that_is_zero_or_negative_is_refused_with_its_key(tmp_path: Path, override: dict[str, Any]) -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings(environ={}, overrides={"data_dir": str(tmp_path), **override})
    key = next(iter(override))
    assert key in str(raised.value)
