"""The ACK ledger: which of our own bundle sequences each SDS stream has ACKed.

The one owner of ACK bookkeeping.  The servicer records what it pushed and what the client ACKed or
NACKed; root rotation reads it through :class:`~ca_service.services.ports.AckTracker` (B may sign
only after every connected stream has ACKed a bundle that contains it).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class _StreamAcks:
    receives_own_bundle: bool = False
    acked: int = 0  # highest own bundle sequence ACKed
    pending: dict[str, int] = field(default_factory=dict)  # nonce -> own bundle sequence pushed with it


class AckLedger:
    """Per-stream ACK state, keyed by any hashable stream handle (the hub's watch)."""

    def __init__(self) -> None:
        self._streams: dict[object, _StreamAcks] = {}
        self.pushes = 0  # every push recorded, for "is SDS busy" (the collector schedule waits for quiet)

    def open(self, stream: object) -> None:
        self._streams[stream] = _StreamAcks()

    def close(self, stream: object) -> None:
        self._streams.pop(stream, None)

    def pushed(self, stream: object, nonce: str, own_bundle_sequence: int) -> None:
        """A response went out under ``nonce``; it carried our own bundle at that sequence (0: it did not)."""
        self.pushes += 1
        entry = self._streams.get(stream)
        if entry is not None and own_bundle_sequence:
            entry.receives_own_bundle = True
            entry.pending[nonce] = own_bundle_sequence

    def acked(self, stream: object) -> None:
        """The client ACKed the last nonce: that covers every earlier push on the stream."""
        entry = self._streams.get(stream)
        if entry is not None and entry.pending:
            entry.acked = max(entry.acked, max(entry.pending.values()))
            entry.pending.clear()

    def nacked(self, stream: object, nonce: str) -> None:
        entry = self._streams.get(stream)
        if entry is not None:
            entry.pending.pop(nonce, None)

    def connected_streams(self) -> int:
        return sum(1 for e in self._streams.values() if e.receives_own_bundle)

    def streams_behind(self, bundle_sequence: int) -> int:
        return sum(1 for e in self._streams.values() if e.receives_own_bundle and e.acked < bundle_sequence)

    def lowest_acked(self) -> int | None:
        """The lowest own bundle sequence ACKed by the streams that receive it (this replica's ACK frontier,
        published for the cluster-wide gate); None without such streams."""
        return min((e.acked for e in self._streams.values() if e.receives_own_bundle), default=None)
