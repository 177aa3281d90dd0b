"""Fail with a clear message when constraints/test.txt no longer matches pyproject.toml.

Every requirement that pyproject.toml declares (runtime, `test` and `server` extras) must be pinned in the
lock, at a version its bounds allow, and the lock must pin nothing that no longer belongs to the tree. Run it
with the venv's Python (it needs `packaging`, a test dependency): `python .ci/check_lock.py`.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "constraints" / "test.txt"
EXTRAS = ("test", "server")
REFRESH = "refresh it: see 'Refreshing the lock' in tests/README.md"


def declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in EXTRAS:
        reqs += [Requirement(r) for r in project["optional-dependencies"][extra]]
    return [r for r in reqs if canonicalize_name(r.name) != "clawq"]


def pinned() -> dict[str, tuple[str, set[str]]]:
    pins: dict[str, tuple[str, set[str]]] = {}
    current = ""
    for line in LOCK.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9._-]+)==(\S+)$", line)
        if match:
            current = canonicalize_name(match[1])
            pins[current] = (match[2], set())
        elif current and (via := re.match(r"^\s+#\s+(?:via\s+)?([A-Za-z0-9._-]+)", line)):
            pins[current][1].add(canonicalize_name(via[1]))
    return pins


def problems() -> list[str]:
    pins = pinned()
    found = []
    for req in declared():
        name = canonicalize_name(req.name)
        if name not in pins:
            found.append(f"{req.name} is declared in pyproject.toml but not pinned in {LOCK.name}")
        elif not req.specifier.contains(pins[name][0], prereleases=True):
            found.append(f"{req.name}=={pins[name][0]} in {LOCK.name} is outside pyproject.toml's {req}")
    names = {canonicalize_name(r.name) for r in declared()} | {"clawq"}
    for name, (_, via) in sorted(pins.items()):
        if not via & (names | set(pins)):
            found.append(f"{name} is pinned in {LOCK.name} but nothing in pyproject.toml needs it")
    return found


def main() -> int:
    found = problems()
    for problem in found:
        print(f"lock out of date: {problem}", file=sys.stderr)
    if found:
        print(f"constraints/test.txt does not match pyproject.toml: {REFRESH}", file=sys.stderr)
        return 1
    print(f"constraints/test.txt matches pyproject.toml ({len(pinned())} pins)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
