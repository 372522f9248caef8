"""Shared bench plumbing: timing, a fresh CA on a temp directory, machine facts, result records.

Benchmarks report ratios against baselines measured in the same run, because the machine is shared
and noisy; absolute ops/s are printed for context only.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/run.py` from the repo root imports ca_service from here
    sys.path.insert(0, str(ROOT))

from ca_service.clock import Clock  # noqa: E402
from ca_service.config import Settings, load_settings  # noqa: E402
from ca_service.services.authority import Authority  # noqa: E402
from ca_service.storage.directory import DirectoryStore  # noqa: E402
from tests.clock import FakeClock  # noqa: E402

START = dt.datetime(2030, 1, 1, 12, 0, tzinfo=dt.UTC)


@dataclass
class Result:
    """One benchmark's figures: ``metrics`` are numbers, ``targets`` are named checks against them."""

    name: str
    metrics: dict[str, float] = field(default_factory=dict)
    targets: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def target(self, label: str, metric: str, op: str, bound: float) -> None:
        value = self.metrics.get(metric)
        met = None if value is None else (value >= bound if op == ">=" else value < bound if op == "<" else
                                          value <= bound)
        self.targets.append({"target": label, "metric": metric, "op": op, "bound": bound, "value": value,
                             "met": met})

    def as_dict(self) -> dict[str, Any]:
        return {"metrics": self.metrics, "targets": self.targets, "notes": self.notes}


def rate(fn: Callable[[], object], *, seconds: float, min_ops: int = 20) -> float:
    """Operations per second of ``fn`` run back to back for about ``seconds`` (at least ``min_ops`` times)."""
    for _ in range(min(5, min_ops)):  # warm caches and lazy imports outside the measurement
        fn()
    ops, started = 0, time.perf_counter()
    deadline = started + seconds
    while ops < min_ops or time.perf_counter() < deadline:
        for _ in range(10):
            fn()
        ops += 10
    return ops / (time.perf_counter() - started)


def temp_settings(directory: Path | None = None) -> Settings:
    base = directory or Path(tempfile.mkdtemp(prefix="ca-bench-"))
    return load_settings(environ={}, overrides={"data_dir": str(base / "data")})


def fresh_authority(clock: Clock | None = None, directory: Path | None = None) -> Authority:
    """A bootstrapped CA (embedded-default profile) on the real directory store in a temp directory."""
    settings = temp_settings(directory)
    auth = Authority(DirectoryStore(settings.data_dir / "state"), settings.domain, settings.ca,
                     clock or FakeClock(START))
    auth.load_or_bootstrap()
    return auth


def rss_bytes() -> int:
    """Resident set size of this process, from /proc (no psutil in the venv)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def process_cpu() -> float:
    return time.process_time()


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def environment(command: list[str]) -> dict[str, Any]:
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {"cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)), "cpu": cpu_model(),
                    "platform": platform.platform()},
        "versions": {"python": platform.python_version(), "cryptography": _version("cryptography"),
                     "grpcio": _version("grpcio"), "xds-protos": _version("xds-protos"),
                     "ca-service": _version("ca-service")},
        "command": " ".join(command),
    }
