"""The shape of the code: no import cycle among the project's modules, few function-level imports of
project modules, and no code outside the method registry asking which method an adapter has."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"adaptc": ROOT / "adaptc", "adaptc.passes": ROOT / "passes", "adaptc.targets": ROOT / "targets"}
MAX_FUNCTION_LEVEL_IMPORTS = 15


def _modules() -> dict[str, Path]:
    modules = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = [package, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _targets(node: ast.Import | ast.ImportFrom, package: str, modules: dict[str, Path]) -> list[str]:
    """The project modules an import statement in ``package`` names."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in modules]
    base = node.module or ""
    if node.level:
        parent = package.split(".")[: len(package.split(".")) - node.level + 1]
        base = ".".join(parent + ([node.module] if node.module else []))
    found = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]
    return found or ([base] if base in modules else [])


def _imports(modules: dict[str, Path]) -> tuple[dict[str, set[str]], list[tuple[str, str, int]]]:
    """Module -> project modules it imports (anywhere), and the imports made inside functions."""
    edges: dict[str, set[str]] = {m: set() for m in modules}
    in_functions: list[tuple[str, str, int]] = []
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        pending = [(ast.parse(path.read_text()), False)]
        while pending:
            node, in_function = pending.pop()
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.If) and getattr(child.test, "id", None) == "TYPE_CHECKING":
                    continue  # not imported at run time
                inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    for target in set(_targets(child, package, modules)) - {module}:
                        edges[module].add(target)
                        if inside:
                            in_functions.append((module, target, child.lineno))
                pending.append((child, inside))
    return edges, in_functions


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in edges:
        if v not in index:
            connect(v)
    return found


def test_no_import_cycle_among_the_project_modules():
    edges, _ = _imports(_modules())
    assert edges["adaptc.model"], "the import scan found nothing: it could not fail"
    assert _cycles(edges) == []


def test_function_level_imports_of_project_modules_are_few():
    _, in_functions = _imports(_modules())
    assert len(in_functions) <= MAX_FUNCTION_LEVEL_IMPORTS, in_functions


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_only_the_method_registry_asks_which_method_an_adapter_has():
    asks = re.compile(r"\.method\s*[!=]=|method\s*[!=]=\s*[\"'](lora|prompt|ptuning|prefix)[\"']")
    offenders = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in _modules().values()
        if "methods" not in path.relative_to(ROOT).parts
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if asks.search(line)
    ]
    assert offenders == []
