"""Tests of tests/envoy_harness/ against the real Envoy and a tiny test-only SDS server.

The SDS server here is deliberately minimal (state of the world only, each name answered once per
stream, stream kept open); the project's real SDS server lives in ca_service.rpc.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import AsyncIterator, Awaitable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc
from google.protobuf import any_pb2

from tests.envoy_harness import (
    NODE_ID_HEADER,
    PEER_SERIAL_HEADER,
    PEER_URI_SAN_HEADER,
    UPSTREAM_PEER_URI_SAN_HEADER,
    ClientListener,
    EnvoyConfig,
    EnvoyHarnessError,
    EnvoyProcess,
    EnvoyTimeoutError,
    NodeIdentity,
    SdsApi,
    SdsServer,
    SdsTls,
    ServerListener,
    find_envoy_binary,
    free_port,
    http_get,
    sds_stat_prefix,
)

SECRET_TYPE_URL = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
NODE_A = NodeIdentity(service_account="a")
NODE_B = NodeIdentity(service_account="b")
TRUST_DOMAIN_BUNDLE = "spiffe://cluster.local"


# ---------------------------------------------------------------- test PKI


@dataclass(frozen=True)
class Issued:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )


@dataclass(frozen=True)
class Pki:
    root: Issued
    leaves: Mapping[str, Issued]  # service account -> SVID


def _build_root(now: datetime) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "harness test root")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(cert, key)


def _build_svid(root: Issued, spiffe_id: str, now: datetime) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(root.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(hours=1))
        # Empty subject, so the SAN is critical (X509-SVID / RFC 5280).
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]), critical=True)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(root.key.public_key()), critical=False)
        .sign(root.key, hashes.SHA256())
    )
    return Issued(cert, key)


@pytest.fixture(scope="module")
def pki() -> Pki:
    now = datetime.now(UTC)
    root = _build_root(now)
    leaves = {sa: _build_svid(root, f"spiffe://cluster.local/ns/default/sa/{sa}", now) for sa in ("a", "b")}
    return Pki(root, leaves)


# ---------------------------------------------------------------- test-only SDS server


def _tls_certificate_secret(name: str, svid: Issued) -> secret_pb2.Secret:
    return secret_pb2.Secret(
        name=name,
        tls_certificate=common_pb2.TlsCertificate(
            certificate_chain=base_pb2.DataSource(inline_bytes=svid.cert_pem),
            private_key=base_pb2.DataSource(inline_bytes=svid.key_pem),
        ),
    )


def _validation_secret(name: str, root: Issued) -> secret_pb2.Secret:
    return secret_pb2.Secret(
        name=name,
        validation_context=common_pb2.CertificateValidationContext(
            trusted_ca=base_pb2.DataSource(inline_bytes=root.cert_pem)
        ),
    )


@dataclass
class StaticSds(sds_pb2_grpc.SecretDiscoveryServiceServicer):  # type: ignore[misc]
    """SotW StreamSecrets: each requested name is answered once per stream; the stream stays open.

    ``default`` is the SVID of the caller's SERVICE_ACCOUNT (from node metadata; service account
    ``broken`` gets a certificate with the wrong key); ``ROOTCA`` and
    ``spiffe://cluster.local`` are the root.  ``nodes`` records every node seen, ``nacks`` every NACK.
    """

    pki: Pki
    nodes: list[tuple[str, str]] = field(default_factory=list)  # (node id, SERVICE_ACCOUNT)
    nacks: list[str] = field(default_factory=list)

    def secret_for(self, service_account: str, name: str) -> secret_pb2.Secret | None:
        if name == "default" and service_account == "broken":
            garbage = Issued(self.pki.leaves["a"].cert, ec.generate_private_key(ec.SECP256R1()))
            return _tls_certificate_secret(name, garbage)  # key does not match the cert: Envoy NACKs
        if name == "default" and service_account in self.pki.leaves:
            return _tls_certificate_secret(name, self.pki.leaves[service_account])
        if name in ("ROOTCA", TRUST_DOMAIN_BUNDLE):
            return _validation_secret(name, self.pki.root)
        return None  # unknown: stay silent, as a server without that secret would

    async def StreamSecrets(
        self,
        request_iterator: AsyncIterator[discovery_pb2.DiscoveryRequest],
        context: grpc.aio.ServicerContext[discovery_pb2.DiscoveryRequest, discovery_pb2.DiscoveryResponse],
    ) -> AsyncIterator[discovery_pb2.DiscoveryResponse]:
        service_account = ""
        answered: set[str] = set()
        async for request in request_iterator:
            if request.HasField("node"):  # only the first request carries it
                service_account = request.node.metadata.fields["SERVICE_ACCOUNT"].string_value
                self.nodes.append((request.node.id, service_account))
            if request.HasField("error_detail"):
                self.nacks.append(request.error_detail.message)
                continue
            for name in request.resource_names:
                secret = self.secret_for(service_account, name)
                if name in answered or secret is None:
                    continue
                answered.add(name)
                resource = any_pb2.Any()
                resource.Pack(secret)
                yield discovery_pb2.DiscoveryResponse(
                    version_info="1",
                    nonce=f"n{len(answered)}",
                    type_url=SECRET_TYPE_URL,
                    resources=[resource],
                )


@dataclass
class RunningSds:
    servicer: StaticSds
    port: int | None = None
    uds_path: Path | None = None

    def server(self, **options: Any) -> SdsServer:
        if self.uds_path is not None:
            return SdsServer.uds(self.uds_path, **options)
        assert self.port is not None
        return SdsServer.tcp(self.port, **options)


class StartSds(Protocol):
    def __call__(
        self, *, uds_path: Path | None = None, credentials: grpc.ServerCredentials | None = None
    ) -> Awaitable[RunningSds]: ...


@pytest.fixture
async def start_sds(pki: Pki) -> AsyncIterator[StartSds]:
    """``await start_sds(uds_path=..., credentials=...)`` starts a StaticSds; all are stopped at teardown."""
    servers: list[grpc.aio.Server] = []

    async def start(*, uds_path: Path | None = None, credentials: grpc.ServerCredentials | None = None) -> RunningSds:
        servicer = StaticSds(pki)
        server = grpc.aio.server()
        sds_pb2_grpc.add_SecretDiscoveryServiceServicer_to_server(servicer, server)
        address = f"unix:{uds_path}" if uds_path else "127.0.0.1:0"
        if credentials is not None:
            port = server.add_secure_port(address, credentials)
        else:
            port = server.add_insecure_port(address)
        await server.start()
        servers.append(server)
        return RunningSds(servicer, port=None if uds_path else port, uds_path=uds_path)

    yield start
    for server in servers:
        await server.stop(grace=None)


@pytest.fixture
async def sds(start_sds: StartSds) -> RunningSds:
    return await start_sds()


async def _start_pair(
    tmp_path: Path,
    sds_server: SdsServer,
    *,
    pins: tuple[str, ...],
    server: ServerListener | None = None,
    new_handshake_per_request: bool = True,
) -> tuple[EnvoyProcess, EnvoyProcess]:
    """Start B (mTLS server) then A (client listener ``to-b`` towards B); caller must stop both."""
    envoy_b = EnvoyProcess(EnvoyConfig(NODE_B, sds_server, server_listener=server or ServerListener()), tmp_path / "b")
    await envoy_b.start()
    try:
        to_b = ClientListener(
            "to-b", await envoy_b.server_port(), pins, new_handshake_per_request=new_handshake_per_request
        )
        envoy_a = EnvoyProcess(EnvoyConfig(NODE_A, sds_server, client_listeners=(to_b,)), tmp_path / "a")
        await envoy_a.start()
    except BaseException:
        await envoy_b.stop()
        raise
    return envoy_a, envoy_b


async def _wait_for_svid_and_roots(*envoys: EnvoyProcess) -> None:
    for envoy in envoys:
        await envoy.wait_for_secret("default")
        await envoy.wait_for_secret("ROOTCA")
        await envoy.wait_for_certificate(uri_san=envoy.config.node.spiffe_id)


# ---------------------------------------------------------------- tests without a running Envoy


def test_free_port_returns_a_loopback_port_that_can_be_bound() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_find_envoy_binary_returns_the_real_executable_not_the_python_shim() -> None:
    binary = find_envoy_binary()
    assert binary.read_bytes()[:4] == b"\x7fELF", binary
    version = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True).stdout
    assert "/1.40." in version


def test_sds_stat_prefix_sanitises_colons_as_envoy_does() -> None:
    assert sds_stat_prefix("default") == "sds.default"
    assert sds_stat_prefix("spiffe://cluster.local") == "sds.spiffe_cluster.local"
    assert sds_stat_prefix("spiffe://td/ns/x/sa/y") == "sds.spiffe_td/ns/x/sa/y"
    assert sds_stat_prefix("a:/b:c") == "sds.a_b_c"


def test_sds_server_needs_exactly_one_address() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        SdsServer()
    with pytest.raises(ValueError, match="exactly one"):
        SdsServer(port=1, uds_path=Path("/tmp/x"))


def test_client_listener_names_must_be_unique() -> None:
    listener = ClientListener("to-b", 1)
    with pytest.raises(ValueError, match="unique"):
        EnvoyConfig(NODE_A, SdsServer.tcp(1), client_listeners=(listener, listener))


def test_node_identity_renders_istio_style_id_and_metadata() -> None:
    node = NodeIdentity(service_account="a", namespace="ns", extra_metadata={"CLUSTER_ID": "Kubernetes"})
    assert node.render() == {
        "id": "sidecar~127.0.0.1~a-pod.ns~ns.svc.cluster.local",
        "cluster": "a.ns",
        "metadata": {"NAMESPACE": "ns", "SERVICE_ACCOUNT": "a", "CLUSTER_ID": "Kubernetes"},
    }
    assert node.spiffe_id == "spiffe://cluster.local/ns/ns/sa/a"


def _tls_files(tmp_path: Path, pki: Pki) -> SdsTls:
    (tmp_path / "ca.pem").write_bytes(pki.root.cert_pem)
    (tmp_path / "cert.pem").write_bytes(pki.leaves["a"].cert_pem)
    (tmp_path / "key.pem").write_bytes(pki.leaves["a"].key_pem)
    return SdsTls(tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem")


@pytest.mark.envoy
@pytest.mark.parametrize("variant", ["tcp-sotw", "uds-delta", "tls-sds", "local-upstream", "trust-domain-validation"])
def test_every_rendered_bootstrap_variant_passes_envoy_validate_mode(variant: str, tmp_path: Path, pki: Pki) -> None:
    sds_server = {
        "uds-delta": SdsServer.uds(tmp_path / "sds.sock", api_type=SdsApi.DELTA_GRPC),
        "tls-sds": SdsServer.tcp(15012, tls=_tls_files(tmp_path, pki)),
    }.get(variant, SdsServer.tcp(15012))
    server = {
        "local-upstream": ServerListener(upstream_port=8080),
        "trust-domain-validation": ServerListener(validation_secret=TRUST_DOMAIN_BUNDLE),
    }.get(variant, ServerListener(allowed_peer_spiffe_ids=(NODE_A.spiffe_id,)))
    config = EnvoyConfig(
        NODE_B, sds_server, server_listener=server, client_listeners=(ClientListener("to-a", 1, ("x",)),)
    )
    path = tmp_path / "envoy.yaml"
    path.write_text(config.render_yaml())
    result = subprocess.run(
        [find_envoy_binary(), "--mode", "validate", "-c", path], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "deprecated" not in (result.stdout + result.stderr).lower()


# ---------------------------------------------------------------- tests with the real Envoy


@pytest.mark.envoy
async def test_two_envoys_receive_their_svid_and_roots_over_sds(tmp_path: Path, sds: RunningSds) -> None:
    envoy_a, envoy_b = await _start_pair(tmp_path, sds.server(), pins=(NODE_B.spiffe_id,))
    async with envoy_a, envoy_b:
        await _wait_for_svid_and_roots(envoy_a, envoy_b)

        for envoy, node in ((envoy_a, NODE_A), (envoy_b, NODE_B)):
            leaf = sds.servicer.pki.leaves[node.service_account].cert
            await envoy.wait_for_certificate(uri_san=node.spiffe_id, serial=leaf.serial_number, timeout=5)
            assert await envoy.secret_updates("default") == 1
            assert {"default", "ROOTCA"} <= (await envoy.active_secrets()).keys()
            served = {(cert.serial, cert.uri_sans) for chain in await envoy.certificate_chains() for cert in chain}
            assert served == {(leaf.serial_number, (node.spiffe_id,))}, await envoy.diagnostics()
        assert {(NODE_A.id, "a"), (NODE_B.id, "b")} <= set(sds.servicer.nodes)
        assert sds.servicer.nacks == []


@pytest.mark.envoy
async def test_a_request_through_a_client_listener_reaches_the_peer_mtls_listener(
    tmp_path: Path, sds: RunningSds
) -> None:
    envoy_a, envoy_b = await _start_pair(tmp_path, sds.server(), pins=(NODE_B.spiffe_id,))
    async with envoy_a, envoy_b:
        await _wait_for_svid_and_roots(envoy_a, envoy_b)

        response = await http_get(await envoy_a.client_url("to-b"))

        assert response.status == 200, f"{response}\n{await envoy_a.diagnostics()}"
        assert NODE_B.id in response.body
        assert response.headers[NODE_ID_HEADER] == NODE_B.id
        assert response.headers[PEER_URI_SAN_HEADER] == NODE_A.spiffe_id
        assert int(response.headers[PEER_SERIAL_HEADER], 16) == sds.servicer.pki.leaves["a"].cert.serial_number
        assert response.headers[UPSTREAM_PEER_URI_SAN_HEADER] == NODE_B.spiffe_id
        server_cert = response.upstream_peer_certificate()
        assert server_cert is not None
        assert server_cert.serial_number == sds.servicer.pki.leaves["b"].cert.serial_number
        assert await envoy_b.stat("listener.mtls_server.ssl.versions.TLSv1.3") == 1


@pytest.mark.envoy
async def test_a_pin_on_the_wrong_spiffe_id_fails_the_request(tmp_path: Path, sds: RunningSds) -> None:
    wrong = "spiffe://cluster.local/ns/default/sa/c"
    envoy_a, envoy_b = await _start_pair(tmp_path, sds.server(), pins=(wrong,))
    async with envoy_a, envoy_b:
        await _wait_for_svid_and_roots(envoy_a, envoy_b)

        response = await http_get(await envoy_a.client_url("to-b"))

        assert response.status == 503, response
        await envoy_a.wait_for_stat("cluster.to-b.ssl.fail_verify_san", lambda v: v >= 1, timeout=5)


@pytest.mark.envoy
async def test_a_server_pin_on_another_client_rejects_the_handshake(tmp_path: Path, sds: RunningSds) -> None:
    only_c = ServerListener(allowed_peer_spiffe_ids=("spiffe://cluster.local/ns/default/sa/c",))
    envoy_a, envoy_b = await _start_pair(tmp_path, sds.server(), pins=(NODE_B.spiffe_id,), server=only_c)
    async with envoy_a, envoy_b:
        await _wait_for_svid_and_roots(envoy_a, envoy_b)

        response = await http_get(await envoy_a.client_url("to-b"))

        assert response.status == 503, response
        await envoy_b.wait_for_stat("listener.mtls_server.ssl.fail_verify_san", lambda v: v >= 1, timeout=5)


@pytest.mark.envoy
@pytest.mark.parametrize(
    ("new_handshake_per_request", "server_resumption", "expected_handshakes"),
    [
        pytest.param(True, False, 3, id="per-request"),
        # max_session_keys: 0 alone keeps a resumption-capable server (a real sidecar) from resuming.
        pytest.param(True, True, 3, id="per-request-even-if-server-resumes"),
        pytest.param(False, False, 1, id="pooled"),
    ],
)
async def test_new_handshake_per_request_makes_every_request_a_full_handshake(
    tmp_path: Path, sds: RunningSds, new_handshake_per_request: bool, server_resumption: bool, expected_handshakes: int
) -> None:
    envoy_a, envoy_b = await _start_pair(
        tmp_path,
        sds.server(),
        pins=(NODE_B.spiffe_id,),
        server=ServerListener(session_resumption=server_resumption),
        new_handshake_per_request=new_handshake_per_request,
    )
    async with envoy_a, envoy_b:
        await _wait_for_svid_and_roots(envoy_a, envoy_b)
        url = await envoy_a.client_url("to-b")

        for _ in range(3):
            assert (await http_get(url)).status == 200

        stats = await envoy_b.stats(r"^listener\.mtls_server\.ssl\.(handshake|session_reused)$")
        assert stats.get("listener.mtls_server.ssl.handshake") == expected_handshakes, stats
        assert stats.get("listener.mtls_server.ssl.session_reused", 0) == 0, stats


@pytest.mark.envoy
async def test_sds_over_a_unix_socket_delivers_secrets(tmp_path: Path, start_sds: StartSds) -> None:
    running = await start_sds(uds_path=tmp_path / "sds.sock")
    config = EnvoyConfig(NODE_B, running.server(), server_listener=ServerListener())
    async with EnvoyProcess(config, tmp_path / "b") as envoy:
        await _wait_for_svid_and_roots(envoy)


@pytest.mark.envoy
async def test_sds_over_mutual_tls_delivers_secrets(tmp_path: Path, pki: Pki, start_sds: StartSds) -> None:
    credentials = grpc.ssl_server_credentials(
        [(pki.leaves["b"].key_pem, pki.leaves["b"].cert_pem)],
        root_certificates=pki.root.cert_pem,
        require_client_auth=True,
    )
    running = await start_sds(credentials=credentials)
    tls = _tls_files(tmp_path, pki)
    tls = SdsTls(tls.ca_file, tls.cert_file, tls.key_file, server_uri_san=NODE_B.spiffe_id)
    config = EnvoyConfig(NODE_B, running.server(tls=tls), server_listener=ServerListener())
    async with EnvoyProcess(config, tmp_path / "b") as envoy:
        await _wait_for_svid_and_roots(envoy)


@pytest.mark.envoy
async def test_a_trust_domain_named_secret_is_tracked_under_its_sanitised_stat_name(
    tmp_path: Path, sds: RunningSds
) -> None:
    server = ServerListener(validation_secret=TRUST_DOMAIN_BUNDLE)
    async with EnvoyProcess(EnvoyConfig(NODE_B, sds.server(), server_listener=server), tmp_path / "b") as envoy:
        assert await envoy.wait_for_secret(TRUST_DOMAIN_BUNDLE) >= 1
        assert TRUST_DOMAIN_BUNDLE in await envoy.active_secrets()


@pytest.mark.envoy
async def test_waiting_for_a_secret_the_server_never_sends_times_out_with_the_log_tail(
    tmp_path: Path, sds: RunningSds
) -> None:
    stranger = NodeIdentity(service_account="nobody")  # StaticSds has no SVID for it
    config = EnvoyConfig(stranger, sds.server(), server_listener=ServerListener())
    async with EnvoyProcess(config, tmp_path / "x") as envoy:
        with pytest.raises(EnvoyTimeoutError) as caught:
            await envoy.wait_for_secret("default", timeout=1)
    message = str(caught.value)
    assert "sds.default.update_success = 0 after 1" in message
    assert "envoy.log" in message
    assert stranger.id in message


@pytest.mark.envoy
async def test_waiting_for_a_certificate_envoy_rejects_fails_at_once_with_the_reason(
    tmp_path: Path, sds: RunningSds
) -> None:
    broken = NodeIdentity(service_account="broken")  # StaticSds sends a certificate with the wrong key
    config = EnvoyConfig(broken, sds.server(), server_listener=ServerListener())
    async with EnvoyProcess(config, tmp_path / "x") as envoy:
        with pytest.raises(EnvoyHarnessError, match="rejected") as caught:
            await envoy.wait_for_certificate(uri_san=NODE_A.spiffe_id, timeout=10)
        assert await envoy.rejections() == 1
    assert not isinstance(caught.value, EnvoyTimeoutError)
    assert "KEY_VALUES_MISMATCH" in str(caught.value)
    assert len(sds.servicer.nacks) == 1


@pytest.mark.envoy
async def test_a_failed_start_reports_the_log_and_leaves_no_process(tmp_path: Path, sds: RunningSds) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = EnvoyConfig(NODE_B, sds.server(), server_listener=ServerListener(port=port))
        envoy = EnvoyProcess(config, tmp_path / "b")
        with pytest.raises(EnvoyHarnessError, match="exited with code") as caught:
            await envoy.start()
    assert "envoy" in str(caught.value).lower()
    with pytest.raises(ProcessLookupError):
        os.kill(envoy.pid, 0)


@pytest.mark.envoy
async def test_leaving_the_context_stops_envoy_even_when_the_body_fails(tmp_path: Path, sds: RunningSds) -> None:
    envoy = EnvoyProcess(EnvoyConfig(NODE_B, sds.server(), server_listener=ServerListener()), tmp_path / "b")
    with pytest.raises(RuntimeError, match="boom"):
        async with envoy:
            raise RuntimeError("boom")
    with pytest.raises(ProcessLookupError):
        os.kill(envoy.pid, 0)
