"""Bad configuration and bad environments end the CLI with one clear line on stderr and exit code 2
(configuration) or 1 (environment), never a traceback (issue 15 item 10).  Real subprocesses."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

# Every case must fail fast: the alias bomb ran for minutes at 2.7 GB before the fix.
CLI_TIMEOUT = 60
BILLION_LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
    f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(9)
) + "trust_domain: *j\n"


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CA_SERVICE_")}
    return subprocess.run([sys.executable, "-m", "ca_service", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=CLI_TIMEOUT)


@contextlib.contextmanager
def read_only(directory: Path) -> Iterator[Path]:
    """``directory`` made read-only in a way that also stops root (a read-only bind mount)."""
    if os.geteuid() != 0:
        directory.chmod(0o500)
        try:
            yield directory
        finally:
            directory.chmod(0o700)
        return
    subprocess.run(["mount", "--bind", "-o", "ro", str(directory), str(directory)], check=True)
    try:
        yield directory
    finally:
        subprocess.run(["umount", str(directory)], check=True)


@dataclass(frozen=True)
class Case:
    config: str | bytes | Callable[[Path], str]  # the file's content, or a function returning a config path
    expect: str  # a substring of the one stderr line


def _yaml(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


CONFIG_CASES = {
    "binary": Case(bytes(range(256)) * 4, "not UTF-8 text"),
    "utf-16": Case("trust_domain: example.org\n".encode("utf-16"), "not UTF-8 text"),
    "nested 10k deep": Case("trust_domain: " + "[" * 10_000 + "]" * 10_000 + "\n", "nested deeper than"),
    "a huge duration": Case("ca:\n  workload_ttl: 99999999999d\n", "ca.workload_ttl"),
    "an infinite duration": Case("ca:\n  root_ttl: .inf\n", "ca.root_ttl"),
    "an infinite fraction": Case("rotation:\n  renew_fraction: .inf\n", "rotation.renew_fraction"),
    "a NaN fraction": Case("rotation:\n  jitter_fraction: .nan\n", "rotation.jitter_fraction"),
    "an unknown log level": Case("logging:\n  level: loud\n", "logging.level"),
    "/dev/zero": Case(lambda _: "/dev/zero", "not a regular file"),
    "a directory as config": Case(lambda tmp: str(tmp), "Is a directory"),
    "a billion laughs": Case(BILLION_LAUGHS, "alias"),
    "a non-string key": Case("1: x\ntrust_domain: example.org\n", "1: unknown key"),
    "token_file is a directory": Case(lambda tmp: _yaml(tmp / "c.yaml", f"http:\n  admin:\n    token_file: {tmp}\n"),
                                      "http.admin.token_file"),
    "audit_log is a directory": Case(lambda tmp: _yaml(tmp / "c.yaml", f"http:\n  admin:\n    audit_log: {tmp}\n"),
                                     "http.admin.audit_log"),
    "a negative reissue_window": Case("rotation:\n  reissue_window: -5\n", "rotation.reissue_window"),
    "a negative root_min_propagation": Case("rotation:\n  root_min_propagation: -1s\n",
                                           "rotation.root_min_propagation"),
    "a zero refresh_hint": Case("bundle_endpoint:\n  refresh_hint: 0s\n", "bundle_endpoint.refresh_hint"),
    "a negative peer refresh_hint": Case(
        "federation:\n  peers:\n    - trust_domain: eu.example\n      profile: static\n"
        "      bundle_file: /etc/hostname\n      refresh_hint: -1\n", "federation.peers[0].refresh_hint"),
    "cacerts_dir under a file": Case(lambda tmp: _yaml(tmp / "c.yaml", "istiod:\n  cacerts_dir: /etc/hostname/x\n"),
                                     "istiod.cacerts_dir"),
    "a NUL in a path": Case('federation:\n  bundle_dir: "a\\0b"\n', "federation.bundle_dir"),
}


@pytest.mark.parametrize("case", CONFIG_CASES.values(), ids=CONFIG_CASES.keys())
def test_a_bad_config_exits_2_with_one_clear_line_and_no_traceback(tmp_path: Path, case: Case) -> None:
    if callable(case.config):
        config = case.config(tmp_path)
    else:
        path = tmp_path / "ca-service.yaml"
        path.write_bytes(case.config if isinstance(case.config, bytes) else case.config.encode())
        config = str(path)
    proc = run_cli("--config", config, "--data-dir", str(tmp_path / "data"), "status", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert case.expect in proc.stderr
    problems = [line for line in proc.stderr.splitlines() if line.startswith("  - ")]
    assert problems and all(len(line) < 600 for line in problems), proc.stderr


def test_an_unwritable_cacerts_dir_is_a_config_error(tmp_path: Path) -> None:
    cacerts = tmp_path / "cacerts"
    cacerts.mkdir()
    config = _yaml(tmp_path / "c.yaml", f"istiod:\n  cacerts_dir: {cacerts}\n")
    with read_only(cacerts):
        proc = run_cli("--config", config, "--data-dir", str(tmp_path / "data"), "status", cwd=tmp_path)
    assert proc.returncode == 2 and "istiod.cacerts_dir" in proc.stderr and "not writable" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_status_on_a_read_only_state_directory_reads_the_state_and_says_it_is_read_only(tmp_path: Path) -> None:
    data = tmp_path / "data"
    assert run_cli("--data-dir", str(data), "init", cwd=tmp_path).returncode == 0
    with read_only(data):
        proc = run_cli("--data-dir", str(data), "status", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "not writable" in proc.stderr and "intermediate" in proc.stdout


def test_serve_on_a_read_only_data_directory_is_one_clear_line_and_exit_1(tmp_path: Path) -> None:
    data = tmp_path / "data"
    assert run_cli("--data-dir", str(data), "init", cwd=tmp_path).returncode == 0
    with read_only(data):
        proc = run_cli("--data-dir", str(data), "serve", "--grpc-address", "127.0.0.1:0", "--http-address",
                       "127.0.0.1:0", "--bundle-address", "127.0.0.1:0", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ca-service serve:") and "Read-only file system" in last, last


@pytest.mark.parametrize("flag", ["--grpc-address", "--http-address", "--bundle-address"])
def test_a_busy_port_is_one_clear_line_naming_the_address_and_exit_1(tmp_path: Path, flag: str) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        addresses = {f: "127.0.0.1:0" for f in ("--grpc-address", "--http-address", "--bundle-address")}
        addresses[flag] = f"127.0.0.1:{port}"
        args = [item for pair in addresses.items() for item in pair]
        proc = run_cli("--data-dir", str(tmp_path / "data"), "serve", *args, cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ca-service serve:") and str(port) in last and "in use" in last, last


def test_a_billion_laughs_in_an_environment_variable_fails_fast_too(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CA_SERVICE_")}
    env["CA_SERVICE_TRUST_DOMAIN"] = BILLION_LAUGHS
    proc = subprocess.run([sys.executable, "-m", "ca_service", "--data-dir", str(tmp_path / "data"), "status"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=CLI_TIMEOUT)
    assert proc.returncode == 2 and "trust_domain" in proc.stderr and "Traceback" not in proc.stderr
