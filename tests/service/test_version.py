"""The service reports the version pyproject.toml states, and depends on no other package here."""

from __future__ import annotations

import ast
import tomllib
from importlib.metadata import version
from pathlib import Path

from service.version import service_version

ROOT = Path(__file__).resolve().parents[2]


def test_version_is_the_installed_distribution_and_pyproject() -> None:
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert service_version() == version("notsure") == declared


def test_service_imports_nothing_from_the_cli_or_training_packages() -> None:
    offenders = []
    for path in (ROOT / "service").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [
                f"{path.name}: {n}" for n in names if n.split(".")[0] in ("notsure", "training")
            ]
    assert offenders == []
