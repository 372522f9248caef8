"""Fixtures of the SDS protocol tests (defined in sds_fixtures so the e2e tests can reuse them)."""

from tests.rpc.istio_fixtures import istio, kube
from tests.rpc.sds_fixtures import sds, stub

__all__ = ["istio", "kube", "sds", "stub"]
