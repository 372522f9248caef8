"""Issuance across cores: a signing storm on the process pool with 1 worker, then with every core.

Both rates go through the same :class:`SigningPool` path (worker key generation + signing, parent
wrapping), so their ratio is the scaling the pool buys: the median of five rounds' own ratios
(``all_over_one``; best rate over best rate is ``all_over_one_best``).
The Go reference's SDS path on one goroutine and on one per core (GOMAXPROCS = cores) runs in between,
for ``one_worker_over_go`` and ``all_cores_over_go``.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from bench.common import START, Result, fresh_authority
from bench.go_reference import GoReference
from bench.issuance import SPIFFE_ID, go_reference, make_csr
from ca_service.adapters.signing_pool import SigningPool
from ca_service.pki.identity import SpiffeId
from ca_service.services.authority import Authority


def _raw_sign(seconds: float) -> float:
    """In a worker: ECDSA P-256 signatures per second for ``seconds``."""
    key = ec.generate_private_key(ec.SECP256R1())
    algorithm, ops, started = ec.ECDSA(hashes.SHA256()), 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        for _ in range(50):
            key.sign(b"m" * 32, algorithm)
        ops += 50
    return ops / (time.perf_counter() - started)


def _reference_scaling(cores: int, seconds: float) -> float:
    """Same-run physical reference: total raw-sign rate of ``cores`` processes over that of one process.

    On a VM whose vCPUs share a physical core (SMT siblings), OpenSSL's P-256 code scales far below
    2x even with no Python in the way; that is the ceiling any signer on this machine can reach.
    """
    with ProcessPoolExecutor(cores, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(_raw_sign, [0.05] * cores))  # start every worker first
        one = pool.submit(_raw_sign, seconds).result()
        many = sum(pool.map(_raw_sign, [seconds] * cores))
    return many / one


def _storm_rate(pool: SigningPool, ids: list[SpiffeId], rounds: int) -> float:
    best = 0.0
    for _ in range(rounds):
        started = time.perf_counter()
        asyncio.run(pool.issue_many(ids, now=START))
        best = max(best, len(ids) / (time.perf_counter() - started))
    return best


def _pool_rate(authority: Authority, workers: int, ids: list[SpiffeId], rounds: int) -> float:
    pool = SigningPool(authority.issuer, workers=workers)
    try:
        pool.warm_up()  # spawning workers is start-up cost, not storm cost
        return _storm_rate(pool, ids, rounds)
    finally:
        pool.close()


def run(quick: bool) -> Result:
    count, rounds = (256, 1) if quick else (4000, 3)
    cores = len(os.sched_getaffinity(0))
    authority = fresh_authority()
    ids = [SpiffeId.parse(f"spiffe://cluster.local/ns/storm/sa/sa-{i}") for i in range(count)]
    go = go_reference(authority, make_csr(SPIFFE_ID), START)
    samples: list[tuple[float, float]] = []  # (1 worker, N workers) per round
    go_one = go_many = 0.0
    # Alternate 1-worker and N-worker rounds (ours and Go's) so that noise from neighbours hits all alike.
    # The one-worker rate of the same code moves by a third from round to round on this machine (6,600-8,400
    # leaves/s in one sitting), so the ratio is the median of five rounds' own ratios, not best over best.
    try:
        for _ in range(1 if quick else 5):
            samples.append((_pool_rate(authority, 1, ids, rounds), _pool_rate(authority, cores, ids, rounds)))
            if isinstance(go, GoReference):
                go_one = max(go_one, go.rate("sds", seconds=0.3 if quick else 1.5)[0])
                go_many = max(go_many, go.rate("sds", seconds=0.3 if quick else 1.5, workers=cores)[0])
    finally:
        if isinstance(go, GoReference):
            go.close()
    one, many = max(s[0] for s in samples), max(s[1] for s in samples)
    ratio = statistics.median(m / o for o, m in samples)
    reference = max(_reference_scaling(cores, 0.3 if quick else 1.5) for _ in range(1 if quick else 2))
    result = Result("cores")
    result.metrics.update({"cores": float(cores), "storm_size": float(count), "rounds": float(len(samples)),
                           "one_worker_ops_s": one, "all_cores_ops_s": many, "all_over_one": ratio,
                           "all_over_one_best": many / one,
                           "raw_sign_all_over_one": reference, "scaling_vs_raw_sign": ratio / reference})
    if isinstance(go, GoReference):
        # Go's SDS path on one goroutine per core (GOMAXPROCS = cores): what istiod's signer gives a storm.
        result.metrics.update({"go_one_core_ops_s": go_one, "go_all_cores_ops_s": go_many,
                               "go_all_over_one": go_many / go_one, "one_worker_over_go": one / go_one,
                               "all_cores_over_go": many / go_many})
    else:
        result.notes.append(go)
    # Issue 16: two cores give >= 1.8x one core where bare ECDSA on the machine gives >= 1.9x.
    result.target(f"{cores} cores >= 1.8x one core for a signing storm", "all_over_one", ">=", 1.8)
    if reference < 1.9:
        result.notes.append(f"raw ECDSA itself scaled only {reference:.2f}x on {cores} cores in this run, under the "
                            "1.9x the storm target presumes: the machine, not the pool, set the ceiling")
    if cores < 2:
        result.notes.append("only one usable core: the scaling target cannot be measured here")
    return result
