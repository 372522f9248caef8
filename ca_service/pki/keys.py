"""Key generation, loading and encoding.  Pure: no I/O, no logging of key material."""

from __future__ import annotations

import enum
import hashlib
from typing import Literal, cast

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from ca_service.errors import InvalidRequestError, PolicyViolationError

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey


class KeyAlgorithm(enum.StrEnum):
    """Key types a CA or workload may use.  ECDSA P-256 is the default, as in Istio and SPIRE."""

    EC_P256 = "ec-p256"
    EC_P384 = "ec-p384"
    RSA_2048 = "rsa-2048"
    RSA_3072 = "rsa-3072"

    @classmethod
    def parse(cls, value: str) -> KeyAlgorithm:
        try:
            return cls(value)
        except ValueError:
            allowed = ", ".join(a.value for a in cls)
            raise ValueError(f"unknown key algorithm {value!r}; choose one of {allowed}") from None


def generate_private_key(algorithm: KeyAlgorithm = KeyAlgorithm.EC_P256) -> PrivateKey:
    """Make a fresh private key of ``algorithm``."""
    if algorithm is KeyAlgorithm.EC_P256:
        return ec.generate_private_key(ec.SECP256R1())
    if algorithm is KeyAlgorithm.EC_P384:
        return ec.generate_private_key(ec.SECP384R1())
    if algorithm is KeyAlgorithm.RSA_2048:
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if algorithm is KeyAlgorithm.RSA_3072:
        return rsa.generate_private_key(public_exponent=65537, key_size=3072)
    raise TypeError(f"not a KeyAlgorithm: {algorithm!r}")


def algorithm_of(key: PrivateKey | PublicKey) -> KeyAlgorithm:
    """The :class:`KeyAlgorithm` of ``key``.

    Raises:
        PolicyViolationError: for a curve or RSA size that is not allowed (e.g. P-521, RSA-1024, RSA-4096).
    """
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        by_curve = {"secp256r1": KeyAlgorithm.EC_P256, "secp384r1": KeyAlgorithm.EC_P384}
        if key.curve.name in by_curve:
            return by_curve[key.curve.name]
        raise PolicyViolationError(f"elliptic curve {key.curve.name} is not allowed; use P-256 or P-384")
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        by_size = {2048: KeyAlgorithm.RSA_2048, 3072: KeyAlgorithm.RSA_3072}
        if key.key_size in by_size:
            return by_size[key.key_size]
        raise PolicyViolationError(f"RSA key size {key.key_size} is not allowed; use 2048 or 3072")
    raise PolicyViolationError(f"key type {type(key).__name__} is not allowed; use ECDSA or RSA")


KeyFamily = Literal["ec", "rsa"]
_FAMILIES: dict[type, KeyFamily | None] = {}


def key_family(public_key: object) -> KeyFamily | None:
    """``"ec"``, ``"rsa"`` or None: isinstance against cryptography's ABCs costs ~0.7 us a check, and
    issuance asked it five times a leaf; the answer per concrete key class is kept."""
    cls = type(public_key)
    if cls not in _FAMILIES:
        _FAMILIES[cls] = "ec" if issubclass(cls, ec.EllipticCurvePublicKey) else \
            "rsa" if issubclass(cls, rsa.RSAPublicKey) else None
    return _FAMILIES[cls]


def signature_hash(key: PrivateKey) -> hashes.SHA256 | hashes.SHA384:
    """The digest to sign with: SHA-384 for P-384 (matching strength), SHA-256 otherwise."""
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1":
        return hashes.SHA384()
    return hashes.SHA256()


def private_key_to_pem(key: PrivateKey) -> bytes:
    """Unencrypted PKCS#8 PEM, the form Envoy and istiod both read."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def load_private_key(pem: bytes) -> PrivateKey:
    """Load an unencrypted PEM private key (PKCS#8, SEC1 for EC or PKCS#1 for RSA).

    Raises:
        InvalidRequestError: if the data is not a PEM private key, is encrypted, or is not EC/RSA.
        PolicyViolationError: if the curve or size is not allowed.
    """
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except TypeError:
        raise InvalidRequestError("private key is encrypted; provide it unencrypted") from None
    except ValueError:
        raise InvalidRequestError("not a PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise InvalidRequestError(f"private key type {type(key).__name__} is not supported; use ECDSA or RSA")
    algorithm_of(key)
    return key


def public_key_der(key: PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def key_id(key: PublicKey) -> bytes:
    """Subject key identifier: SHA-1 of the subjectPublicKey bits (RFC 5280 4.2.1.2 method 1)."""
    bits = key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint) if isinstance(
        key, ec.EllipticCurvePublicKey
    ) else key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)
    return hashlib.sha1(bits, usedforsecurity=False).digest()


def same_public_key(a: PublicKey, b: PublicKey) -> bool:
    return public_key_der(a) == public_key_der(b)


def signature_verifies(key: object, signature: bytes, data: bytes, params: object,
                       digest: hashes.HashAlgorithm | None) -> bool | None:
    """Whether ``signature`` over ``data`` verifies under ``key``, with the signature parameters and digest a
    certificate or CSR declares (its ``signature_algorithm_parameters`` and ``signature_hash_algorithm``).

    With a key already loaded: ``is_signature_valid`` and ``verify_directly_issued_by`` load the key
    again (or parse names) on every call.  None for a key and parameters this does not cover, for which
    the caller asks ``cryptography``'s own check.
    """
    # Exact types, not isinstance: these are cryptography's ABCs (~0.7 us a check, twice a CSR), and the
    # parameters come from its parser, which makes these very classes.
    family, kind = key_family(key), type(params)
    try:
        if family == "ec" and kind is ec.ECDSA:
            cast(ec.EllipticCurvePublicKey, key).verify(signature, data, cast(ec.ECDSA, params))
        elif family == "rsa" and (kind is padding.PKCS1v15 or kind is padding.PSS) and digest is not None:
            cast(rsa.RSAPublicKey, key).verify(signature, data, cast("padding.PKCS1v15 | padding.PSS", params), digest)
        else:
            return None
    except (InvalidSignature, UnsupportedAlgorithm, ValueError):
        return False
    return True
