"""The package's import graph: no circle, and every import points down the layering that
`docs/architecture.md` documents (function-level imports included: a lazy import is still a
dependency). Also: production modules hold no fault-injection branch, and no module but the
communicator's stack issues a collective."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import epinfer

ROOT = Path(epinfer.__file__).resolve().parent

# package -> the packages it may import (besides itself); top-level modules are entry points
ALLOWED = {
    "core": set(),
    "kernels": {"core"},
    "diagnostics": {"core"},
    "distributed": {"core"},
    "layers": {"core", "kernels", "distributed"},
    "models": {"core", "kernels", "distributed", "layers"},
    "runner": {"core", "kernels", "distributed", "layers", "models"},
    "engine": {"core", "kernels", "distributed", "layers", "models", "runner"},
    "runtime": {"core", "kernels", "distributed", "layers", "models", "runner", "engine", "diagnostics"},
    "server": {"core", "kernels", "distributed", "layers", "models", "runner", "engine", "diagnostics", "runtime"},
    "bench": {"core", "kernels", "distributed", "layers", "models", "runner", "engine", "diagnostics", "runtime"},
}
ENTRY_POINTS = {"cli", "progress", "__main__", "__init__"}  # may import anything


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("epinfer"):
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("epinfer")]
            deps |= {t for t in targets if t in modules and t != name}
        graph[name] = deps
    return graph


def package_of(module: str) -> str:
    """`epinfer.layers.moe` -> "layers"; a top-level module -> its name ("cli"); `epinfer` -> "__init__"."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_package_is_placed():
    packages = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    modules = {p.stem for p in ROOT.glob("*.py")}
    assert packages == set(ALLOWED), packages ^ set(ALLOWED)
    assert modules <= ENTRY_POINTS, modules - ENTRY_POINTS


def test_imports_point_down():
    wrong = []
    for module, deps in import_graph().items():
        src = package_of(module)
        if src not in ALLOWED:
            continue
        for dep in deps:
            dst = package_of(dep)
            if dst != src and dst not in ALLOWED[src]:
                wrong.append(f"{module} -> {dep}")
    assert not wrong, "imports against the layering:\n" + "\n".join(sorted(wrong))


def test_no_import_circle():
    graph = import_graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            raise AssertionError("import circle: " + " -> ".join(cycle))


def test_production_code_has_no_fault_branch_and_no_bare_collective():
    """Fault injection lives in diagnostics/faults.py and reaches the rest only through generic
    extension points; torch.distributed collectives only in the communicator's stack."""
    collective = re.compile(r"\bdist\.(all_reduce|all_gather\w*|reduce_scatter\w*|broadcast\w*|all_to_all\w*|"
                            r"gather\w*|scatter\w*|barrier|send|recv)\(")
    stack = {"distributed/communicator.py", "distributed/fingerprint.py"}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT).as_posix()
        text = path.read_text()
        if rel != "diagnostics/faults.py":
            assert "FaultInjector" not in text or rel == "runtime/worker.py", rel
            assert not re.search(r"\bfault\.(at_|leak|payload|take_pending)", text), rel
        if rel not in stack:
            assert not collective.search(text), f"{rel} issues a collective outside the communicator"
