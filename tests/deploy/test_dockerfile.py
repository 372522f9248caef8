"""The Dockerfile's properties that can be checked without a Docker engine, and hadolint on it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deploy.manifests import ROOT, one, render

DOCKERFILE = ROOT / "Dockerfile"
HADOLINT = Path(sys.executable).parent / "hadolint"
# Things that compile or fetch: none of them belongs in the image that runs.
BUILD_TOOLS = re.compile(r"\b(gcc|g\+\+|make|build-essential|python3-dev|libffi-dev|libssl-dev|cargo|rustc|git)\b")

Instruction = tuple[str, str]


def instructions(text: str) -> list[Instruction]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    logical, current = [], ""
    for line in text.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.rstrip("\\").strip() + " " if line.endswith("\\") else line.strip()
        if not line.endswith("\\"):
            logical.append(current)
            current = ""
    return [(ins.split(None, 1)[0].upper(), ins.split(None, 1)[1] if " " in ins else "") for ins in logical]


def final_stage(text: str) -> list[Instruction]:
    parsed = instructions(text)
    last_from = max(i for i, (op, _) in enumerate(parsed) if op == "FROM")
    return parsed[last_from:]


@pytest.fixture(scope="module")
def stage() -> list[Instruction]:
    return final_stage(DOCKERFILE.read_text())


def _args(stage: list[Instruction], op: str) -> list[str]:
    return [args for o, args in stage if o == op]


def test_the_image_is_built_in_stages_and_runs_on_slim_python_3_11(stage: list[Instruction]) -> None:
    parsed = instructions(DOCKERFILE.read_text())
    assert sum(op == "FROM" for op, _ in parsed) >= 2
    (base,) = _args(stage, "FROM")
    assert re.fullmatch(r"python:3\.11-slim(-\w+)?", base.split()[0])


def test_the_final_stage_runs_as_the_numeric_non_root_uid_the_deployment_expects(stage: list[Instruction]) -> None:
    users = _args(stage, "USER")
    assert users, "no USER: the image would run as root"
    match = re.fullmatch(r"(\d+)(?::(\d+))?", users[-1].strip())
    assert match, f"USER {users[-1]} is not numeric: runAsNonRoot cannot verify a name"
    assert int(match[1]) != 0 and (match[2] is None or int(match[2]) != 0)
    pod = one(render("base"), "Deployment", "ca-service")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == int(match[1])


def test_sigterm_reaches_the_daemon(stage: list[Instruction]) -> None:
    assert _args(stage, "STOPSIGNAL") == ["SIGTERM"]
    # Exec form (a JSON array): no /bin/sh -c between the runtime's signal and the daemon.
    for op in ("ENTRYPOINT", "CMD"):
        (args,) = _args(stage, op)
        assert isinstance(json.loads(args), list), f"{op} is in shell form"
    assert json.loads(_args(stage, "ENTRYPOINT")[0]) == ["ca-service"]


def test_the_final_stage_installs_no_build_tools_and_keeps_no_pip_cache(stage: list[Instruction]) -> None:
    for run in _args(stage, "RUN"):
        assert not BUILD_TOOLS.search(run), run
        if "pip install" in run:
            assert "--no-cache-dir" in run and "--no-index" in run, run


def test_the_checks_catch_a_root_shell_form_image() -> None:
    bad = ("FROM python:3.11-slim AS b\nRUN true\n"
           "FROM python:3.11-slim\nRUN apt-get install -y \\\n    gcc\nCMD ca-service serve\n")
    stage = final_stage(bad)
    assert _args(stage, "USER") == []
    with pytest.raises(json.JSONDecodeError):
        json.loads(_args(stage, "CMD")[0])
    assert BUILD_TOOLS.search(_args(stage, "RUN")[0])


def test_hadolint_finds_nothing() -> None:
    proc = subprocess.run([str(HADOLINT), str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
