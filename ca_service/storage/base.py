"""The storage port: named records of bytes with compare-and-swap on every write.

A record's ``version`` is opaque to callers: a generation counter in the directory store, the
``resourceVersion`` in the Kubernetes store.  Writes name the version they expect (``None`` = the
record must not exist yet) and fail with :class:`ConflictError` otherwise, so two writers (two
replicas, or a CLI next to a daemon) can never silently overwrite each other.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

AUTHORITY_RECORD = "authority"


@dataclass(frozen=True)
class Record:
    name: str
    data: Mapping[str, bytes]
    version: str


class AuthorityStore(Protocol):
    """Durable CA state.  Implementations must make every write atomic: after a crash at any
    instant a reader sees either the previous record or the new one, never a mix."""

    def read(self, name: str) -> Record | None:
        """The current record, or None if it was never written.

        Raises:
            StorageError: if it exists but cannot be read safely (corrupt, unsafe permissions).
        """
        ...

    def write(self, name: str, data: Mapping[str, bytes], *, expected_version: str | None) -> Record:
        """Replace the record if its current version is ``expected_version``.

        Raises:
            ConflictError: if the current version differs (or the record exists when None was expected).
            StorageError: if the write failed; the previous record is untouched.
        """
        ...

    def describe(self) -> str:
        """Where the state lives, for status output and logs."""
        ...
