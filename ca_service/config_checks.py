"""Validation of loaded settings: every problem found at once, each prefixed by its key.

Split from :mod:`ca_service.config` (which reads the file and the environment): these checks look only at
the typed settings and the files they name, never at the environment.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from pathlib import Path

from ca_service.errors import InvalidRequestError
from ca_service.pki.identity import SpiffeId, TrustDomain
from ca_service.settings import (
    BundleEndpointSettings,
    BundleProfile,
    ListenerPolicy,
    LoggingSettings,
    Settings,
    StorageBackend,
    TLSSettings,
    format_duration,
)

# A DNS name a serving certificate may carry: LDH labels (a leading "*." wildcard allowed), at most 253.
_LABEL = r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?"
_DNS_NAME = re.compile(rf"^(?=.{{1,253}}$)(\*\.)?{_LABEL}(\.{_LABEL})*$")
# Each worker holds a copy of the signing key and ~40 MB; past the core count more only add switching.
MAX_SIGNING_WORKERS = 64
_LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


class Problems(list[str]):
    """Problems found so far, each ``"<key>: <message>"``."""

    def add(self, key: str, message: str) -> None:
        self.append(f"{key}: {message}")


def _check_td(key: str, value: str, problems: Problems) -> None:
    try:
        TrustDomain(value)
    except InvalidRequestError as exc:
        problems.add(key, str(exc))


def _check_file(key: str, path: Path | None, problems: Problems) -> None:
    if path is None:
        return
    if not os.access(path, os.R_OK):
        problems.add(key, f"file {path} does not exist or is not readable")
    elif path.is_dir():
        problems.add(key, f"{path} is a directory, not a file")


def _check_writable_file(key: str, path: Path, problems: Problems) -> None:
    """A file we create or append to: not a directory, and its directory (or nearest existing parent) writable."""
    if path.is_dir():
        problems.add(key, f"{path} is a directory, not a file")
        return
    if path.exists():
        if not os.access(path, os.W_OK):
            problems.add(key, f"{path} is not writable")
        return
    _check_writable_dir(key, path.parent, problems)


def _check_writable_dir(key: str, path: Path, problems: Problems) -> None:
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        problems.add(key, f"{existing} is not a directory")
    elif not os.access(existing, os.W_OK | os.X_OK):
        problems.add(key, f"{existing} is not writable")


def _check_logging(s: LoggingSettings, problems: Problems) -> None:
    if s.level.lower() not in _LOG_LEVELS:
        problems.add("logging.level", f"{s.level!r} is not one of: {', '.join(_LOG_LEVELS)}")
    # Below these a useful line (a SPIFFE ID, a serial) would be cut or a real incident hidden.
    if not 64 <= s.max_field_chars <= 65536:
        problems.add("logging.max_field_chars", "must be between 64 and 65536")
    if s.repeat_burst < 1:
        problems.add("logging.repeat_burst", "must be at least 1")
    if s.repeat_window <= dt.timedelta(0):
        problems.add("logging.repeat_window", "must be positive")


def _check_paths(s: Settings, problems: Problems) -> None:
    token = s.http.admin.token_file
    if token is not None and token.exists():
        _check_file("http.admin.token_file", token, problems)
    if s.http.admin.audit_log is not None:
        _check_writable_file("http.admin.audit_log", s.http.admin.audit_log, problems)
    if s.istiod.cacerts_dir is not None:
        _check_writable_dir("istiod.cacerts_dir", s.istiod.cacerts_dir, problems)
    if s.data_dir.exists() and not s.data_dir.is_dir():
        problems.add("data_dir", f"{s.data_dir} is not a directory")


def validate(s: Settings) -> list[str]:
    """Cross-field rules; each problem names its key."""
    problems = Problems()
    _check_td("trust_domain", s.trust_domain, problems)
    _check_kubernetes(s, problems)
    ca = s.ca
    for name in ("root_ttl", "intermediate_ttl", "istiod_intermediate_ttl", "workload_ttl", "max_workload_ttl"):
        if getattr(ca, name) <= dt.timedelta(0):
            problems.add(f"ca.{name}", "must be positive")
    if ca.workload_ttl >= ca.intermediate_ttl:
        problems.add("ca.workload_ttl", f"({format_duration(ca.workload_ttl)}) must be shorter than "
                     f"ca.intermediate_ttl ({format_duration(ca.intermediate_ttl)}): a leaf cannot outlive its issuer")
    if ca.max_workload_ttl < ca.workload_ttl:
        problems.add("ca.max_workload_ttl", "must be at least ca.workload_ttl")
    if ca.intermediate_ttl >= ca.root_ttl:
        problems.add("ca.intermediate_ttl", "must be shorter than ca.root_ttl")
    if ca.istiod_intermediate_ttl >= ca.root_ttl:
        problems.add("ca.istiod_intermediate_ttl", "must be shorter than ca.root_ttl")
    if ca.istiod_intermediate_ttl <= ca.max_workload_ttl:
        problems.add("ca.istiod_intermediate_ttl", "must outlive ca.max_workload_ttl (istiod signs leaves with it)")
    if s.istiod.max_workload_ttl <= dt.timedelta(0) or s.istiod.max_workload_ttl >= ca.istiod_intermediate_ttl:
        problems.add("istiod.max_workload_ttl", "must be positive and shorter than ca.istiod_intermediate_ttl")
    if ca.backdate < dt.timedelta(0) or ca.backdate >= ca.workload_ttl:
        problems.add("ca.backdate", "must be >= 0 and shorter than ca.workload_ttl")
    if ca.signing_workers is not None and not 0 <= ca.signing_workers <= MAX_SIGNING_WORKERS:
        problems.add("ca.signing_workers", f"must be between 0 (sign in process) and {MAX_SIGNING_WORKERS}; "
                     "leave it unset for one per core")
    r = s.rotation
    if not 0.1 <= r.renew_fraction <= 0.9:
        problems.add("rotation.renew_fraction", f"{r.renew_fraction} must be between 0.1 and 0.9")
    if not 0 <= r.jitter_fraction < min(r.renew_fraction, 1 - r.renew_fraction):
        problems.add("rotation.jitter_fraction", f"{r.jitter_fraction} must be >= 0 and leave the renewal "
                     "point inside the lifetime")
    for name in ("tick_interval", "misfire_grace", "root_ack_timeout"):
        if getattr(r, name) <= dt.timedelta(0):
            problems.add(f"rotation.{name}", "must be positive")
    # Zero has a meaning for these two (re-issue everything at once; no minimum wait, the SDS ACK gate
    # alone orders a root switch: for meshes without bundle files or peers).  Negative is a typo.
    for name in ("reissue_window", "root_min_propagation"):
        if getattr(r, name) < dt.timedelta(0):
            problems.add(f"rotation.{name}", "must not be negative (0 means: at once / the ACK gate alone)")
    if r.root_ack_timeout < r.root_min_propagation:
        problems.add("rotation.root_ack_timeout", "must be at least rotation.root_min_propagation")
    addresses: dict[str, str] = {}
    for i, listener in enumerate(s.grpc):
        key = f"grpc[{i}]"
        _check_address(f"{key}.address", listener.address, problems, allow_unix=True)
        _check_tls(f"{key}.tls", listener.tls, problems)
        _check_policy(f"{key}.policy", listener.policy, problems)
        _claim(addresses, listener.address, f"{key}.address", problems)
    _check_address("http.address", s.http.address, problems)
    _claim(addresses, s.http.address, "http.address", problems)
    _check_tls("http.tls", s.http.tls, problems)
    _check_paths(s, problems)
    _check_logging(s.logging, problems)
    for i, pattern in enumerate(s.http.admin.allowed_spiffe_ids):
        _check_id_pattern(f"http.admin.allowed_spiffe_ids[{i}]", pattern, problems)
    if s.bundle_endpoint.refresh_hint <= dt.timedelta(0):
        problems.add("bundle_endpoint.refresh_hint", "must be positive (peers poll at this interval)")
    if s.bundle_endpoint.enabled:
        _check_bundle_endpoint(s.bundle_endpoint, problems)
        _claim(addresses, s.bundle_endpoint.address, "bundle_endpoint.address", problems)
    _check_peers(s, problems)
    _check_istio_ca(s, problems)
    _check_limits(s, problems)
    return problems


def _check_istio_ca(s: Settings, problems: Problems) -> None:
    ica = s.istio_ca
    ids = [c.cluster_id for c in ica.clusters]
    if len(set(ids)) != len(ids) or "" in ids:
        problems.add("istio_ca.clusters", "cluster_id values must be non-empty and unique")
    for i, cluster in enumerate(ica.clusters):
        _check_file(f"istio_ca.clusters[{i}].kubeconfig", cluster.kubeconfig, problems)
    for i, account in enumerate(ica.trusted_node_accounts):
        if account.count("/") != 1 or "" in account.split("/"):
            problems.add(f"istio_ca.trusted_node_accounts[{i}]", f"{account!r} is not <namespace>/<service account>")
    if ica.clusters and not ica.token_audiences:
        problems.add("istio_ca.token_audiences", "must name at least one audience when clusters are configured")
    if ica.rate_limit_per_identity <= 0 or ica.rate_limit_burst < 1:
        problems.add("istio_ca.rate_limit_per_identity", "rate must be positive and rate_limit_burst >= 1")
    for name in ("max_in_flight", "audit_capacity"):
        if getattr(ica, name) < 1:
            problems.add(f"istio_ca.{name}", "must be at least 1")
    if ica.review_cache_ttl < dt.timedelta(0):
        problems.add("istio_ca.review_cache_ttl", "must be >= 0 (0: no caching)")



def _check_limits(s: Settings, problems: Problems) -> None:
    """Every connection and SDS bound must be positive (0 would refuse everything; negative is a typo)."""
    m = s.http.metrics.max_identity_series
    if m < 0:
        problems.add("http.metrics.max_identity_series", "must be >= 0 (0: aggregates only)")
    values: dict[str, float] = {}
    for prefix, limits in (("http.connections", s.http.connections),
                           ("bundle_endpoint.connections", s.bundle_endpoint.connections)):
        values[f"{prefix}.max_connections"] = limits.max_connections
        values[f"{prefix}.header_timeout"] = limits.header_timeout.total_seconds()
    for name, value in vars(s.sds).items():
        values[f"sds.{name}"] = value.total_seconds() if isinstance(value, dt.timedelta) else value
    for key, value in values.items():
        if value <= 0:
            problems.add(key, "must be positive")


def _check_kubernetes(s: Settings, problems: Problems) -> None:
    k = s.storage.kubernetes
    # client-go's rules: a leader gives up (renew_deadline) before anyone may take over (lease_duration)
    # and retries more than once before its deadline.
    if not dt.timedelta(0) < k.retry_period < k.renew_deadline < k.lease_duration:
        problems.add("storage.kubernetes", "lease timings need 0 < retry_period < renew_deadline < lease_duration")
    if k.lease_duration < dt.timedelta(seconds=1):
        problems.add("storage.kubernetes.lease_duration", "must be at least 1s (a Lease counts whole seconds)")
    if s.storage.backend is StorageBackend.KUBERNETES:
        _check_file("storage.kubernetes.kubeconfig", k.kubeconfig, problems)


def _claim(seen: dict[str, str], address: str, key: str, problems: Problems) -> None:
    if address.endswith(":0"):
        return  # port 0: the kernel picks distinct free ports
    if address in seen:
        problems.add(key, f"{address} is already used by {seen[address]}")
    seen[address] = key


def _check_address(key: str, address: str, problems: Problems, *, allow_unix: bool = False) -> None:
    if address.startswith("unix://"):
        if not allow_unix:
            problems.add(key, "a Unix socket is not supported here")
        elif not address[len("unix://"):]:
            problems.add(key, "unix:// needs a socket path")
        return
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        problems.add(key, f"{address!r} is not host:port (or unix:///path)")


def _check_tls(key: str, tls: TLSSettings, problems: Problems) -> None:
    if (tls.cert_file is None) != (tls.key_file is None):
        problems.add(key, "cert_file and key_file go together")
    for name in ("cert_file", "key_file", "client_ca_file"):
        _check_file(f"{key}.{name}", getattr(tls, name), problems)
    if tls.require_client_cert and not tls.enabled:
        problems.add(f"{key}.require_client_cert", "needs tls.enabled: true")
    for i, name in enumerate(tls.dns_names):
        if not _DNS_NAME.match(name):
            problems.add(f"{key}.dns_names[{i}]",
                         f"{name[:100]!r} is not a lowercase DNS name (IDNs in their xn-- form)")


def _check_policy(key: str, policy: ListenerPolicy, problems: Problems) -> None:
    for i, pattern in enumerate(policy.allowed_spiffe_ids):
        _check_id_pattern(f"{key}.allowed_spiffe_ids[{i}]", pattern, problems)


def _check_id_pattern(key: str, pattern: str, problems: Problems) -> None:
    if not pattern.startswith("spiffe://"):
        problems.add(key, f"{pattern!r} must be a SPIFFE ID or a pattern starting with spiffe://")
    elif "*" not in pattern and "?" not in pattern:
        try:
            SpiffeId.parse(pattern)
        except InvalidRequestError as exc:
            problems.add(key, str(exc))


def _check_bundle_endpoint(b: BundleEndpointSettings, problems: Problems) -> None:
    _check_address("bundle_endpoint.address", b.address, problems)
    if b.profile is BundleProfile.STATIC:
        problems.add("bundle_endpoint.profile", "must be https_spiffe or https_web")
    if b.profile is BundleProfile.HTTPS_WEB and (b.cert_file is None or b.key_file is None):
        problems.add("bundle_endpoint", "profile https_web needs cert_file and key_file")
    _check_file("bundle_endpoint.cert_file", b.cert_file, problems)
    _check_file("bundle_endpoint.key_file", b.key_file, problems)


def _check_peers(s: Settings, problems: Problems) -> None:
    seen: set[str] = set()
    for i, peer in enumerate(s.federation.peers):
        key = f"federation.peers[{i}]"
        _check_td(f"{key}.trust_domain", peer.trust_domain, problems)
        if peer.trust_domain == s.trust_domain:
            problems.add(f"{key}.trust_domain", "is our own trust domain; a peer must be another one")
        if peer.trust_domain in seen:
            problems.add(f"{key}.trust_domain", f"{peer.trust_domain} is configured twice")
        seen.add(peer.trust_domain)
        if peer.refresh_hint is not None and peer.refresh_hint <= dt.timedelta(0):
            problems.add(f"{key}.refresh_hint", "must be positive")
        if peer.profile is BundleProfile.STATIC:
            if peer.bundle_file is None:
                problems.add(f"{key}.bundle_file", "profile static needs bundle_file")
            continue
        if not peer.endpoint_url.startswith("https://"):
            problems.add(f"{key}.endpoint_url", f"{peer.endpoint_url!r} must be an https:// URL")
        if peer.profile is BundleProfile.HTTPS_SPIFFE:
            if not peer.endpoint_spiffe_id:
                problems.add(f"{key}.endpoint_spiffe_id", "profile https_spiffe needs the endpoint's SPIFFE ID")
            else:
                _check_id_pattern(f"{key}.endpoint_spiffe_id", peer.endpoint_spiffe_id, problems)
            if peer.bootstrap_bundle is None:
                problems.add(f"{key}.bootstrap_bundle", "profile https_spiffe needs a bootstrap bundle")
            _check_file(f"{key}.bootstrap_bundle", peer.bootstrap_bundle, problems)
        if peer.profile is BundleProfile.HTTPS_WEB:
            _check_file(f"{key}.ca_file", peer.ca_file, problems)
