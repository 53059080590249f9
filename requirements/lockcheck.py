"""Check that the lock files still match pyproject.toml (run by the tests and by `make lock`).

Two checks, either of which fails when someone edits the dependencies without `make lock`:
- a stamp: the sha256 of pyproject.toml's dependency tables, written by `make lock`
  (`--stamp`), must equal the hash of the tables as they are now;
- every requirement of the project (its own, and each extra's) is pinned in the lock that
  installs it, at a version inside the requirement's range, and the service lock pins nothing
  at another version than the dev lock.

    python requirements/lockcheck.py            # exit 1 with the reasons when they disagree
    python requirements/lockcheck.py --stamp    # after re-locking: record the current tables
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# Which extras each lock installs (the service lock: none, only the project's own deps).
LOCKS = {"lock-service.txt": (), "lock-dev.txt": ("train", "dev")}
STAMP = "pyproject-deps.sha256"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)")


BUILD = "build-system"


def dependency_tables(pyproject: Path) -> dict[str, list[str]]:
    """The dependency lists of pyproject.toml: "" for the project's own, each extra, and the
    build requirements (every lock pins them: installs build the project without isolation)."""
    toml = tomllib.loads(pyproject.read_text())
    project = toml["project"]
    tables = {"": list(project.get("dependencies", []))}
    tables.update(project.get("optional-dependencies", {}))
    tables[BUILD] = list(toml.get("build-system", {}).get("requires", []))
    return tables


def tables_hash(pyproject: Path) -> str:
    canonical = json.dumps(dependency_tables(pyproject), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def read_pins(lock: Path) -> dict[str, str]:
    """Package name (canonical) -> pinned version, from a pip-compile output file."""
    pins: dict[str, str] = {}
    for line in lock.read_text().splitlines():
        m = PIN.match(line.strip())
        if m:
            pins[canonicalize_name(m.group(1))] = m.group(2)
    return pins


def problems(pyproject: Path = ROOT / "pyproject.toml", locks_dir: Path = HERE) -> list[str]:
    """Every way the lock files disagree with pyproject.toml (empty when they agree)."""
    found: list[str] = []
    stamp = locks_dir / STAMP
    if not stamp.exists():
        found.append(f"{stamp.name} is missing: run `make lock`")
    elif stamp.read_text().split()[0] != tables_hash(pyproject):
        found.append(
            "pyproject.toml's dependencies changed since the lock files were made: run `make lock`"
        )
    tables = dependency_tables(pyproject)
    project_name = canonicalize_name(tomllib.loads(pyproject.read_text())["project"]["name"])
    pins_by_lock: dict[str, dict[str, str]] = {}
    for lock_name, extras in LOCKS.items():
        lock = locks_dir / lock_name
        if not lock.exists():
            found.append(f"{lock_name} is missing: run `make lock`")
            continue
        pins = pins_by_lock[lock_name] = read_pins(lock)
        for table in ("", BUILD, *extras):
            for spec in tables.get(table, []):
                req = Requirement(spec)
                extra = "" if table == BUILD else table
                if req.marker is not None and not req.marker.evaluate({"extra": extra}):
                    continue  # not for this platform (the locks are made for the CI's)
                name = canonicalize_name(req.name)
                if name == project_name:
                    continue
                where = {"": "dependencies", BUILD: "build-system"}.get(table, f"[{table}]")
                if name not in pins:
                    found.append(f"{lock_name}: {req.name} ({where}) is not pinned")
                elif not req.specifier.contains(pins[name], prereleases=True):
                    found.append(
                        f"{lock_name}: {req.name}=={pins[name]} is outside {where}'s "
                        f"'{req.specifier}'"
                    )
    service, dev = pins_by_lock.get("lock-service.txt", {}), pins_by_lock.get("lock-dev.txt", {})
    for name in sorted(service.keys() & dev.keys()):
        if service[name] != dev[name]:
            found.append(
                f"{name}: {service[name]} in lock-service.txt, {dev[name]} in lock-dev.txt"
            )
    return found


def main(argv: list[str]) -> int:
    if "--stamp" in argv:
        (HERE / STAMP).write_text(f"{tables_hash(ROOT / 'pyproject.toml')}  pyproject.toml\n")
    found = problems()
    for line in found:
        sys.stderr.write(f"lockcheck: {line}\n")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
