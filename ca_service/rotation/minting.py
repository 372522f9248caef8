"""Building new CA entries: a root, an intermediate under the active root, the first state.  Pure
apart from the randomness of key generation; ``now`` is always a parameter."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from cryptography import x509

from ca_service.errors import InvalidRequestError, NotReadyError, PolicyViolationError
from ca_service.pki.certs import is_ca
from ca_service.pki.identity import TrustDomain
from ca_service.pki.keys import KeyAlgorithm, PrivateKey, generate_private_key, same_public_key
from ca_service.pki.templates import DEFAULT_BACKDATE, CAKind, build_intermediate, build_root
from ca_service.pki.verify import verify_ca_chain
from ca_service.rotation.state import AuthorityMode, AuthorityState, CAEntry, SlotState


def mint_root(
    trust_domain: TrustDomain, *, algorithm: KeyAlgorithm, ttl: dt.timedelta, now: dt.datetime,
    state: SlotState = SlotState.ACTIVE, backdate: dt.timedelta = DEFAULT_BACKDATE,
) -> CAEntry:
    """A new self-signed root.  ``backdate`` is ``ca.backdate``: a CA must start at least as early as
    the leaves under it, or their backdating is clamped away (a leaf never starts before its issuer)."""
    key = generate_private_key(algorithm)
    return CAEntry(CAKind.ROOT, build_root(key, trust_domain, now=now, ttl=ttl, backdate=backdate), key, state)


def mint_intermediate(
    issuer: CAEntry, trust_domain: TrustDomain, *, kind: CAKind, algorithm: KeyAlgorithm, ttl: dt.timedelta,
    now: dt.datetime, state: SlotState = SlotState.ACTIVE, backdate: dt.timedelta = DEFAULT_BACKDATE,
) -> CAEntry:
    """A new intermediate of ``kind`` signed by ``issuer`` (a root whose key we hold).

    Raises:
        NotReadyError: if the issuer's key is not held here (intermediate-only mode) or it expired.
    """
    if issuer.key is None:
        raise NotReadyError(
            f"creating a {kind} needs the root key, which is held offline (intermediate-only mode)"
        )
    if now >= issuer.not_after:
        raise NotReadyError(f"the root {issuer.serial} expired at {issuer.not_after.isoformat()}; "
                            f"no {kind} can be created under it")
    key = generate_private_key(algorithm)
    cert = build_intermediate(
        key.public_key(), trust_domain, issuer=issuer.cert, issuer_key=issuer.key, now=now, ttl=ttl, kind=kind,
        backdate=backdate,
    )
    return CAEntry(kind, cert, key, state, parent=issuer.key_id)


def bootstrap_state(
    trust_domain: TrustDomain, *, algorithm: KeyAlgorithm, root_ttl: dt.timedelta, intermediate_ttl: dt.timedelta,
    istiod_ttl: dt.timedelta, now: dt.datetime, root: CAEntry | None = None,
    backdate: dt.timedelta = DEFAULT_BACKDATE,
) -> AuthorityState:
    """First state: a root (new, or the imported ``root``), the SDS signing intermediate, istiod's intermediate."""
    mode = AuthorityMode.IMPORTED_ROOT if root is not None else AuthorityMode.SELF_SIGNED
    root = root or mint_root(trust_domain, algorithm=algorithm, ttl=root_ttl, now=now, backdate=backdate)
    signing = mint_intermediate(root, trust_domain, kind=CAKind.INTERMEDIATE, algorithm=algorithm,
                                ttl=intermediate_ttl, now=now, backdate=backdate)
    istiod = mint_intermediate(root, trust_domain, kind=CAKind.ISTIOD_INTERMEDIATE, algorithm=algorithm,
                               ttl=istiod_ttl, now=now, backdate=backdate)
    return AuthorityState(trust_domain, mode, (root, signing, istiod), created_at=now)


def import_root(cert: x509.Certificate, key: PrivateKey, *, now: dt.datetime) -> CAEntry:
    """Check an operator-supplied root and wrap it as the active root.

    Raises:
        InvalidRequestError: if it is not a self-signed CA valid at ``now`` or the key does not match.
    """
    if not is_ca(cert):
        raise InvalidRequestError("the imported root is not a CA certificate (CA:TRUE)")
    if not same_public_key(cert.public_key(), key.public_key()):  # type: ignore[arg-type]
        raise InvalidRequestError("the root key does not match the root certificate")
    if cert.issuer != cert.subject:
        raise InvalidRequestError("the imported root is not self-signed; use intermediate-only mode instead")
    try:
        verify_ca_chain(cert, [], [cert], now=now)
    except PolicyViolationError as exc:
        raise InvalidRequestError(f"the imported root is not usable: {exc}") from None
    if not cert.not_valid_before_utc <= now < cert.not_valid_after_utc:
        raise InvalidRequestError(f"the imported root is not valid now (valid until {cert.not_valid_after_utc})")
    return CAEntry(CAKind.ROOT, cert, key, SlotState.ACTIVE)


def intermediate_only_state(
    trust_domain: TrustDomain, *, cert: x509.Certificate, key: PrivateKey, chain: Sequence[x509.Certificate],
    root: x509.Certificate, now: dt.datetime,
) -> AuthorityState:
    """State for a signing intermediate issued by an offline root we never hold.

    ``chain`` holds any certificates between ``cert`` and ``root``.  There is no istiod intermediate
    in this mode: minting one needs the root key.

    Raises:
        InvalidRequestError: if the key does not match, ``cert`` is not a CA, or it does not chain to ``root``.
    """
    if not same_public_key(cert.public_key(), key.public_key()):  # type: ignore[arg-type]
        raise InvalidRequestError("the intermediate key does not match the intermediate certificate")
    if not is_ca(root):
        raise InvalidRequestError("the root certificate is not a CA certificate")
    try:
        verify_ca_chain(cert, list(chain), [root], now=now)
    except PolicyViolationError as exc:
        raise InvalidRequestError(f"the intermediate does not chain to the given root: {exc}") from None
    root_entry = CAEntry(CAKind.ROOT, root, None, SlotState.ACTIVE)
    signing = CAEntry(CAKind.INTERMEDIATE, cert, key, SlotState.ACTIVE, parent=root_entry.key_id,
                      chain_above=(*chain, root))
    return AuthorityState(trust_domain, AuthorityMode.INTERMEDIATE_ONLY, (root_entry, signing), created_at=now)
