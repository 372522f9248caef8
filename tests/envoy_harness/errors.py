"""The harness's exceptions, in a module of their own so that process control and admin queries share them."""

from __future__ import annotations


class EnvoyHarnessError(Exception):
    """Envoy did not start, or did not reach an expected state; the message carries its log tail."""


class EnvoyTimeoutError(EnvoyHarnessError, TimeoutError):
    """A ``wait_for_*`` deadline passed."""
