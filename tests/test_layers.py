"""Dependencies point inward: the pure core imports nothing outside the standard library,
``cryptography`` and ``ca_service.errors``; services never import an adapter or the assembly."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "ca_service"
CORE = ("pki", "rotation")
# Allowed inside the pure core besides the standard library (the core's packages import each other).
CORE_ALLOWED = ("cryptography", "ca_service.errors", "ca_service.pki", "ca_service.rotation")
# Never imported by services/ (they are above it or at the edge).
ABOVE_SERVICES = ("ca_service.adapters", "ca_service.rpc", "ca_service.web", "ca_service.federation",
                  "ca_service.app", "ca_service.cli", "ca_service.operations", "ca_service.admin_client")
# Only the assembly layer may import the assembly.
ASSEMBLY = ("ca_service.app", "ca_service.cli", "ca_service.operations")


def imports_of(path: Path) -> list[str]:
    """Every module ``path`` imports, anywhere in the file (TYPE_CHECKING blocks and functions included)."""
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


def modules(*packages: str) -> list[Path]:
    return sorted(p for pkg in packages for p in (PACKAGE / pkg).rglob("*.py"))


def within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def core_violations(path: Path) -> list[str]:
    return [name for name in imports_of(path)
            if name != "__future__" and name.split(".")[0] not in sys.stdlib_module_names
            and not within(name, CORE_ALLOWED)]


@pytest.mark.parametrize("path", modules(*CORE), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_the_pure_core_imports_only_the_standard_library_cryptography_and_errors(path: Path):
    assert core_violations(path) == []


@pytest.mark.parametrize("path", modules("services"), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_services_import_no_adapter_edge_or_assembly(path: Path):
    assert [name for name in imports_of(path) if within(name, ABOVE_SERVICES)] == []


def test_only_the_assembly_layer_imports_the_assembly():
    offenders = {str(p.relative_to(PACKAGE)): name for p in PACKAGE.rglob("*.py") for name in imports_of(p)
                 if within(name, ASSEMBLY) and p.stem not in ("app", "cli", "operations", "__main__", "admin_client")}
    assert offenders == {}


def test_the_checker_catches_a_forbidden_import(tmp_path: Path):
    bad = tmp_path / "bad.py"
    bad.write_text("import json\nfrom cryptography import x509\nfrom ca_service.config import Settings\n"
                   "def f():\n    import yaml\n")
    assert core_violations(bad) == ["ca_service.config", "yaml"]


def test_no_constructor_subscribes_to_anything():
    """Reactions are wired in one visible place (app.register_reactions), never hidden in an __init__."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.FunctionDef) and node.name == "__init__":
                calls = [c for c in ast.walk(node) if isinstance(c, ast.Call) and isinstance(c.func, ast.Attribute)]
                offenders += [f"{path.relative_to(PACKAGE)}:{c.lineno}" for c in calls if c.func.attr == "subscribe"]
    assert offenders == []
