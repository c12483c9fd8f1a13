"""The package's shape: no import cycles between azfilter's modules, the command line thin.

Every import counts, including the lazy ones inside functions (a cycle through a lazy import
still ties two modules together); imports under ``if TYPE_CHECKING:`` do not.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "azfilter"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The azfilter modules that ``path`` imports (resolved to existing modules)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()

    def resolve(target: str) -> None:
        # "azfilter.output.read" or a package: keep the longest existing module name
        while target and target not in modules:
            target = target.rpartition(".")[0]
        if target and target != name:
            found.add(target)

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("azfilter"):
                    resolve(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            if stem.startswith("azfilter"):
                for alias in node.names:
                    candidate = f"{stem}.{alias.name}"
                    resolve(candidate if candidate in modules else stem)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph() -> dict[str, set[str]]:
    """azfilter module -> the azfilter modules it imports."""
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_name(path) for path in files}
    return {_module_name(path): _imports(path, modules) for path in files}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def connect(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for other in graph.get(node, ()):
            if other not in index:
                connect(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))
    for node in graph:
        if node not in index:
            connect(node)
    return cycles


def _package_parents(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    # A package's __init__ re-exporting its submodules, and the submodules importing their
    # siblings through it, is the normal shape of a package, not a cycle between concerns:
    # drop edges from a submodule to its own parent package.
    return {name: {t for t in targets if not name.startswith(t + ".")}
            for name, targets in graph.items()}


def test_the_finder_sees_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_inside_azfilter():
    graph = _package_parents(import_graph())
    assert "azfilter.cli" in graph and graph["azfilter.cli"], "the import graph is empty"
    cycles = find_cycles(graph)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_cli_is_click_only():
    """The command line plans and runs nothing itself: no threads, queues or engines."""
    source = (PACKAGE / "cli.py").read_text(encoding="utf-8")
    assert len(source.splitlines()) < 500
    imported = _imports(PACKAGE / "cli.py", set(import_graph()))
    assert not imported & {"azfilter.backends", "azfilter.frames", "azfilter.integrator"}
    for word in ("import queue", "ThreadPoolExecutor", "h5py"):
        assert word not in source


def test_help_imports_no_engine_or_subcommand():
    """``azfilter --help`` loads neither the engines, numpy-heavy modules nor subcommands."""
    code = ("import sys; from azfilter import cli; "
            "cli.run(['--help']); "
            "print(sorted(m for m in sys.modules if m.startswith(('azfilter.', 'numpy', 'h5py'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    loaded = out.strip().splitlines()[-1]
    for module in ("numpy", "h5py", "azfilter.backends", "azfilter.commands.info",
                   "azfilter.commands.plot", "azfilter.pipeline"):
        assert f"'{module}'" not in loaded, loaded
