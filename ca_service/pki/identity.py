"""SPIFFE identities as validated value objects (SPIFFE-ID spec, sections 2.1-2.3).

A :class:`TrustDomain` or :class:`SpiffeId` that exists is valid: every rule is checked in the
constructor and a violation raises :class:`InvalidSpiffeIdError` quoting the input.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass, field

from ca_service.errors import InvalidRequestError

SCHEME = "spiffe://"
# The spec caps the whole URI at 2048 bytes so that it fits in every certificate and header.
MAX_SPIFFE_ID_BYTES = 2048
# Trust domain names are host-like; the spec bounds them by DNS's 255 octets.
MAX_TRUST_DOMAIN_BYTES = 255
_TD_CHARS = frozenset(string.ascii_lowercase + string.digits + ".-_")
_PATH_CHARS = frozenset(string.ascii_letters + string.digits + ".-_")
_K8S_PATH = re.compile(r"^/ns/(?P<ns>[^/]+)/sa/(?P<sa>[^/]+)$")


class InvalidSpiffeIdError(InvalidRequestError):
    """A trust domain or SPIFFE ID breaks a rule of the SPIFFE-ID spec."""


# The length checks encode with 'surrogatepass': a lone surrogate (JSON allows "\ud800") must be
# counted and then refused as a character, not crash the check with UnicodeEncodeError.
def _quote(value: str) -> str:
    return repr(value if len(value) <= 120 else value[:117] + "...")


@dataclass(frozen=True, order=True)
class TrustDomain:
    """A SPIFFE trust domain name such as ``us.cluster.local``.

    Raises:
        InvalidSpiffeIdError: if the name is empty, longer than 255 bytes, holds a character outside
            ``[a-z0-9._-]`` (uppercase included), or carries a scheme, port, userinfo or path.
    """

    name: str

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise TypeError(f"trust domain must be a str, got {type(self.name).__name__}")
        name = self.name
        if not name:
            raise InvalidSpiffeIdError("trust domain is empty")
        if "://" in name:
            raise InvalidSpiffeIdError(f"trust domain {_quote(name)} must be a bare name, not a URI")
        if len(name.encode("utf-8", "surrogatepass")) > MAX_TRUST_DOMAIN_BYTES:
            raise InvalidSpiffeIdError(f"trust domain {_quote(name)} is longer than {MAX_TRUST_DOMAIN_BYTES} bytes")
        for what, char in (("a port", ":"), ("userinfo", "@"), ("a path", "/"), ("a query", "?"), ("a fragment", "#")):
            if char in name:
                raise InvalidSpiffeIdError(f"trust domain {_quote(name)} must not contain {what} ({char!r})")
        if "%" in name:
            raise InvalidSpiffeIdError(f"trust domain {_quote(name)} must not be percent-encoded")
        bad = sorted(set(name) - _TD_CHARS)
        if bad:
            hint = " (trust domains are lowercase)" if any(c.isupper() for c in bad) else ""
            raise InvalidSpiffeIdError(
                f"trust domain {_quote(name)} contains {''.join(bad)!r}; allowed are a-z 0-9 . - _{hint}"
            )

    @property
    def id(self) -> SpiffeId:
        """The trust domain's own SPIFFE ID, ``spiffe://<name>`` (used as the SDS bundle resource name)."""
        return SpiffeId(self, "")

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True, order=True, slots=True)
class SpiffeId:
    """A SPIFFE ID: trust domain plus path (the path is ``""`` for the trust domain's own ID).

    Construct from a string with :meth:`parse`.

    Raises:
        InvalidSpiffeIdError: if the path does not start with ``/``, ends with ``/``, has an empty,
            ``.`` or ``..`` segment, holds a character outside ``[A-Za-z0-9._-]`` (percent-encoding
            included), or the whole ID exceeds 2048 bytes.
    """

    trust_domain: TrustDomain
    path: str = ""
    # Caches, not part of the identity (never compared, never pickled: see __reduce__).  In slots, so a
    # SPIFFE ID held by each of 100k workloads carries no dict.  The registry, the hub and the sessions look
    # an ID up a dozen times per re-issue push, and the dataclass hash hashed (trust_domain, path) anew each
    # time; the expiry index asks for the Kubernetes names on every install.
    _hash: int = field(init=False, repr=False, compare=False, default=0)
    _kubernetes: tuple[str, str] | tuple[()] | None = field(init=False, repr=False, compare=False, default=())

    def __post_init__(self) -> None:
        if not isinstance(self.trust_domain, TrustDomain):
            raise TypeError("trust_domain must be a TrustDomain")
        path = self.path
        whole = str(self)
        if len(whole.encode("utf-8", "surrogatepass")) > MAX_SPIFFE_ID_BYTES:
            raise InvalidSpiffeIdError(f"SPIFFE ID {_quote(whole)} is longer than {MAX_SPIFFE_ID_BYTES} bytes")
        object.__setattr__(self, "_hash", hash((self.trust_domain.name, path)))
        if not path:
            return
        if not path.startswith("/"):
            raise InvalidSpiffeIdError(f"SPIFFE ID path {_quote(path)} must start with '/'")
        if path.endswith("/"):
            raise InvalidSpiffeIdError(f"SPIFFE ID {_quote(whole)} must not end with '/'")
        for segment in path[1:].split("/"):
            if segment == "":
                raise InvalidSpiffeIdError(f"SPIFFE ID {_quote(whole)} has an empty path segment")
            if segment in (".", ".."):
                raise InvalidSpiffeIdError(f"SPIFFE ID {_quote(whole)} has a {segment!r} path segment")
            bad = sorted(set(segment) - _PATH_CHARS)
            if bad:
                what = "percent-encoding" if "%" in bad else repr("".join(bad))
                raise InvalidSpiffeIdError(
                    f"SPIFFE ID {_quote(whole)} contains {what}; path segments allow A-Z a-z 0-9 . - _"
                )

    @classmethod
    def parse(cls, value: str) -> SpiffeId:
        """Parse ``spiffe://<trust-domain>[/<path>]``.

        Raises:
            InvalidSpiffeIdError: for every rule of the class and of :class:`TrustDomain`, and when
                the scheme is not lowercase ``spiffe://`` or a query or fragment is present.
        """
        if not isinstance(value, str):
            raise TypeError(f"SPIFFE ID must be a str, got {type(value).__name__}")
        if not value:
            raise InvalidSpiffeIdError("SPIFFE ID is empty")
        if len(value.encode("utf-8", "surrogatepass")) > MAX_SPIFFE_ID_BYTES:
            raise InvalidSpiffeIdError(f"SPIFFE ID {_quote(value)} is longer than {MAX_SPIFFE_ID_BYTES} bytes")
        if not value.startswith(SCHEME):
            raise InvalidSpiffeIdError(f"SPIFFE ID {_quote(value)} must start with {SCHEME!r}")
        rest = value[len(SCHEME) :]
        for what, char in (("a query", "?"), ("a fragment", "#")):
            if char in rest:
                raise InvalidSpiffeIdError(f"SPIFFE ID {_quote(value)} must not contain {what} ({char!r})")
        authority, slash, path = rest.partition("/")
        try:
            td = TrustDomain(authority)
        except InvalidSpiffeIdError as exc:
            raise InvalidSpiffeIdError(f"SPIFFE ID {_quote(value)}: {exc}") from None
        return cls(td, slash + path if slash else "")

    @classmethod
    def for_service_account(cls, trust_domain: TrustDomain, namespace: str, service_account: str) -> SpiffeId:
        """Istio's identity for a Kubernetes service account: ``spiffe://<td>/ns/<ns>/sa/<sa>``."""
        return cls(trust_domain, f"/ns/{namespace}/sa/{service_account}")

    @property
    def kubernetes(self) -> tuple[str, str] | None:
        """``(namespace, service_account)`` when the path has Istio's ``/ns/<ns>/sa/<sa>`` shape."""
        cached = self._kubernetes
        if cached == ():  # not looked at yet
            match = _K8S_PATH.match(self.path)
            cached = (match["ns"], match["sa"]) if match else None
            object.__setattr__(self, "_kubernetes", cached)
        return cached  # type: ignore[return-value]  # () was replaced just above

    def is_member_of(self, trust_domain: TrustDomain) -> bool:
        # A trust domain is its name: comparing names skips the dataclass __eq__ (two tuples per call), and
        # a signing storm asks this of every identity.
        return self.trust_domain.name == trust_domain.name

    def __hash__(self) -> int:  # defined here, so dataclass keeps it (see _hash)
        return self._hash

    def __reduce__(self) -> tuple[type[SpiffeId], tuple[TrustDomain, str]]:
        # Pickle the fields only: a cached hash is valid in this process alone (str hashes are salted).
        return (SpiffeId, (self.trust_domain, self.path))

    def __str__(self) -> str:
        return f"{SCHEME}{self.trust_domain.name}{self.path}"
