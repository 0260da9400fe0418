"""The import graph of mmpfl_core: no circle, and no import against the package layering of docs/DESIGN.md 2.

Built from the source with :mod:`ast` (nothing is imported), counting every import statement wherever it
stands (module level, inside a function, under ``TYPE_CHECKING``): a deferred import is still a dependency.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "mmpfl_core"

#: package (first component under mmpfl_core) -> packages it must never import.
FORBIDDEN = {
    "data": {"models", "privacy", "personalization", "federated", "attacks", "reproduction", "experiment",
             "experiment_config", "experiment_checks", "reporting", "plots", "centralized"},
    "models": {"data", "privacy", "personalization", "federated", "attacks", "reproduction", "experiment",
               "experiment_config", "experiment_checks"},
    "privacy": {"attacks", "federated", "models", "personalization", "reproduction", "experiment",
                "experiment_config", "experiment_checks", "plots"},
    "personalization": {"federated", "attacks", "reproduction", "experiment", "experiment_config"},
    "federated": {"attacks", "reproduction", "experiment", "experiment_config", "experiment_checks", "reporting",
                  "plots"},
    "attacks": {"reproduction", "experiment", "experiment_config", "experiment_checks", "reporting"},
    "metrics": {"federated", "attacks", "reproduction", "experiment", "privacy", "models"},
    # plots/training.py and plots/fusion.py read federated.simulation.RunResult (a type): allowed for now.
    "plots": {"attacks", "reproduction", "experiment", "experiment_config", "experiment_checks", "privacy"},
}
#: The edges: nothing in the core imports them.
EDGES = {"cli", "notebook_tools"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Every mmpfl_core module ``path`` imports (``from .x import y`` resolves to ``x.y`` if that is a module)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            targets = [f"{stem}.{a.name}" if f"{stem}.{a.name}" in modules else stem for a in node.names]
        else:
            continue
        out |= {t for t in targets if t.split(".")[0] == "mmpfl_core" and t != name}
    return {t for t in out if t in modules}


def import_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: _imports(path, set(files)) for name, path in files.items()}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a list of modules (first == last), or None. Package ``__init__`` re-exports
    of their own submodules are not edges back to the package (a submodule never needs its package's
    re-exports), so only module-to-module circles count."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt == node or node.startswith(nxt + "."):  # a submodule importing its own package
                continue
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def layering_violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for module, targets in sorted(graph.items()):
        layer = _layer(module)
        for target in sorted(targets):
            other = _layer(target)
            if other in FORBIDDEN.get(layer, ()) or (other in EDGES and layer not in EDGES):
                bad.append(f"{module} imports {target}")
    return bad


def test_the_graph_is_built_from_the_source():
    graph = import_graph()
    assert "mmpfl_core.federated.simulation" in graph and "mmpfl_core.devices" in graph
    assert "mmpfl_core.devices" in graph["mmpfl_core.federated.simulation"]
    assert "mmpfl_core.experiment_config" in graph["mmpfl_core.experiment_checks"]


def test_no_import_circle():
    assert find_cycle(import_graph()) is None, " -> ".join(find_cycle(import_graph()) or [])


def test_no_import_against_the_layering():
    assert layering_violations(import_graph()) == []


@pytest.mark.parametrize("graph, expected", [
    ({"mmpfl_core.a": {"mmpfl_core.b"}, "mmpfl_core.b": {"mmpfl_core.a"}}, ["mmpfl_core.a", "mmpfl_core.b", "mmpfl_core.a"]),
    ({"mmpfl_core.a": {"mmpfl_core.b"}, "mmpfl_core.b": set()}, None),
])
def test_the_cycle_finder_flags_a_planted_circle(graph, expected):
    assert find_cycle(graph) == expected


def test_the_layering_check_flags_planted_upward_imports():
    """The checks must fail on what they guard against: the imports this layering once had."""
    planted = {
        "mmpfl_core.federated.simulation": {"mmpfl_core.notebook_tools.environment"},  # device via notebook tools
        "mmpfl_core.attacks.targets": {"mmpfl_core.experiment"},  # orchestration inside attacks
        "mmpfl_core.privacy.ledger": {"mmpfl_core.attacks.audit"},  # the mechanism knowing its attacker
        "mmpfl_core.data.federation": {"mmpfl_core.models.vit"},
        "mmpfl_core.experiment": {"mmpfl_core.cli"},
    }
    assert len(layering_violations(planted)) == len(planted)
