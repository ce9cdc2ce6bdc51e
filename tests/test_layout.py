"""The package's layout as the design fixes it: the kernel library never imports the application
(``ddps.app``), no import cycle anywhere in ``ddps/`` (imports inside functions included), no
module over 400 lines, and a test file for every op."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ddps"
# `python -m ddps` is the command line's entry point, not part of the library
ENTRY_POINTS = {"ddps.__main__"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """{module: the ddps modules it imports}, ``from package import name`` counted as an import of
    the submodule where name is one."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in node.names:
                    edges.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
        graph[name] = {e for e in edges if e in modules and e != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_cycle_finder_finds_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_library_never_imports_the_application():
    graph = import_graph()
    library = [m for m in graph if not m.startswith("ddps.app") and m not in ENTRY_POINTS]
    assert {m: sorted(e for e in graph[m] if e.startswith("ddps.app")) for m in library
            if any(e.startswith("ddps.app") for e in graph[m])} == {}


def test_modules_stay_short():
    assert {name: n for name, path in _modules().items() if (n := len(path.read_text().splitlines())) > 400} == {}


def test_every_op_has_its_test_file():
    ops = {p.stem for p in (PACKAGE / "ops").glob("*.py") if not p.stem.startswith("_")}
    assert {op for op in ops if not (ROOT / "tests" / "ops" / f"test_{op}.py").exists()} == set()
