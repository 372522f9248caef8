"""CreateCertificate end to end on a real grpc.aio server over TLS, with tokens reviewed by a real kube-apiserver."""

from __future__ import annotations

import subprocess
from pathlib import Path

import grpc
import pytest
from spiffe.svid.x509_svid import X509Svid

from ca_service.pki.certs import spiffe_id_of
from tests.rpc.istio_fixtures import IstioStack, Kube, create, csr_pem, identity_pem, new_key, pem_certs


async def test_a_valid_token_gets_a_chain_that_openssl_and_py_spiffe_accept(
        istio: IstioStack, kube: Kube, tmp_path: Path) -> None:
    ns = kube.cluster.fresh_namespace("ica")
    workload = kube.workload(ns)
    key = new_key()
    async with istio.channel() as channel:
        chain = await create(channel, csr_pem(key), token=workload.token)
    expected = f"spiffe://{istio.trust_domain}{workload.path}"
    assert len(chain) == 3  # leaf, intermediate, roots
    assert [str(spiffe_id_of(pem_certs(chain[0])[0]))] == [expected]
    (tmp_path / "roots.pem").write_text(chain[-1])
    (tmp_path / "chain.pem").write_text("".join(chain[1:-1]))
    (tmp_path / "leaf.pem").write_text(chain[0])
    proc = subprocess.run(["openssl", "verify", "-x509_strict", "-purpose", "sslclient", "-CAfile",
                           str(tmp_path / "roots.pem"), "-untrusted", str(tmp_path / "chain.pem"),
                           str(tmp_path / "leaf.pem")], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    key_pem, chain_pem = identity_pem(key, chain)
    svid = X509Svid.parse(chain_pem, key_pem)
    assert str(svid.spiffe_id) == expected
    assert istio.metric("ca_token_reviews_total", result="accepted") == 1


async def test_the_requested_validity_is_granted_up_to_the_maximum_and_refused_above_it(
        istio: IstioStack, kube: Kube) -> None:
    workload = kube.workload(kube.cluster.fresh_namespace("ica"))
    async with istio.channel() as channel:
        chain = await create(channel, csr_pem(new_key()), token=workload.token, validity=3600)
        leaf = pem_certs(chain[0])[0]
        assert (leaf.not_valid_after_utc - leaf.not_valid_before_utc).total_seconds() == 3600 + 300  # + backdate
        too_long = int(istio.settings.ca.max_workload_ttl.total_seconds()) + 1
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await create(channel, csr_pem(new_key()), token=workload.token, validity=too_long)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT


def _refusals(kube: Kube) -> dict[str, tuple[dict[str, object], grpc.StatusCode]]:
    ns = kube.cluster.fresh_namespace("ica")
    good = kube.workload(ns)
    deleted = kube.workload(ns)
    kube.core.delete_namespaced_service_account(deleted.service_account, ns)
    wrong_audience = kube.token(ns, good.service_account, audiences=("https://kubernetes.default.svc.cluster.local",))
    head, payload, signature = good.token.split(".")
    tampered = f"{head}.{payload}.{signature[:-4]}AAAA"
    return {
        "if the token has the wrong audience, should refuse it": ({"token": wrong_audience},
                                                                  grpc.StatusCode.UNAUTHENTICATED),
        "if the service account was deleted, should refuse its token": ({"token": deleted.token},
                                                                        grpc.StatusCode.UNAUTHENTICATED),
        "if the token was tampered with, should refuse it": ({"token": tampered}, grpc.StatusCode.UNAUTHENTICATED),
        "if there is no authorization header, should refuse the call": ({"token": None},
                                                                        grpc.StatusCode.UNAUTHENTICATED),
        "if the ClusterID is unknown, should refuse the call": ({"token": good.token, "cluster": "elsewhere"},
                                                                grpc.StatusCode.UNAUTHENTICATED),
        "if the header is not a bearer token, should refuse the call": ({"token": "", "cluster": None},
                                                                        grpc.StatusCode.UNAUTHENTICATED),
        "if a workload asks to impersonate another, should deny it": (
            {"token": good.token, "struct": {"ImpersonatedIdentity": f"spiffe://cluster.local/ns/{ns}/sa/other"}},
            grpc.StatusCode.PERMISSION_DENIED),
    }


async def test_each_bad_credential_is_refused_with_an_opaque_status(istio: IstioStack, kube: Kube) -> None:
    cases = _refusals(kube)
    async with istio.channel() as channel:
        for case, (kwargs, code) in cases.items():
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await create(channel, csr_pem(new_key()), **kwargs)  # type: ignore[arg-type]
            assert caught.value.code() is code, case
            # Opaque: nothing about tokens, clusters or identities reaches the client.
            assert caught.value.details() in ("caller could not be authenticated",
                                              "caller is not entitled to this resource"), case
    assert istio.metric("ca_token_review_cache_hits_total") == 0  # negative reviews are never cached
    assert not [r for r in istio.istio.ledger.live(istio.authority.clock.now()) if r.path == "istio-ca"]


async def test_a_second_call_with_the_same_token_is_served_from_the_review_cache(
        istio: IstioStack, kube: Kube) -> None:
    workload = kube.workload(kube.cluster.fresh_namespace("ica"))
    async with istio.channel() as channel:
        for _ in range(3):
            await create(channel, csr_pem(new_key()), token=workload.token)
    assert istio.metric("ca_token_reviews_total", result="accepted") == 1
    assert istio.metric("ca_token_review_cache_hits_total") == 2


async def test_a_csr_naming_another_identity_is_invalid_even_with_a_valid_token(
        istio: IstioStack, kube: Kube) -> None:
    workload = kube.workload(kube.cluster.fresh_namespace("ica"))
    async with istio.channel() as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await create(channel, csr_pem(new_key(), "spiffe://cluster.local/ns/istio-system/sa/istiod"),
                         token=workload.token)
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        chain = await create(channel, csr_pem(new_key(), f"spiffe://cluster.local{workload.path}"),
                             token=workload.token)
    assert str(spiffe_id_of(pem_certs(chain[0])[0])) == f"spiffe://cluster.local{workload.path}"
    assert istio.metric("ca_istio_ca_rejections_total", reason="san-uri") == 1


async def test_the_server_certificate_names_the_dns_name_and_another_name_fails_verification(
        istio: IstioStack, kube: Kube) -> None:
    workload = kube.workload(kube.cluster.fresh_namespace("ica"))
    async with istio.channel(name="ca-service.other.svc") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await create(channel, csr_pem(new_key()), token=workload.token)
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE  # the TLS handshake failed on the name
