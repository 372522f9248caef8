"""The one error table: every error of the tree answers the same at the gRPC and the HTTP edge."""

from __future__ import annotations

import grpc
import pytest

from ca_service.errors import (
    ERROR_TABLE,
    AuthenticationError,
    CAServiceError,
    ConfigError,
    ConflictError,
    InvalidRequestError,
    NotFoundError,
    NotReadyError,
    PolicyViolationError,
    StorageError,
    error_status,
)
from ca_service.federation.tls import EndpointAuthenticationError
from ca_service.pki.verify import ChainVerificationError
from ca_service.rpc.status import status_for
from ca_service.web.requests import BadFieldError

CASES = [
    # (sentence, error, gRPC code, HTTP status)
    ("if authentication fails, should answer UNAUTHENTICATED / 401",
     AuthenticationError("no token"), grpc.StatusCode.UNAUTHENTICATED, 401),
    ("if the caller is not entitled, should answer PERMISSION_DENIED / 403",
     PolicyViolationError("not yours"), grpc.StatusCode.PERMISSION_DENIED, 403),
    ("if a chain does not verify, should answer PERMISSION_DENIED / 403",
     ChainVerificationError("bad chain"), grpc.StatusCode.PERMISSION_DENIED, 403),
    ("if a peer endpoint is not who it should be, should answer PERMISSION_DENIED / 403",
     EndpointAuthenticationError("impostor", "endpoint_id"), grpc.StatusCode.PERMISSION_DENIED, 403),
    ("if the resource does not exist, should answer NOT_FOUND / 404",
     NotFoundError("gone"), grpc.StatusCode.NOT_FOUND, 404),
    ("if the request is malformed, should answer INVALID_ARGUMENT / 400",
     InvalidRequestError("bad csr"), grpc.StatusCode.INVALID_ARGUMENT, 400),
    ("if a request field is bad, should answer INVALID_ARGUMENT / 400",
     BadFieldError("scope", "is unknown"), grpc.StatusCode.INVALID_ARGUMENT, 400),
    ("if a compare-and-swap lost, should answer ABORTED / 409",
     ConflictError("lost"), grpc.StatusCode.ABORTED, 409),
    ("if the CA is not ready, should answer UNAVAILABLE / 503",
     NotReadyError("no signer"), grpc.StatusCode.UNAVAILABLE, 503),
    # Nothing was changed and a retry after the fault (read-only or full disk, API server down) succeeds.
    ("if storage fails, should answer UNAVAILABLE / 503",
     StorageError("disk"), grpc.StatusCode.UNAVAILABLE, 503),
    ("if the configuration is invalid, should answer INTERNAL / 500",
     ConfigError(["x: bad"]), grpc.StatusCode.INTERNAL, 500),
    ("if anything else of ours fails, should answer INTERNAL / 500",
     CAServiceError("bug"), grpc.StatusCode.INTERNAL, 500),
    ("if an unexpected exception escapes, should answer INTERNAL / 500",
     RuntimeError("bug"), grpc.StatusCode.INTERNAL, 500),
]


@pytest.mark.parametrize(("sentence", "error", "code", "http"), CASES, ids=[c[0] for c in CASES])
def test_the_error_table(sentence: str, error: BaseException, code: grpc.StatusCode, http: int):
    assert status_for(error)[0] is code
    assert error_status(error).http_status == http


def test_every_row_names_a_real_grpc_code_and_no_row_is_shadowed_by_an_earlier_base():
    for i, row in enumerate(ERROR_TABLE):
        assert grpc.StatusCode[row.grpc_code] is not None
        assert not any(issubclass(row.error, earlier.error) for earlier in ERROR_TABLE[:i]), row


def test_a_foreign_trust_domain_is_refused_as_a_policy_violation_not_retry_later(authority, clock):
    from ca_service.pki.identity import SpiffeId

    key = authority.issuer.new_key()
    with pytest.raises(PolicyViolationError) as caught:
        authority.issue_svid(SpiffeId.parse("spiffe://evil.example/ns/a/sa/b"), key.public_key())
    assert status_for(caught.value)[0] is grpc.StatusCode.PERMISSION_DENIED
