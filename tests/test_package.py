"""The package's shape: its modules import each other one way (no cycle, counting imports made inside functions too),
and none imports an entry point or the trainer module (the entry points hand the trainer's config class over)."""

import ast

from conftest import ROOT

PACKAGE = ROOT / "diversity_simpo"
ENTRY_POINTS = {"train_diversity_simpo", "generate_candidates", "train_on_policy", "diversity_simpo_trainer"}


def imports_of(path):
    """Every module name a file imports, at any depth of its code."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            if node.module == "diversity_simpo":  # `from diversity_simpo import rows`
                names |= {f"diversity_simpo.{alias.name}" for alias in node.names}
    return names


def package_graph():
    modules = {f"diversity_simpo.{p.stem}": p for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    return {name: {m for m in imports_of(path) if m in modules and m != name} for name, path in modules.items()}


def test_no_module_of_the_package_imports_an_entry_point_or_the_trainer():
    for path in PACKAGE.glob("*.py"):
        assert not imports_of(path) & ENTRY_POINTS, path.name


def test_the_package_imports_have_no_cycle():
    graph, done, path = package_graph(), set(), []

    def visit(name):
        assert name not in path, f"import cycle: {' -> '.join([*path[path.index(name) :], name])}"
        if name in done:
            return
        path.append(name)
        for dependency in sorted(graph[name]):
            visit(dependency)
        path.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)
    assert len(done) == len(graph) > 10
