"""SPIFFE ID and trust domain rules (SPIFFE-ID spec 2.1-2.3); every rejection quotes the bad input."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import pytest

from ca_service.pki.identity import InvalidSpiffeIdError, SpiffeId, TrustDomain

VALID_IDS: dict[str, str] = {
    "a trust domain alone is a valid ID": "spiffe://cluster.local",
    "an Istio service-account ID is valid": "spiffe://cluster.local/ns/default/sa/web",
    "digits, dash, dot and underscore are allowed in a trust domain": "spiffe://a-b_c.9.local/x",
    "uppercase letters are allowed in the path": "spiffe://td/Ns/DEFAULT",
    "dots inside a segment are allowed": "spiffe://td/a.b/..c/d..",
    "a single-character trust domain is valid": "spiffe://t/p",
    "an ID of exactly 2048 bytes is valid": "spiffe://td/" + "a" * (2048 - len("spiffe://td/")),
    "a deep path is valid": "spiffe://td/" + "/".join(["s"] * 50),
}

INVALID_IDS: dict[str, tuple[str, str]] = {
    "an empty string is rejected": ("", "empty"),
    "a wrong scheme is rejected": ("https://cluster.local/ns/a", "must start with"),
    "an uppercase scheme is rejected": ("SPIFFE://cluster.local/ns/a", "must start with"),
    "a missing scheme is rejected": ("cluster.local/ns/a", "must start with"),
    "a single slash after the scheme is rejected": ("spiffe:/cluster.local/a", "must start with"),
    "an uppercase trust domain is rejected": ("spiffe://Cluster.local/a", "lowercase"),
    "a port is rejected": ("spiffe://cluster.local:8080/a", "port"),
    "userinfo is rejected": ("spiffe://user@cluster.local/a", "userinfo"),
    "userinfo with password is rejected": ("spiffe://user:pw@cluster.local/a", "must not contain"),
    "a query is rejected": ("spiffe://cluster.local/a?x=1", "query"),
    "a fragment is rejected": ("spiffe://cluster.local/a#frag", "fragment"),
    "percent-encoding in the path is rejected": ("spiffe://cluster.local/a%20b", "percent-encoding"),
    "percent-encoding in the trust domain is rejected": ("spiffe://clu%73ter.local/a", "percent-encoded"),
    "an empty segment is rejected": ("spiffe://cluster.local/a//b", "empty path segment"),
    "a '.' segment is rejected": ("spiffe://cluster.local/a/./b", "'.' path segment"),
    "a '..' segment is rejected": ("spiffe://cluster.local/a/../b", "'..' path segment"),
    "a trailing slash is rejected": ("spiffe://cluster.local/a/", "must not end with '/'"),
    "a bare trailing slash after the trust domain is rejected": ("spiffe://cluster.local/", "must not end with '/'"),
    "an empty trust domain is rejected": ("spiffe:///a", "empty"),
    "an ID over 2048 bytes is rejected": ("spiffe://td/" + "a" * 2040, "longer than 2048"),
    "a space in the path is rejected": ("spiffe://cluster.local/a b", "contains"),
    "a non-ASCII path is rejected": ("spiffe://cluster.local/caf\u00e9", "contains"),
    "a colon in the path is rejected": ("spiffe://cluster.local/a:b", "contains"),
    "a non-ASCII trust domain is rejected": ("spiffe://b\u00fccher.de/a", "contains"),
    "a trust domain with a space is rejected": ("spiffe://clu ster/a", "contains"),
    "a trust domain over 255 bytes is rejected": ("spiffe://" + "a" * 256 + "/x", "longer than 255"),
}

VALID_TDS = ["cluster.local", "us.cluster.local", "eu.cluster.local", "a_b-c.9", "x"]

INVALID_TDS: dict[str, tuple[str, str]] = {
    "an empty trust domain name is rejected": ("", "empty"),
    "a trust domain given as a URI is rejected": ("spiffe://cluster.local", "bare name"),
    "an uppercase trust domain name is rejected": ("Cluster.Local", "lowercase"),
    "a trust domain with a port is rejected": ("cluster.local:443", "port"),
    "a trust domain with a path is rejected": ("cluster.local/ns", "path"),
    "a trust domain with userinfo is rejected": ("me@cluster.local", "userinfo"),
}


@pytest.mark.parametrize("case", list(VALID_IDS))
def test_valid_spiffe_ids_parse_and_round_trip(case: str) -> None:
    value = VALID_IDS[case]
    parsed = SpiffeId.parse(value)
    assert str(parsed) == value
    assert SpiffeId.parse(str(parsed)) == parsed


@pytest.mark.parametrize("case", list(INVALID_IDS))
def test_invalid_spiffe_ids_are_rejected_quoting_the_input(case: str) -> None:
    value, reason = INVALID_IDS[case]
    with pytest.raises(InvalidSpiffeIdError) as info:
        SpiffeId.parse(value)
    message = str(info.value)
    assert reason in message
    if value:
        # The input is quoted (truncated when very long) so the operator can find it.
        assert repr(value)[:60] in message or repr(value[:117] + "...")[:60] in message


@pytest.mark.parametrize("name", VALID_TDS)
def test_valid_trust_domains(name: str) -> None:
    td = TrustDomain(name)
    assert str(td) == name
    assert str(td.id) == f"spiffe://{name}"


@pytest.mark.parametrize("case", list(INVALID_TDS))
def test_invalid_trust_domains_are_rejected_quoting_the_input(case: str) -> None:
    value, reason = INVALID_TDS[case]
    with pytest.raises(InvalidSpiffeIdError, match=reason) as info:
        TrustDomain(value)
    if value:
        assert repr(value) in str(info.value)


def test_there_are_at_least_thirty_spiffe_id_cases() -> None:
    assert len(VALID_IDS) + len(INVALID_IDS) + len(VALID_TDS) + len(INVALID_TDS) >= 30


def test_a_path_without_leading_slash_is_rejected_by_the_constructor() -> None:
    with pytest.raises(InvalidSpiffeIdError, match="must start with '/'"):
        SpiffeId(TrustDomain("td"), "ns/a")


def test_non_strings_are_a_type_error() -> None:
    with pytest.raises(TypeError):
        SpiffeId.parse(b"spiffe://td/a")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        TrustDomain(42)  # type: ignore[arg-type]


def test_service_account_ids_have_istio_shape() -> None:
    sid = SpiffeId.for_service_account(TrustDomain("cluster.local"), "default", "web")
    assert str(sid) == "spiffe://cluster.local/ns/default/sa/web"
    assert sid.kubernetes == ("default", "web")
    assert SpiffeId.parse("spiffe://cluster.local/workload").kubernetes is None


def test_membership_is_by_trust_domain() -> None:
    sid = SpiffeId.parse("spiffe://us.cluster.local/a")
    assert sid.is_member_of(TrustDomain("us.cluster.local"))
    assert not sid.is_member_of(TrustDomain("eu.cluster.local"))


def test_a_spiffe_id_caches_its_hash_but_never_sends_it_to_another_process() -> None:
    # str hashes are salted per process: a hash cached here and unpickled in a worker would miss every
    # dict lookup there.  The child runs with another salt and looks the unpickled ID up by a fresh one.
    spiffe_id = SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/web")
    assert {spiffe_id: 1}[SpiffeId.parse(str(spiffe_id))] == 1 and spiffe_id.kubernetes == ("shop", "web")
    assert not hasattr(spiffe_id, "__dict__")  # slots: 100k workloads' IDs carry no dict each
    assert SpiffeId.parse("spiffe://cluster.local/a/b").kubernetes is None
    assert spiffe_id == SpiffeId.parse(str(spiffe_id)) and spiffe_id < SpiffeId.parse("spiffe://cluster.local/z")
    child = (
        "import pickle, sys\n"
        "from ca_service.pki.identity import SpiffeId\n"
        "received = pickle.loads(sys.stdin.buffer.read())\n"
        "print({SpiffeId.parse(str(received)): 'found'}.get(received, 'missed'), received.kubernetes)\n")
    out = subprocess.run([sys.executable, "-c", child], input=pickle.dumps(spiffe_id), capture_output=True,
                         env={**os.environ, "PYTHONHASHSEED": other_seed()}, check=True, timeout=60)
    assert out.stdout.decode().split() == ["found", "('shop',", "'web')"]


def other_seed() -> str:
    """A hash seed other than this process's (if it has a fixed one; a random one differs anyway)."""
    return "12345" if os.environ.get("PYTHONHASHSEED") != "12345" else "54321"
