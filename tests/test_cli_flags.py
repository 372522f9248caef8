"""Command-line flags: global options anywhere, and ``serve --grpc-address`` moves an address without
loosening the listener's security (issue 15, item 1). The daemon is the real console in a subprocess."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc

from tests.processes import read_until, stop
from tests.rpc.sds_fixtures import node

REPO = Path(__file__).resolve().parents[1]
SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("CA_SERVICE_CONFIG", None)
    return env


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ca_service", *args], capture_output=True, text=True, env=_env(),
                          cwd=cwd, timeout=60, check=False)


def test_global_options_are_accepted_after_the_subcommand(tmp_path: Path) -> None:
    config = tmp_path / "ca.yaml"
    config.write_text("trust_domain: after.example\n")
    init = _cli("init", "--config", str(config), "--data-dir", str(tmp_path / "data"), cwd=tmp_path)
    assert init.returncode == 0, init.stderr
    status = _cli("status", "--config", str(config), "--data-dir", str(tmp_path / "data"), "--json", cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    assert "after.example" in status.stdout


def test_a_global_option_before_the_subcommand_is_not_reset_by_the_subcommand(tmp_path: Path) -> None:
    config = tmp_path / "ca.yaml"
    config.write_text("trust_domain: before.example\n")
    init = _cli("--config", str(config), "--data-dir", str(tmp_path / "data"), "init", cwd=tmp_path)
    assert init.returncode == 0, init.stderr
    status = _cli("--data-dir", str(tmp_path / "data"), "--config", str(config), "status", cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    assert "before.example" in status.stdout


@pytest.fixture
def locked_down_daemon(tmp_path: Path) -> Iterator[str]:
    """A daemon whose config trusts no node metadata and admits only namespace `default`, moved by
    ``--grpc-address`` to loopback; yields the bound SDS address."""
    config = tmp_path / "ca.yaml"
    config.write_text(
        "grpc:\n"
        "  - address: 127.0.0.1:15999\n"
        "    trust_node_metadata: false\n"
        "    policy: {allowed_namespaces: [default]}\n"
    )
    args = [sys.executable, "-m", "ca_service", "--data-dir", str(tmp_path / "data"), "serve", "--config", str(config),
            "--grpc-address", "127.0.0.1:0", "--http-address", "127.0.0.1:0", "--bundle-address", "127.0.0.1:0"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_env(), cwd=tmp_path)
    try:
        seen = read_until(proc, b"ca-service ready")
        bound = re.search(rb"SDS listening address=(\S+) tls=(\S+) trust_node_metadata=(\S+)", seen)
        assert bound is not None, seen.decode()
        assert bound[3] == b"False", "the flag turned on trust in node metadata"
        yield bound[1].decode()
    finally:
        stop(proc)


async def test_grpc_address_flag_does_not_let_node_metadata_claim_an_identity(locked_down_daemon: str) -> None:
    async with grpc.aio.insecure_channel(locked_down_daemon) as channel:
        stub = sds_pb2_grpc.SecretDiscoveryServiceStub(channel)
        request = discovery_pb2.DiscoveryRequest(node=node("admin", "kube-system"), resource_names=["default"],
                                                 type_url=SECRET_TYPE)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.FetchSecrets(request, timeout=10)
    assert refused.value.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


def test_grpc_address_flag_refuses_to_expose_a_metadata_trusting_listener(tmp_path: Path) -> None:
    proc = _cli("--data-dir", str(tmp_path / "data"), "serve", "--grpc-address", "0.0.0.0:15012", cwd=tmp_path)
    assert proc.returncode == 2
    assert "trusts Envoy node metadata" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "data" / "state").exists(), "nothing may start before the flags are validated"
