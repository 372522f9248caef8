"""SDS fan-out: N Envoy-like streams against an SDS server, pushes measured to the last ACK.

Metrics per stream count N: server memory per stream (RSS delta of the server process over N open
streams), time from a trust-bundle change to the last ACK on every ``ROOTCA`` stream, time from a
forced re-issue of every node to the last ACK on every ``default`` stream, and server CPU per pushed
stream.  The server is an :class:`SdsTarget`: the daemon, or with ``--sds-target stub`` only the stub,
every figure then labelled as the stub's.  At the top stream count the daemon and the stub run in
paired rounds (:func:`_paired_rounds`).
"""

from __future__ import annotations

import gc
import os
import statistics
import time
from pathlib import Path
from typing import Protocol

from bench.common import Result
from bench.sds_loadgen import LoadGenerator


class SdsTarget(Protocol):
    """An SDS server under test, in its own process."""

    address: str  # host:port of the gRPC listener
    pid: int  # for its RSS and CPU

    def change_bundle(self) -> None: ...  # a new trust bundle: every ROOTCA stream gets a push

    def reissue_all(self) -> None: ...  # a forced re-issue of every node: every default stream gets a push

    def close(self) -> None: ...


def start_daemon_target(signing_workers: int | None = None) -> SdsTarget:
    """The real daemon (``python -m ca_service serve``) with its SDS gRPC component, in its own process."""
    from bench.sds_daemon_target import DaemonTarget

    return DaemonTarget(signing_workers=signing_workers)


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _cpu(pid: int) -> float:
    """CPU seconds of ``pid`` and its live children (the daemon's signing-pool workers sign for it)."""
    total = 0.0
    for proc in (pid, *_children(pid)):
        try:
            with open(f"/proc/{proc}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue  # a worker that exited between listing and reading
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    return total


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except FileNotFoundError:
            continue
    return out


def _push(target: SdsTarget, load: LoadGenerator, kind: str, trigger: str) -> tuple[float, float]:
    """Seconds from the trigger to the last ACK, and server CPU seconds spent meanwhile."""
    load.mark(kind)
    cpu_before, started = _cpu(target.pid), time.time()
    target.change_bundle() if trigger == "bundle" else target.reissue_all()
    last_ack = load.wait_all_acked(kind)
    time.sleep(0.05)  # let the server finish reading the last ACKs before its CPU is sampled
    return last_ack - started, _cpu(target.pid) - cpu_before


def measure(target: SdsTarget, streams: int, processes: int) -> dict[str, float]:
    gc.collect()
    time.sleep(0.2)
    idle_rss = _rss(target.pid)
    load = LoadGenerator(target.address, streams, processes=processes)
    try:
        time.sleep(0.5)  # the server settles after the connect storm
        per_stream = (_rss(target.pid) - idle_rss) / streams
        bundle_s, bundle_cpu = _push(target, load, "ROOTCA", "bundle")
        reissue_s, reissue_cpu = _push(target, load, "default", "reissue")
    finally:
        load.close()
    pushed = streams / 2  # each trigger reaches one stream of the two per node
    pooled = getattr(target, "pool_signed", None)  # the daemon says how many SVIDs its signing pool signed
    return {
        **({"reissue_pool_signed": float(pooled())} if pooled is not None else {}),
        "streams": float(streams), "connect_s": load.connect_seconds, "connect_retries": float(load.retries),
        "server_bytes_per_stream": per_stream,
        "bundle_push_last_ack_s": bundle_s, "reissue_last_ack_s": reissue_s,
        "server_cpu_us_per_bundle_push": 1e6 * bundle_cpu / pushed,
        "server_cpu_us_per_reissue_push": 1e6 * reissue_cpu / pushed,
    }


def _start(kind: str) -> SdsTarget:
    if kind in ("stub", "plain-stub", "signing-stub"):
        from bench.sds_stub_server import StubTarget

        return StubTarget(disciplined=kind != "plain-stub", signing=kind == "signing-stub")
    # "daemon-in-process": the daemon with ca.signing_workers 0, every re-issue signed on its event loop.
    return start_daemon_target(signing_workers=0 if kind == "daemon-in-process" else None)


def _measure_target(kind: str, streams: int) -> dict[str, float]:
    target = _start(kind)
    try:
        return measure(target, streams, processes=1 if streams <= 100 else 2)
    finally:
        target.close()


# The daemon's push against the stub's, at the top stream count: one push of each kind takes ~1 s, and this
# machine moves either side's by up to half from one start to the next (the stub's forced re-issue of 5,000
# nodes: 0.55-0.99 s over five starts in one sitting).  So each round starts a daemon and the stubs one after
# the other (the order alternating), a round's ratio is daemon over stub, and a ratio is the median of the
# rounds'.  The floor ("stub") runs with the daemon's collector discipline; the plain stub of the runs before
# 2026-11-29 10:00 ("plain_stub") paid a full GC pass in some pushes (0.36-0.42 s), which favoured the daemon.
# The signing stub (from 2026-11-29 12:00) is the stub that signs each re-issued SVID on the daemon's signing
# pool: its re-issue over the stub's is what signing alone takes of the 2x budget.
PAIRED_ROUNDS = 3
_KINDS = ("daemon", "stub", "signing-stub", "plain-stub")
_RATIOS = ("bundle_push_last_ack_s", "reissue_last_ack_s")


def _paired_rounds(result: Result, top: int, rounds: int) -> None:
    """The daemon and the stubs (the same-run floor) at ``top`` streams, ``rounds`` times, then the daemon with
    in-process signing once; the daemon's figures at ``top`` are the rounds' medians."""
    runs: dict[str, list[dict[str, float]]] = {kind: [] for kind in _KINDS}
    for round_ in range(rounds):
        for kind in _KINDS if round_ % 2 == 0 else reversed(_KINDS):
            runs[kind].append(_measure_target(kind, top))
    daemon = runs["daemon"]
    for name in daemon[0]:
        result.metrics[f"{name}@{top}"] = statistics.median(m[name] for m in daemon)
    result.metrics[f"rounds@{top}"] = float(rounds)
    for kind, prefix in (("stub", "stub"), ("plain-stub", "plain_stub")):
        # Same-run floor: the stub holds next to nothing per stream, so what it costs is grpc.aio's own
        # price of an open stream; the daemon's excess over it is the daemon's per-stream state.
        for name in ("server_bytes_per_stream", *_RATIOS):
            result.metrics[f"{prefix}_{name}@{top}"] = statistics.median(m[name] for m in runs[kind])
        for name in _RATIOS:
            _ratios(result, f"{name.removesuffix('_last_ack_s')}_over_{prefix}@{top}", daemon, runs[kind], name)
    signing, reissue = runs["signing-stub"], "reissue_last_ack_s"
    result.metrics[f"signing_stub_{reissue}@{top}"] = statistics.median(m[reissue] for m in signing)
    _ratios(result, f"reissue_over_signing_stub@{top}", daemon, signing, reissue)
    floor = _ratios(result, f"signing_stub_over_stub_reissue@{top}", signing, runs["stub"], reissue)
    result.notes.append(
        f"forced re-issue at {top} streams: signing alone (the stub signing on the daemon's pool, without the "
        f"daemon's bookkeeping) takes {floor:.2f}x the stub's time, so the 2x target leaves the registry, ledger, "
        f"expiry index, session versions, ACK tracking and metrics {max(0.0, 2.0 - floor):.2f}x; the daemon is "
        f"{result.metrics[f'reissue_over_signing_stub@{top}']:.2f}x the signing stub (medians of {rounds} rounds)")
    result.metrics[f"daemon_over_stub_bytes_per_stream@{top}"] = (
        result.metrics[f"server_bytes_per_stream@{top}"] / result.metrics[f"stub_server_bytes_per_stream@{top}"])
    # Same-run comparison for the signing pool: the same fleet re-issued with signing_workers 0.
    in_process = _measure_target("daemon-in-process", top)
    for name in ("reissue_last_ack_s", "server_cpu_us_per_reissue_push"):
        result.metrics[f"in_process_{name}@{top}"] = in_process[name]
    result.metrics[f"pool_over_in_process_reissue_s@{top}"] = (
        result.metrics[f"reissue_last_ack_s@{top}"] / in_process["reissue_last_ack_s"])


def _ratios(result: Result, key: str, over: list[dict[str, float]], under: list[dict[str, float]], name: str,
            ) -> float:
    """Round by round ``over[name] / under[name]``: the median as ``key`` (returned), with ``_min`` and ``_max``."""
    ratios = [a[name] / b[name] for a, b in zip(over, under, strict=True)]
    metric, _, at = key.partition("@")
    result.metrics[key] = statistics.median(ratios)
    result.metrics[f"{metric}_min@{at}"] = min(ratios)
    result.metrics[f"{metric}_max@{at}"] = max(ratios)
    return result.metrics[key]


def run(quick: bool, stream_counts: tuple[int, ...] | None = None, target_kind: str = "stub") -> Result:
    counts = stream_counts or ((20,) if quick else (1_000, 5_000, 10_000))
    top = max(counts)
    result = Result("sds_fanout")
    result.metrics["target_is_stub"] = 1.0 if target_kind == "stub" else 0.0
    for streams in (c for c in counts if target_kind == "stub" or c != top):
        for name, value in _measure_target(target_kind, streams).items():
            result.metrics[f"{name}@{streams}"] = value
    if target_kind != "stub":
        _paired_rounds(result, top, 1 if quick else PAIRED_ROUNDS)
    result.target(f"{top} streams: <= 40 KB server memory per stream", f"server_bytes_per_stream@{top}", "<=",
                  40 * 1024)
    result.target(f"bundle push to {top} streams: last ACK <= 3 s", f"bundle_push_last_ack_s@{top}", "<=", 3.0)
    result.target(f"forced re-issue of {top // 2} nodes: last ACK <= 5 s", f"reissue_last_ack_s@{top}", "<=", 5.0)
    if target_kind != "stub":
        # Issue 16: the daemon's push as a ratio to grpc.aio's own floor (the stub), and the pool vs in process.
        result.target(f"bundle push to {top} streams <= 1.3x the stub's", f"bundle_push_over_stub@{top}", "<=", 1.3)
        result.target(f"forced re-issue of {top // 2} nodes <= 2x the stub's", f"reissue_over_stub@{top}", "<=", 2.0)
        result.target("signing pool never slower than in process (re-issue)", f"pool_over_in_process_reissue_s@{top}",
                      "<=", 1.0)
    if target_kind == "stub":
        for target in result.targets:  # a stub's figures say nothing about the daemon: no verdict
            target["met"], target["target"] = None, target["target"] + " [stub: no verdict]"
        result.notes.append("TARGET IS THE STUB SDS SERVER (bench/sds_stub_server.py), not the daemon: these "
                            "figures test the load generator only; the targets are about the daemon")
    return result
