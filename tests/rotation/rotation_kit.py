"""Rotation test kit: a hand-written ACK tracker and a CA + registry + reconciler on the real store."""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from pathlib import Path

from ca_service.config import Settings
from ca_service.rotation.planner import RotationPolicy
from ca_service.services.authority import Authority
from ca_service.services.reconciler import Reconciler
from ca_service.services.workloads import WorkloadRegistry
from ca_service.storage.directory import DirectoryStore
from ca_service.telemetry import Telemetry
from tests.clock import FakeClock


class FakeAckTracker:
    """Streams ACK only when the test says so."""

    def __init__(self, streams: int = 0) -> None:
        self.streams = streams
        self.acked = 0  # highest bundle sequence every stream has ACKed

    def connected_streams(self) -> int:
        return self.streams

    def streams_behind(self, bundle_sequence: int) -> int:
        return 0 if self.acked >= bundle_sequence else self.streams

    def ack_all(self, sequence: int) -> None:
        self.acked = sequence


@dataclass
class Env:
    settings: Settings
    clock: FakeClock
    acks: FakeAckTracker
    authority: Authority
    registry: WorkloadRegistry
    reconciler: Reconciler
    telemetry: Telemetry

    def restart(self) -> Env:
        """A new daemon on the same directory store (in-memory state and registry are gone)."""
        return make_env(self.settings, self.clock, self.acks)


def make_env(settings: Settings, clock: FakeClock, acks: FakeAckTracker | None = None, draw: float = 0.5) -> Env:
    acks = acks if acks is not None else FakeAckTracker()
    authority = Authority(DirectoryStore(settings.data_dir / "state"), settings.domain, settings.ca, clock)
    authority.load_or_bootstrap()
    rng = random.Random()
    rng.random = lambda: draw  # type: ignore[method-assign]
    telemetry = Telemetry()
    registry = WorkloadRegistry(authority, settings.rotation, clock, rng=rng, telemetry=telemetry)
    reconciler = Reconciler(authority, registry, RotationPolicy.from_settings(settings), telemetry, acks=acks,
                            clock=clock)
    return Env(settings, clock, acks, authority, registry, reconciler, telemetry)




def with_rotation(settings: Settings, **changes: object) -> Settings:
    return dataclasses.replace(settings, rotation=dataclasses.replace(settings.rotation, **changes))


def metric(telemetry: Telemetry, name: str, **labels: str) -> float:
    value = telemetry.registry.get_sample_value(name, labels)
    return value or 0.0


def tmp_cacerts(tmp_path: Path) -> Path:
    return tmp_path / "cacerts"
