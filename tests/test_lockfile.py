"""The committed lock files match pyproject.toml, and the check notices when they do not."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_lockcheck() -> ModuleType:
    spec = importlib.util.spec_from_file_location("lockcheck", ROOT / "requirements/lockcheck.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


lockcheck = load_lockcheck()


@pytest.fixture
def project(tmp_path: Path) -> tuple[Path, Path]:
    """A copy of pyproject.toml and the lock folder that a test may edit."""
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    shutil.copytree(ROOT / "requirements", tmp_path / "requirements")
    return tmp_path / "pyproject.toml", tmp_path / "requirements"


def test_committed_locks_agree_with_pyproject() -> None:
    assert lockcheck.problems() == []


def test_locks_pin_the_exact_versions_of_every_direct_requirement() -> None:
    dev = lockcheck.read_pins(ROOT / "requirements/lock-dev.txt")
    service = lockcheck.read_pins(ROOT / "requirements/lock-service.txt")
    # Known pins, read by hand from pyproject.toml: exact pins must be copied as they are.
    assert dev["torch"] == "2.14.1"
    assert dev["torchvision"] == "0.29.2"
    # The service lock holds no training or test tools, and agrees with the dev lock.
    assert "torch" not in service and "pytest" not in service
    assert service["fastapi"] == dev["fastapi"]
    assert set(service) < set(dev)


def test_a_new_dependency_without_relocking_fails(project: tuple[Path, Path]) -> None:
    pyproject, locks = project
    text = pyproject.read_text().replace('    "rich>=13",\n', '    "rich>=13",\n    "tblib>=3",\n')
    pyproject.write_text(text)
    found = lockcheck.problems(pyproject, locks)
    assert any("changed since the lock files were made" in p for p in found)
    assert any("tblib" in p and "not pinned" in p for p in found)


def test_a_narrowed_range_outside_the_pin_fails(project: tuple[Path, Path]) -> None:
    pyproject, locks = project
    pyproject.write_text(pyproject.read_text().replace('"numpy>=1.26"', '"numpy<1.20"'))
    found = lockcheck.problems(pyproject, locks)
    assert any("numpy==" in p and "outside" in p for p in found)


def test_build_requirements_are_locked_for_every_install(project: tuple[Path, Path]) -> None:
    pyproject, locks = project
    for lock in ("lock-service.txt", "lock-dev.txt"):
        assert "setuptools" in lockcheck.read_pins(locks / lock)
    pyproject.write_text(pyproject.read_text().replace('"setuptools>=68"', '"setuptools<60"'))
    found = lockcheck.problems(pyproject, locks)
    assert sum("build-system's '<60'" in p for p in found) == 2


def test_locks_that_pin_different_versions_fail(project: tuple[Path, Path]) -> None:
    pyproject, locks = project
    service = locks / "lock-service.txt"
    pin = f"fastapi=={lockcheck.read_pins(service)['fastapi']}"
    service.write_text(service.read_text().replace(pin, "fastapi==0.115.0"))
    found = lockcheck.problems(pyproject, locks)
    assert any(p.startswith("fastapi: 0.115.0 in lock-service.txt") for p in found)


def test_every_install_path_uses_the_locks() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert "install -q -r requirements/lock-service.txt" in makefile
    assert "install -q -r requirements/lock-dev.txt" in makefile
    assert "$(PYTHON) -m venv" in makefile  # a project environment, not the global interpreter
    assert "requirements/lock-service.txt" in (ROOT / "Dockerfile").read_text()
    assert "make test" in (ROOT / ".ci/run").read_text()
