"""SIGKILL the real daemon at random instants through root and intermediate rotations, and inside the
commit itself (after the state's temp file is written, before and after its rename): the state always
loads consistent, its revision never goes back, and a final clean run finishes the rotation.
(issue 15, "Fault injection")"""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from tests.faults.daemon import Daemon, check_consistent, read_state, write_config

DEFAULT_KILLS = 6
SLOW_KILLS = 60


def _one_kill(data: Path, config: Path, rng: random.Random, kill: int, revision: int) -> int:
    """Start the daemon, force a rotation when none is running, kill it at a random point; check."""
    fault = ("crash-before-rename", "crash-after-rename", "timer")[kill % 3]
    daemon = Daemon(data, config, fault=fault if fault != "timer" else "none", nth=rng.randint(1, 2))
    try:
        if not daemon.wait_ready(crash_expected=fault != "timer"):
            if revision == 0 and not (data / "state" / "authority.json").exists():
                return 0  # crashed inside the very first write: nothing was ever committed, nothing lost
            return check_consistent(data, config, revision).revision  # crashed in a start-up commit
        state = read_state(data)
        scope = "root" if state.root_rotation is None and kill % 2 == 0 else "intermediate"
        daemon.rotate(scope)  # refused while a root rotation runs: fine, the rotation in flight is the target
        if fault == "timer":
            time.sleep(rng.uniform(0.0, 3.0))  # a root rotation takes ~3 s here: every phase gets hit
        else:
            deadline = time.monotonic() + 10
            while daemon.proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)  # the injected crash fires inside one of the next commits
    finally:
        daemon.kill()
    return check_consistent(data, config, revision).revision


def _finish(data: Path, config: Path, revision: int) -> None:
    daemon = Daemon(data, config)
    try:
        daemon.wait_ready()
        deadline = time.monotonic() + 60
        while read_state(data).root_rotation is not None:
            assert time.monotonic() < deadline, "the root rotation did not finish after the kills"
            time.sleep(0.1)
        assert daemon.healthy()
    finally:
        assert daemon.stop() == 0, daemon.output.decode()[-3000:]
    final = check_consistent(data, config, revision)
    assert len(final.roots) == 1


def _run(tmp_path: Path, kills: int, seed: int) -> None:
    data = tmp_path / "data"
    config = write_config(tmp_path / "config.yaml")
    rng = random.Random(seed)  # seeded: a failure is reproducible
    revision = 0
    for kill in range(kills):
        revision = _one_kill(data, config, rng, kill, revision)
    # Each run commits at least once unless its crash hit the very first write (bootstrap).
    assert revision >= kills // 2, f"only {revision} commits in {kills} runs: the kills did not interrupt rotations"
    _finish(data, config, revision)


def test_sigkill_at_random_points_and_inside_the_commit_never_corrupts_the_state(tmp_path: Path) -> None:
    _run(tmp_path, DEFAULT_KILLS, seed=15)


@pytest.mark.slow
def test_sixty_sigkills_through_every_rotation_phase_never_corrupt_the_state(tmp_path: Path) -> None:
    _run(tmp_path, SLOW_KILLS, seed=20301)
