"""The one state-change path: every change of the CA state becomes one :class:`StateChange` event.

The authority publishes it after the swap, whatever caused the change: a commit here, a (re)load
from the store, or a newer record received from another replica (the Kubernetes watch).  The
reactions are registered in one place, ``app.register_reactions``, in a stated order; a reaction
that raises is logged and counted (``ca_state_reaction_failures_total{reaction}``) and the others
still run, so a broken file writer never stops SDS pushes.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ca_service.rotation.state import AuthorityState

if TYPE_CHECKING:
    from prometheus_client import Counter

log = logging.getLogger(__name__)


class ChangeCause(enum.StrEnum):
    COMMITTED = "committed"  # written by this process (a rotation, a forced change)
    LOADED = "loaded"  # read from the store (start-up, a reload after a lost compare-and-swap)
    REPLICATED = "replicated"  # received from another replica (the Kubernetes watch)


@dataclass(frozen=True)
class StateChange:
    old: AuthorityState
    new: AuthorityState
    cause: ChangeCause

    @property
    def bundle_changed(self) -> bool:
        return self.old.bundle_sequence != self.new.bundle_sequence


Reaction = Callable[[StateChange], None]


class StateReactions:
    """The ordered reactions to :class:`StateChange` events; run in registration order."""

    def __init__(self, failures: Counter | None = None) -> None:
        self._reactions: list[tuple[str, Reaction]] = []
        self._failures = failures

    def add(self, name: str, reaction: Reaction) -> Callable[[], None]:
        """Register ``reaction`` under ``name`` (the metric label); returns a function that removes it."""
        entry = (name, reaction)
        self._reactions.append(entry)
        return lambda: self._reactions.remove(entry)

    def count_failures_in(self, failures: Counter) -> None:
        self._failures = failures

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self._reactions]

    def publish(self, change: StateChange) -> None:
        for name, reaction in list(self._reactions):
            try:
                reaction(change)
            except Exception:
                # One broken consumer (a metrics hook, a file writer) must not stop the others.
                log.exception("state reaction %s failed", name,
                              extra={"reaction": name, "cause": str(change.cause), "revision": change.new.revision})
                if self._failures is not None:
                    self._failures.labels(reaction=name).inc()
