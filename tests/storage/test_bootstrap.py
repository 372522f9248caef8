"""Bootstrap, restart, root import and intermediate-only mode, through the operator use cases."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import profiles as p
import pytest

from ca_service import operations
from ca_service.config import Settings
from ca_service.errors import InvalidRequestError, NotReadyError
from ca_service.pki.certs import cert_to_pem, load_certs
from ca_service.pki.identity import SpiffeId
from ca_service.pki.keys import generate_private_key, private_key_to_pem
from ca_service.pki.templates import CAKind, build_intermediate, build_root, build_svid
from ca_service.pki.verify import verify_svid
from ca_service.rotation.state import AuthorityMode
from ca_service.storage.base import AUTHORITY_RECORD
from ca_service.storage.directory import DirectoryStore


def _serials(report: dict[str, object]) -> list[str]:
    return [c["serial"] for c in report["certificates"]]  # type: ignore[attr-defined]


def test_first_start_creates_root_and_both_intermediates(settings: Settings) -> None:
    report = operations.init(settings)
    assert report["created"] is True
    kinds = sorted(c["kind"] for c in report["certificates"])
    assert kinds == ["intermediate", "istiod_intermediate", "root"]
    assert report["mode"] == AuthorityMode.SELF_SIGNED.value


def test_second_start_loads_the_same_certificates(settings: Settings) -> None:
    first = operations.init(settings)
    second = operations.init(settings)
    assert second["created"] is False
    assert _serials(second) == _serials(first)
    assert _serials(operations.status(settings)) == _serials(first)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    path.chmod(0o600)
    return path


def test_init_imports_an_existing_root(settings: Settings, tmp_path: Path) -> None:
    now = dt.datetime.now(dt.UTC)
    key = generate_private_key()
    root = build_root(key, settings.domain, now=now, ttl=dt.timedelta(days=3650))
    report = operations.init(settings, root_cert=_write(tmp_path / "root.pem", cert_to_pem(root)),
                             root_key=_write(tmp_path / "root-key.pem", private_key_to_pem(key)))
    assert report["mode"] == AuthorityMode.IMPORTED_ROOT.value
    root_row = next(c for c in report["certificates"] if c["kind"] == "root")
    assert root_row["serial"] == format(root.serial_number, "x")
    out = tmp_path / "svid"
    operations.issue(settings, "spiffe://cluster.local/ns/a/sa/b", out)
    chain = load_certs((out / "svid.pem").read_bytes())
    assert verify_svid(chain[0], chain[1:], [root], now=now) == SpiffeId.parse("spiffe://cluster.local/ns/a/sa/b")


def test_an_import_over_an_existing_ca_is_refused(settings: Settings, tmp_path: Path) -> None:
    operations.init(settings)
    key = generate_private_key()
    root = build_root(key, settings.domain, now=dt.datetime.now(dt.UTC), ttl=dt.timedelta(days=100))
    with pytest.raises(InvalidRequestError, match="already exists"):
        operations.init(settings, root_cert=_write(tmp_path / "r.pem", cert_to_pem(root)),
                        root_key=_write(tmp_path / "k.pem", private_key_to_pem(key)))


def test_an_imported_root_with_the_wrong_key_is_refused(settings: Settings, tmp_path: Path) -> None:
    root = build_root(generate_private_key(), settings.domain, now=dt.datetime.now(dt.UTC), ttl=dt.timedelta(days=9))
    with pytest.raises(InvalidRequestError, match="does not match"):
        operations.init(settings, root_cert=_write(tmp_path / "r.pem", cert_to_pem(root)),
                        root_key=_write(tmp_path / "k.pem", private_key_to_pem(generate_private_key())))


def test_a_root_cert_without_its_key_is_refused(settings: Settings, tmp_path: Path) -> None:
    with pytest.raises(InvalidRequestError, match="both --root-cert and --root-key"):
        operations.init(settings, root_cert=tmp_path / "r.pem")


def _offline(settings: Settings, tmp_path: Path) -> tuple[Path, Path, Path, bytes]:
    now = dt.datetime.now(dt.UTC)
    root_key = generate_private_key()
    root = build_root(root_key, settings.domain, now=now, ttl=dt.timedelta(days=3650))
    key = generate_private_key()
    inter = build_intermediate(key.public_key(), settings.domain, issuer=root, issuer_key=root_key, now=now,
                               ttl=dt.timedelta(days=60))
    return (_write(tmp_path / "inter.pem", cert_to_pem(inter)), _write(tmp_path / "inter-key.pem",
            private_key_to_pem(key)), _write(tmp_path / "root.pem", cert_to_pem(root)), private_key_to_pem(root_key))


def test_intermediate_only_mode_signs_without_ever_holding_the_root_key(settings: Settings, tmp_path: Path) -> None:
    inter_cert, inter_key, root_cert, root_key_pem = _offline(settings, tmp_path)
    report = operations.init(settings, intermediate_cert=inter_cert, intermediate_key=inter_key, root_cert=root_cert)
    assert report["mode"] == AuthorityMode.INTERMEDIATE_ONLY.value
    status = operations.status(settings)
    assert "held offline" in status["root_key"]
    assert "held offline" in operations.render_status(status)
    assert [c["key_held"] for c in status["certificates"] if c["kind"] == "root"] == [False]

    out = tmp_path / "svid"
    operations.issue(settings, "spiffe://cluster.local/ns/a/sa/b", out)
    chain = load_certs((out / "svid.pem").read_bytes())
    (root,) = load_certs(root_cert.read_bytes())
    p.assert_is_svid(chain[0], chain[1], "spiffe://cluster.local/ns/a/sa/b")
    verify_svid(chain[0], chain[1:], [root], now=dt.datetime.now(dt.UTC))

    record = DirectoryStore(settings.data_dir / "state").read(AUTHORITY_RECORD)
    assert record is not None
    raw = b"".join(record.data.values())
    body = root_key_pem.split(b"\n")[1]
    assert body not in raw, "the offline root key leaked into the daemon state"
    assert raw.count(b"PRIVATE KEY-----") == 2  # BEGIN + END of the intermediate key only


def test_intermediate_only_mode_refuses_what_needs_the_root_key(settings: Settings, tmp_path: Path) -> None:
    inter_cert, inter_key, root_cert, _ = _offline(settings, tmp_path)
    operations.init(settings, intermediate_cert=inter_cert, intermediate_key=inter_key, root_cert=root_cert)
    with pytest.raises(NotReadyError, match="root key"):
        operations.export_cacerts(settings, tmp_path / "cacerts")


def test_intermediate_only_mode_refuses_an_intermediate_of_another_root(settings: Settings, tmp_path: Path) -> None:
    inter_cert, inter_key, _, _ = _offline(settings, tmp_path)
    other = build_root(generate_private_key(), settings.domain, now=dt.datetime.now(dt.UTC), ttl=dt.timedelta(days=9))
    with pytest.raises(InvalidRequestError, match="does not chain"):
        operations.init(settings, intermediate_cert=inter_cert, intermediate_key=inter_key,
                        root_cert=_write(tmp_path / "other.pem", cert_to_pem(other)))


def test_intermediate_only_mode_refuses_a_root_key(settings: Settings, tmp_path: Path) -> None:
    inter_cert, inter_key, root_cert, _ = _offline(settings, tmp_path)
    with pytest.raises(InvalidRequestError, match="no --root-key"):
        operations.init(settings, intermediate_cert=inter_cert, intermediate_key=inter_key, root_cert=root_cert,
                        root_key=inter_key)


def test_intermediate_only_refuses_a_leaf_as_intermediate(settings: Settings, tmp_path: Path) -> None:
    now = dt.datetime.now(dt.UTC)
    root_key = generate_private_key()
    root = build_root(root_key, settings.domain, now=now, ttl=dt.timedelta(days=30))
    key = generate_private_key()
    leaf = build_svid(key.public_key(), SpiffeId.parse("spiffe://cluster.local/x"), issuer=root, issuer_key=root_key,
                      now=now, ttl=dt.timedelta(hours=1))
    with pytest.raises(InvalidRequestError):
        operations.init(settings, intermediate_cert=_write(tmp_path / "i.pem", cert_to_pem(leaf)),
                        intermediate_key=_write(tmp_path / "k.pem", private_key_to_pem(key)),
                        root_cert=_write(tmp_path / "r.pem", cert_to_pem(root)))


def test_issue_before_init_says_what_to_do(settings: Settings, tmp_path: Path) -> None:
    with pytest.raises(NotReadyError, match="ca-service init"):
        operations.issue(settings, "spiffe://cluster.local/a", tmp_path)


def test_the_daemon_state_holds_each_kind_once_with_matching_keys(settings: Settings) -> None:
    operations.init(settings)
    from ca_service.app import build_authority

    authority = build_authority(settings)
    state = authority.load()
    assert state is not None
    p.assert_is_ca(state.active(CAKind.ROOT).cert)
    p.assert_is_ca(state.active(CAKind.INTERMEDIATE).cert, state.active(CAKind.ROOT).cert, path_length=0)
    p.assert_is_ca(state.active(CAKind.ISTIOD_INTERMEDIATE).cert, state.active(CAKind.ROOT).cert, path_length=0)
