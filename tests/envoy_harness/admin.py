"""Reading a running Envoy through its admin endpoint: stats, ``/certs``, the secrets dump, listeners.

:class:`EnvoyAdmin` holds the queries and the ``wait_for_*`` polls; :class:`.process.EnvoyProcess`
inherits them and supplies the admin address, the exit check and the log tail that every failure
message carries.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import json
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from .bootstrap import SERVER_LISTENER
from .errors import EnvoyHarnessError, EnvoyTimeoutError


def sds_stat_prefix(secret_name: str) -> str:
    """The stats prefix Envoy 1.40 uses for an SDS secret.

    Envoy's stat-name sanitiser turns ``://``, ``:/`` and ``:`` into ``_``:
    ``default`` → ``sds.default``, ``spiffe://cluster.local`` → ``sds.spiffe_cluster.local``,
    ``spiffe://td/ns/x/sa/y`` → ``sds.spiffe_td/ns/x/sa/y``.  (Other stats, such as
    ``listener.<l>.ssl.certificate.<name>.*``, keep the raw name.)
    """
    return "sds." + re.sub(r"://|:/|:", "_", secret_name)


@dataclass(frozen=True)
class CertificateInfo:
    """One certificate as the admin ``/certs`` endpoint summarises it."""

    serial: int
    uri_sans: tuple[str, ...]
    expiration_time: str
    path: str  # "<inline>" for SDS-delivered bytes; a file name for static certificates

    @classmethod
    def from_admin(cls, entry: Mapping[str, Any]) -> CertificateInfo:
        sans = tuple(san["uri"] for san in entry.get("subject_alt_names", []) if "uri" in san)
        serial = int(entry["serial_number"], 16)
        return cls(serial, sans, str(entry.get("expiration_time", "")), str(entry.get("path", "")))

    @property
    def is_inline(self) -> bool:
        return self.path == "<inline>"

    def __str__(self) -> str:
        return f"{','.join(self.uri_sans) or '-'} serial={self.serial:x}"


class EnvoyAdmin(abc.ABC):
    """Admin-endpoint queries and waits of one Envoy (the process side is :class:`.process.EnvoyProcess`)."""

    def __init__(self) -> None:
        self._acknowledged_rejections = 0

    @property
    @abc.abstractmethod
    def admin_url(self) -> str:
        """``http://host:port`` of the admin endpoint; EnvoyHarnessError when Envoy is not started."""

    @abc.abstractmethod
    def _raise_if_exited(self, when: str) -> None:
        """EnvoyHarnessError (with the log tail) if the process has exited."""

    @abc.abstractmethod
    def _with_tail(self, message: str) -> str:
        """``message`` plus the node, the workdir, SDS rejections and the tail of Envoy's log."""

    # -- diagnostics

    async def diagnostics(self, stat_filter: str = r"^(sds\.|cluster\.[^.]+\.ssl\.|listener\.[^.]+\.ssl\.)") -> str:
        """A failure message: the interesting stats plus the log tail."""
        with contextlib.suppress(EnvoyHarnessError, aiohttp.ClientError, OSError, asyncio.TimeoutError):
            stats = await self.stats(stat_filter)
            return self._with_tail("stats:\n" + "\n".join(f"  {k}: {v}" for k, v in sorted(stats.items())))
        return self._with_tail("(admin unreachable)")

    # -- queries

    async def admin_get(self, path: str, **params: str) -> str:
        """GET an admin path and return the body; raises EnvoyHarnessError on a non-200 answer."""
        timeout = aiohttp.ClientTimeout(total=5)
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(self.admin_url + path, params=params) as response,
        ):
            text = await response.text()
            if response.status != 200:
                raise EnvoyHarnessError(f"admin {path} answered {response.status}: {text[:500]}")
            return text

    async def stats(self, filter_regex: str | None = None) -> dict[str, int]:
        """Counters and gauges (histograms and text readouts are left out), optionally filtered."""
        params = {"filter": filter_regex} if filter_regex else {}
        result: dict[str, int] = {}
        for line in (await self.admin_get("/stats", **params)).splitlines():
            name, _, value = line.rpartition(": ")
            if name and re.fullmatch(r"-?\d+", value):
                result[name] = int(value)
        return result

    async def stat(self, name: str) -> int | None:
        """One counter or gauge; None when Envoy has not created it (yet)."""
        return (await self.stats("^" + re.escape(name) + "$")).get(name)

    async def wait_for_stat(
        self, name: str, predicate: Callable[[int], bool], timeout: float = 20.0, *, fail_on_rejection: bool = False
    ) -> int:
        """Poll ``name`` (a missing stat reads as 0) until ``predicate`` holds; return its value.

        Raises:
            EnvoyTimeoutError: the deadline passed (message has the last value, SDS stats and log tail).
            EnvoyHarnessError: Envoy exited meanwhile, or rejected an SDS update and ``fail_on_rejection``.
        """
        value = 0

        async def probe() -> tuple[bool, str]:
            nonlocal value
            value = await self.stat(name) or 0
            return predicate(value), f"{name} = {value}"

        await self._poll(name, probe, timeout, fail_on_rejection)
        return value

    async def wait_for_secret(
        self, name: str, *, min_updates: int = 1, timeout: float = 20.0, fail_on_rejection: bool = True
    ) -> int:
        """Wait until ``sds.<name>.update_success`` reaches ``min_updates``; return it.

        ``/ready`` is no signal: Envoy goes LIVE after ``initial_fetch_timeout`` without secrets.  To wait
        for a rotation, pass :meth:`secret_updates` from before plus one.  Any SDS rejection during the
        wait fails at once unless ``fail_on_rejection`` is False (see :meth:`acknowledge_rejections`).

        Caveat (Envoy 1.40): ``update_success`` counts a secret that reached Envoy, not one in use.  A
        certificate whose key does not match still counts as a success when it arrives before the
        validation context; the NACK is then charged to ``sds.ROOTCA.update_rejected``, the secret whose
        arrival made the TLS context rebuild fail.  Use :meth:`wait_for_certificate` to know what is served.
        """
        stat = sds_stat_prefix(name) + ".update_success"
        return await self.wait_for_stat(stat, lambda v: v >= min_updates, timeout, fail_on_rejection=fail_on_rejection)

    async def secret_updates(self, name: str) -> int:
        """``sds.<name>.update_success`` now (0 before the first); note it before triggering a rotation."""
        return await self.stat(sds_stat_prefix(name) + ".update_success") or 0

    async def rejections(self) -> int:
        """Sum of ``sds.*.update_rejected`` (NACKs) over all secrets."""
        return sum((await self.stats(r"^sds\..*\.update_rejected$")).values())

    async def acknowledge_rejections(self) -> int:
        """Treat every NACK so far as expected; later waits fail only on new ones.  Returns the count.

        By default any NACK since start fails a ``wait_for_*`` with ``fail_on_rejection``: a NACK can
        come before the wait begins (SDS answers within milliseconds of start).
        """
        self._acknowledged_rejections = await self.rejections()
        return self._acknowledged_rejections

    async def certs(self) -> dict[str, Any]:
        """The parsed admin ``/certs`` (``certificates[].cert_chain[]`` / ``ca_cert[]`` summaries)."""
        result: dict[str, Any] = json.loads(await self.admin_get("/certs"))
        return result

    async def certificate_chains(self) -> list[tuple[CertificateInfo, ...]]:
        """Per TLS context (listener or cluster), the certificates it presents; empty until it has one."""
        return [
            tuple(CertificateInfo.from_admin(cert) for cert in context.get("cert_chain", []))
            for context in (await self.certs()).get("certificates", [])
        ]

    async def wait_for_certificate(
        self,
        *,
        uri_san: str | None = None,
        serial: int | None = None,
        timeout: float = 20.0,
        fail_on_rejection: bool = True,
    ) -> None:
        """Wait until EVERY SDS-fed TLS context presents a certificate with ``uri_san`` and/or ``serial``.

        Contexts whose certificate is a file (the SDS cluster's own client certificate with
        :class:`SdsTls`) are skipped; a context without a certificate yet counts as not there.
        This is what Envoy actually serves (admin ``/certs``), unlike the SDS counters; use it after a
        rotation with the new serial.  Fails at once on any SDS rejection not acknowledged with
        :meth:`acknowledge_rejections`, unless ``fail_on_rejection`` is False.
        """
        if uri_san is None and serial is None:
            raise TypeError("wait_for_certificate needs uri_san or serial")

        def matches(cert: CertificateInfo) -> bool:
            return (uri_san is None or uri_san in cert.uri_sans) and (serial is None or cert.serial == serial)

        async def probe() -> tuple[bool, str]:
            chains = [c for c in await self.certificate_chains() if all(cert.is_inline for cert in c)]
            done = bool(chains) and all(any(matches(c) for c in chain) for chain in chains)
            return done, f"contexts present {[[str(c) for c in chain] for chain in chains]}"

        wanted = " ".join(f"{k}={v}" for k, v in (("uri_san", uri_san), ("serial", serial)) if v is not None)
        await self._poll(f"certificate {wanted}", probe, timeout, fail_on_rejection)

    async def _poll(
        self, what: str, probe: Callable[[], Awaitable[tuple[bool, str]]], timeout: float, fail_on_rejection: bool
    ) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self._raise_if_exited(f"while waiting for {what}")
            done, state = await probe()
            if done:
                return
            if fail_on_rejection and await self.rejections() > self._acknowledged_rejections:
                # Any secret's counter: Envoy charges a NACK to the secret whose arrival failed the context.
                message = f"Envoy rejected (NACKed) an SDS update while waiting for {what}; {state}"
                await asyncio.sleep(0.3)  # let Envoy flush the reason to its log (flush interval 100 ms)
                raise EnvoyHarnessError(await self._diagnostics_for(message))
            if time.monotonic() >= deadline:
                raise EnvoyTimeoutError(await self._diagnostics_for(f"{what}: {state} after {timeout}s"))
            await asyncio.sleep(0.1)

    async def _diagnostics_for(self, message: str) -> str:
        return message + "\n" + await self.diagnostics()

    async def active_secrets(self) -> dict[str, dict[str, Any]]:
        """``/config_dump?resource=dynamic_active_secrets`` keyed by secret name (keys are redacted).

        Each value has ``version_info``, ``last_updated`` and ``secret`` (the Secret as JSON).
        """
        dump = json.loads(await self.admin_get("/config_dump", resource="dynamic_active_secrets"))
        return {entry["name"]: entry for entry in dump.get("configs", [])}

    async def listener_port(self, name: str) -> int:
        """The port listener ``name`` is bound to (resolves port 0)."""
        listeners = json.loads(await self.admin_get("/listeners", format="json"))
        for status in listeners.get("listener_statuses", []):
            if status.get("name") == name:
                return int(status["local_address"]["socket_address"]["port_value"])
        raise EnvoyHarnessError(self._with_tail(f"no listener {name!r} in {listeners}"))

    async def server_port(self) -> int:
        return await self.listener_port(SERVER_LISTENER)

    async def client_url(self, name: str, path: str = "/") -> str:
        return f"http://127.0.0.1:{await self.listener_port(name)}{path}"
