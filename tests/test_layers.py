"""The arrows point down: broker/ imports no layer above it, workers/ never imports the simulation.

Read from the installed copy (what users run), by parsing every module's imports.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import clawq.broker

PACKAGE = Path(clawq.broker.__file__).resolve().parent.parent  # clawq is a namespace package
#: package -> the clawq packages it must never import
FORBIDDEN = {
    "broker": ("clawq.workers", "clawq.sim", "clawq.server", "clawq.cli"),
    "workers": ("clawq.sim", "clawq.server", "clawq.cli"),
    "sim": ("clawq.server", "clawq.cli"),
}


def _imports(path: Path, package: str) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the module's own package
                parts = ["clawq", package, *path.relative_to(PACKAGE / package).parent.parts]
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found.add(base)
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_a_package_never_imports_a_layer_above_it(package: str) -> None:
    modules = sorted((PACKAGE / package).rglob("*.py"))
    assert modules, f"no modules installed under clawq/{package}"
    wrong = [f"{m.relative_to(PACKAGE)} imports {name}" for m in modules for name in sorted(_imports(m, package))
             if name.startswith(FORBIDDEN[package])]
    assert wrong == []


def test_the_fleet_is_the_only_process_spawner_of_the_simulation() -> None:
    spawners = [m.name for m in sorted((PACKAGE / "sim").glob("*.py")) if "subprocess" in _imports(m, "sim")]
    assert spawners == ["fleet.py"]
