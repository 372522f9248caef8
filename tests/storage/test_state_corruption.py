"""A corrupted state record is refused with a StorageError that says how to restore, or loads to
exactly the original state; never a half-right state, never a traceback (issue 15 item 11)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from ca_service.config import Settings
from ca_service.errors import StorageError
from ca_service.services.authority import Authority
from ca_service.storage.base import AUTHORITY_RECORD
from ca_service.storage.codec import CHECKSUM_FIELD, STATE_KEY, decode_state, encode_state
from ca_service.storage.directory import DirectoryStore

# Every bit position of a byte gets its turn across the sample.
MASKS = (0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80)
DEFAULT_SAMPLE = 256
SERVE_TIMEOUT = 60


def _record_path(settings: Settings) -> Path:
    return settings.data_dir / "state" / f"{AUTHORITY_RECORD}.json"


def _loads_or_refuses(path: Path, original: dict[str, bytes], corrupted: bytes) -> str:
    path.write_bytes(corrupted)
    os.chmod(path, 0o600)
    try:
        record = DirectoryStore(path.parent).read(AUTHORITY_RECORD)
        assert record is not None
        state = decode_state(dict(record.data))
    except StorageError as exc:
        assert "restore" in str(exc), str(exc)
        return "refused"
    assert encode_state(state) == original, "a corrupted record loaded as a different state"
    return "equal"


def _flip_all(settings: Settings, positions: range) -> dict[str, int]:
    path = _record_path(settings)
    raw = path.read_bytes()
    original = encode_state(decode_state(dict(DirectoryStore(path.parent).read(AUTHORITY_RECORD).data)))  # type: ignore[union-attr]
    outcomes = {"refused": 0, "equal": 0}
    for i in positions:
        corrupted = bytearray(raw)
        corrupted[i] ^= MASKS[i % len(MASKS)]
        outcomes[_loads_or_refuses(path, original, bytes(corrupted))] += 1
    path.write_bytes(raw)
    return outcomes


def test_every_sampled_one_byte_corruption_is_refused_or_loads_to_the_original(
        authority: Authority, settings: Settings) -> None:
    size = _record_path(settings).stat().st_size
    outcomes = _flip_all(settings, range(0, size, max(1, size // DEFAULT_SAMPLE)))
    assert sum(outcomes.values()) >= 200
    assert outcomes["refused"] > outcomes["equal"]


@pytest.mark.slow
def test_every_one_byte_corruption_is_refused_or_loads_to_the_original(
        authority: Authority, settings: Settings) -> None:
    size = _record_path(settings).stat().st_size
    outcomes = _flip_all(settings, range(size))
    assert sum(outcomes.values()) == size


def _legacy(data: dict[str, bytes], **changes: object) -> dict[str, bytes]:
    """The record as written before checksums existed, optionally with fields changed."""
    doc = json.loads(data[STATE_KEY])
    doc.pop(CHECKSUM_FIELD)
    doc.update(changes)
    return {STATE_KEY: json.dumps(doc).encode()}


def test_a_record_without_a_checksum_still_loads_and_its_next_write_adds_one(authority: Authority) -> None:
    data = encode_state(authority.state)
    state = decode_state(_legacy(data))
    assert encode_state(state) == data
    assert CHECKSUM_FIELD in json.loads(encode_state(state)[STATE_KEY])


@pytest.mark.parametrize(("field", "value"), [("revision", -5), ("bundle_sequence", -1)])
def test_a_record_without_a_checksum_and_a_negative_counter_is_refused(authority: Authority, field: str,
                                                                      value: int) -> None:
    with pytest.raises(StorageError, match=f"{field}.*>= 0.*restore"):
        decode_state(_legacy(encode_state(authority.state), **{field: value}))


def test_a_key_that_does_not_match_its_certificate_is_refused(authority: Authority) -> None:
    entries = list(authority.state.entries)
    entries[1] = dataclasses.replace(entries[1], key=ec.generate_private_key(ec.SECP256R1()))
    state = dataclasses.replace(authority.state, entries=tuple(entries))
    with pytest.raises(StorageError, match="private key that does not belong"):
        decode_state(_legacy(encode_state(state)))


def test_a_ca_certificate_whose_signature_no_longer_verifies_is_refused(authority: Authority) -> None:
    doc = json.loads(encode_state(authority.state)[STATE_KEY])
    doc.pop(CHECKSUM_FIELD)
    root = next(e for e in doc["entries"] if not e["parent"])
    # Re-sign nothing: swap in another root's PEM under this entry's key id by using the intermediate's parent.
    other = next(e for e in doc["entries"] if e["parent"])
    other_cert = other["cert"]
    other["cert"] = root["cert"]  # the intermediate slot now holds a self-signed root cert
    with pytest.raises(StorageError, match="restore"):
        decode_state({STATE_KEY: json.dumps(doc).encode()})
    other["cert"] = other_cert
    decode_state({STATE_KEY: json.dumps(doc).encode()})  # unchanged, it loads


def _cli(settings: Settings, *args: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CA_SERVICE_")}
    return subprocess.Popen([sys.executable, "-m", "ca_service", "--data-dir", str(settings.data_dir), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _interesting_positions(raw: bytes) -> dict[str, int]:
    text = raw.decode()
    return {"the version": text.index('"version": "') + len('"version": "'), "the structure": 0,
            "a key name": text.index('"data"') + 2, "the payload start": text.index(STATE_KEY) + 20,
            "the payload middle": len(text) // 2, "the payload end": text.rindex('"') - 3}


@pytest.mark.parametrize("where", ["the version", "the structure", "a key name", "the payload start",
                                   "the payload middle", "the payload end"])
def test_status_and_serve_on_a_corrupted_record_exit_with_one_clear_line(
        authority: Authority, settings: Settings, where: str) -> None:
    path = _record_path(settings)
    raw = bytearray(path.read_bytes())
    # 0x40 turns the version digit into a letter (0x01 would make "1" a valid "0").
    raw[_interesting_positions(bytes(raw))[where]] ^= 0x40
    path.write_bytes(bytes(raw))
    status = _cli(settings, "status")
    _, err = status.communicate(timeout=SERVE_TIMEOUT)
    assert status.returncode == 1 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("ca-service status:") and "restore" in err
    serve = _cli(settings, "serve", "--grpc-address", "127.0.0.1:0", "--http-address", "127.0.0.1:0",
                 "--bundle-address", "127.0.0.1:0")
    try:
        _, err = serve.communicate(timeout=SERVE_TIMEOUT)
    finally:
        if serve.poll() is None:
            serve.send_signal(signal.SIGTERM)
            serve.communicate(timeout=SERVE_TIMEOUT)
    assert serve.returncode == 1 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("ca-service serve:") and "restore" in err
