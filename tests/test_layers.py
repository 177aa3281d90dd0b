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
    "broker": ("clawq.workers", "clawq.sim", "clawq.server", "clawq.cli", "rq", "click", "fastapi", "starlette"),
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


def test_the_simulation_starts_processes_in_two_places_only() -> None:
    """clawq's processes through the one fleet; the embedded Redis server through its own module."""
    spawners = [m.name for m in sorted((PACKAGE / "sim").glob("*.py")) if "subprocess" in _imports(m, "sim")]
    assert spawners == ["embedded.py", "fleet.py"]


def _broker_imports(path: Path) -> list[tuple[str, ast.stmt]]:
    """Every import of a broker module with its statement (relative ones resolved against clawq.broker)."""
    found: list[tuple[str, ast.stmt]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = "clawq.broker" if node.level == 1 else "clawq" if node.level == 2 else ""
            found.append((".".join(p for p in (base, node.module or "") if p), node))
    return found


@pytest.mark.parametrize("path", sorted((PACKAGE / "broker").glob("*.py")), ids=lambda p: p.name)
def test_broker_modules_import_clawq_at_the_top(path: Path) -> None:
    """A function-level import of a sibling is how an import cycle hides: every clawq import is at the top."""
    body = ast.parse(path.read_text(), str(path)).body
    top = {ast.dump(node) for node in body}
    top |= {ast.dump(n) for node in body if isinstance(node, ast.If) for n in node.body}  # if TYPE_CHECKING
    late = [f"line {node.lineno}: {name}" for name, node in _broker_imports(path)
            if name.startswith("clawq.") and ast.dump(node) not in top]
    assert late == []


def test_the_broker_modules_import_without_a_cycle() -> None:
    graph = {path.stem: {name.split(".")[2] for name, _ in _broker_imports(path) if name.startswith("clawq.broker.")}
             for path in sorted((PACKAGE / "broker").glob("*.py"))}
    done: set[str] = set()

    def visit(node: str, stack: tuple[str, ...]) -> None:
        assert node not in stack, "import cycle: " + " -> ".join((*stack, node))
        if node not in done:
            for nxt in sorted(graph.get(node, ())):
                visit(nxt, (*stack, node))
            done.add(node)

    for module in sorted(graph):
        visit(module, ())
