"""The signing pool's worker side: what runs in each worker process (see :mod:`.signing_pool`).

A worker loads the signing intermediate once (:func:`init_worker`, the executor's initializer), ends
the moment the daemon does, and answers chunks (:func:`sign_chunk`): a fresh key and a leaf per identity,
under the validity the parent's :class:`~ca_service.services.issuer.BatchPlan` fixed.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import multiprocessing
import multiprocessing.connection
import os
import threading
import time
from collections.abc import Sequence
from typing import NamedTuple

from cryptography import x509

from ca_service.errors import NotReadyError
from ca_service.pki.identity import SpiffeId
from ca_service.pki.keys import KeyAlgorithm, generate_private_key, load_private_key, private_key_to_pem
from ca_service.pki.templates import IssuerProfile, LeafEncoder
from ca_service.services.issuer import sign_leaf

# In a worker: the signer it loaded (key id, profile); None in the parent.
_worker_signer: tuple[str, IssuerProfile] | None = None

# How much lower than the daemon's a worker's CPU priority is (added to its nice value; 19 at most).  A storm
# is batch work and the event loop is not: the loop installs and pushes each chunk the workers return, and
# it is the storm's critical path.  At equal priority the kernel gave the loop an equal share with two busy
# workers on two cores, and a forced re-issue of 5,000 nodes took a median 1.96 s to its last ACK; with
# the workers niced it was 1.75 s (bench/README.md).  A worker still gets every cycle the loop leaves idle.
WORKER_NICENESS = 10


class StaleSignerError(NotReadyError):
    """A worker was asked to sign with an intermediate other than the one it loaded."""


def _exit_with_parent() -> None:
    """End this worker the moment the daemon ends, however it ends (SIGKILL included).

    A worker holds the signing intermediate's key; an orphan would keep it in memory indefinitely.
    ``spawn`` gives each child a pipe whose other end only the parent holds (``parent_process().sentinel``):
    the kernel closes it when the parent dies, so the wait below returns at once.  (PR_SET_PDEATHSIG
    would fire when the *thread* that spawned us exits, which for a pool started from a warm-up thread
    is long before the daemon does.)
    """
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(1)  # no cleanup to run: nothing here is durable, and the key must go now

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _lower_priority() -> None:
    """Run this worker :data:`WORKER_NICENESS` below the daemon (lowering one's own priority needs no privilege)."""
    # A sandbox that forbids even that: the worker signs at the daemon's priority.
    with contextlib.suppress(OSError):
        os.nice(WORKER_NICENESS)


def held_signer(key_id: str) -> IssuerProfile:
    """In a worker: the signer it loaded, which must be ``key_id``.

    Raises:
        StaleSignerError: if the worker holds another intermediate (or none).
    """
    if _worker_signer is None or _worker_signer[0] != key_id:
        raise StaleSignerError(f"worker holds signer {_worker_signer and _worker_signer[0]}, asked for {key_id}")
    return _worker_signer[1]


def init_worker(key_id: str, cert_pem: bytes, key_pem: bytes) -> None:
    global _worker_signer
    _exit_with_parent()
    _lower_priority()
    cert = x509.load_pem_x509_certificate(cert_pem)
    _worker_signer = (key_id, IssuerProfile.of(cert, load_private_key(key_pem)))


class SignedChunk(NamedTuple):
    """A worker's answer for one chunk, a list per field: the parent takes it apart with one ``zip`` instead
    of unpickling, tracking and freeing a tuple per leaf (a storm parent's share competes with the workers)."""

    leaves: list[bytes]  # Certificate DER
    serials: list[int]
    key_pems: list[bytes]  # PKCS#8 PEM of each new key, as SDS sends it
    seconds: list[float]  # key generation + signing time of each, for ``ca_signing_duration_seconds``


def sign_chunk(
    key_id: str, spiffe_ids: Sequence[str], not_before: dt.datetime, not_after: dt.datetime,
    algorithm: KeyAlgorithm, encoder: LeafEncoder = LeafEncoder.TEMPLATE,
) -> SignedChunk:
    """In a worker: a fresh key and a signed leaf per identity.

    The parent need not parse what it gets back: the serial comes with the leaf, the validity is the batch's,
    and the key comes as the PEM that SDS sends (parsing a key was 17 us, a leaf 2 us, of a parent's share
    that on two cores competes with the workers).
    """
    profile = held_signer(key_id)
    out = SignedChunk([], [], [], [])
    for raw in spiffe_ids:
        started = time.perf_counter()
        key = generate_private_key(algorithm)
        serial = x509.random_serial_number()
        out.leaves.append(sign_leaf(profile, key.public_key(), SpiffeId.parse(raw), serial=serial,
                                    not_before=not_before, not_after=not_after, encoder=encoder))
        out.serials.append(serial)
        out.key_pems.append(private_key_to_pem(key))
        out.seconds.append(time.perf_counter() - started)
    return out
