"""An istio-agent-like client end to end: key + CSR per pod, first contact with its token over TLS (server
verified by DNS name against the mounted root), renewals over mTLS with its SVID, across a root rotation."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509

from ca_service.pki.certs import spiffe_id_of
from ca_service.pki.verify import verify_svid
from ca_service.rotation.planner import RotationPolicy
from ca_service.rotation.transitions import publish_root, sign_with_new_root
from tests.rpc.istio_fixtures import IstioStack, Kube, Workload, create, csr_pem, identity_pem, new_key, pem_certs

TLS, MTLS = 0, 1


@dataclass
class Agent:
    """What istio-agent keeps per pod: its workload, the mounted root, and its current key + chain."""

    workload: Workload
    root_pem: bytes
    key: Any = None
    chain: list[str] = field(default_factory=list)

    @property
    def own_id(self) -> str:
        return f"spiffe://cluster.local{self.workload.path}"

    async def first_contact(self, stack: IstioStack) -> None:
        self.key = new_key()
        async with stack.channel(TLS) as channel:  # verifies ca-service.istio-system.svc against our root
            self.chain = await create(channel, csr_pem(self.key, self.own_id), token=self.workload.token)

    async def renew(self, stack: IstioStack) -> None:
        key = new_key()  # a fresh key per rotation, as istio-agent does
        async with stack.channel(MTLS, identity=identity_pem(self.key, self.chain)) as channel:
            self.chain = await create(channel, csr_pem(key, self.own_id), token=None, cluster=None)
        self.key = key
        self.root_pem = self.chain[-1].encode()  # the agent takes its roots from the last element

    def check(self, now: dt.datetime) -> list[x509.Certificate]:
        roots = x509.load_pem_x509_certificates(self.chain[-1].encode())
        certs = [pem_certs(pem)[0] for pem in self.chain[:-1]]
        assert str(verify_svid(certs[0], certs[1:], roots, now=now)) == self.own_id
        return roots


async def test_an_agent_gets_renews_over_mtls_and_rides_through_a_root_rotation(istio: IstioStack,
                                                                               kube: Kube) -> None:
    ns = kube.cluster.fresh_namespace("agent")
    agents = [Agent(kube.workload(ns), istio.root_pem()) for _ in range(3)]
    now = dt.datetime.now(dt.UTC)
    for agent in agents:
        await agent.first_contact(istio)
        assert len(agent.check(now)) == 1
    reviews = istio.metric("ca_token_reviews_total", result="accepted")
    for agent in agents:
        await agent.renew(istio)
        assert len(agent.check(now)) == 1
    assert istio.metric("ca_token_reviews_total", result="accepted") == reviews  # renewals need no token

    policy = RotationPolicy.from_settings(istio.settings)
    old_root = istio.authority.bundle().roots[0]
    istio.authority.commit(publish_root(istio.authority.state, now, policy, reason="test"))
    for agent in agents:
        await agent.renew(istio)
        roots = agent.check(now)
        assert len(roots) == 2 and old_root in roots  # the last element carries both roots (A+B)
        assert pem_certs(agent.chain[1])[0].issuer == old_root.subject  # still signed under A
    istio.authority.commit(sign_with_new_root(istio.authority.state, now, policy))
    for agent in agents:
        await agent.renew(istio)  # presents its A-signed SVID; gets one under B, with A+B as roots
        roots = agent.check(now)
        assert len(roots) == 2
        assert pem_certs(agent.chain[1])[0].issuer != old_root.subject
    assert {str(spiffe_id_of(pem_certs(a.chain[0])[0])) for a in agents} == {a.own_id for a in agents}
    issued = [r for r in istio.istio.ledger.live(now) if r.path == "istio-ca"]
    assert len(issued) == 3 * 4
    assert {r.method for r in issued} == {"kubernetes-jwt", "peer-certificate"}
