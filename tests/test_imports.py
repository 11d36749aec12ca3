"""The package's import graph has no cycle and no upward edge: the entry points sit on top, the
training engine and the leaves (errors, compose, registry) import nothing above them. Function-level
imports count too: a lazy import is still a dependency."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "distill"
ENTRY_POINTS = {"distill.__main__", "distill.cache_build"}  # the commands: only they may run the pipeline
LEAVES = {"distill.errors": set(), "distill.compose": set(), "distill.registry": {"distill.errors"}}


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        rel = p.relative_to(PKG.parent).with_suffix("")
        if {"node_modules", "conf", "web"} & set(rel.parts):
            continue
        parts = list(rel.parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """distill modules that ``name`` imports. ``from pkg import sub`` depends on pkg.sub alone, and a
    module's own ancestor packages are not edges (Python initialises them whatever the import)."""
    deps = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            deps |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            subs = {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules}
            deps |= subs if len(subs) == len(node.names) else {base} | subs
    ancestors = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
    return {d for d in deps if d in modules and d != name and d not in ancestors}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(m, p, modules) for m, p in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_real_edges():
    g = _graph()
    assert "distill.pipeline" in g["distill.__main__"] and "distill.errors" in g["distill.engine.loop"]
    assert "distill.engine.optim" in g["distill.engine.loop"]  # `from distill.engine import optim`


def test_no_import_cycle_in_the_package():
    assert _cycles(_graph()) == []


def test_cycle_detection_finds_a_planted_cycle():
    g = _graph()
    g["distill.errors"] = g["distill.errors"] | {"distill.pipeline"}
    assert any("distill.errors" in c and "distill.pipeline" in c for c in _cycles(g))


def test_nothing_imports_the_entry_points_or_the_pipeline_from_below():
    g = _graph()
    for mod, deps in g.items():
        if mod not in ENTRY_POINTS:
            assert "distill.__main__" not in deps, f"{mod} imports the CLI entry point"
        if mod not in ENTRY_POINTS | {"distill.pipeline"}:
            assert "distill.pipeline" not in deps, f"{mod} imports the pipeline: take what it needs from the stage's module"


def test_the_engine_and_the_leaves_import_nothing_above_them():
    g = _graph()
    engine_may = {"distill.errors", "distill.distributed"}
    for mod, deps in g.items():
        if mod.startswith("distill.engine"):
            above = {d for d in deps if not d.startswith("distill.engine")} - engine_may
            assert not above, f"{mod} (the engine) imports {sorted(above)}"
    for leaf, allowed in LEAVES.items():
        if leaf in g:
            assert g[leaf] <= allowed, f"{leaf} is a leaf but imports {sorted(g[leaf] - allowed)}"


def _private_crossings(path: Path, name: str, modules: dict[str, Path]) -> list[str]:
    """``from distill.x import _y`` and ``x._y`` on an imported distill module, in ``path``."""
    tree = ast.parse(path.read_text())
    bound, out = {}, []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("distill"):
            for a in node.names:
                full = f"{node.module}.{a.name}"
                if full in modules:
                    bound[a.asname or a.name] = full
                elif a.name.startswith("_") and not a.name.startswith("__") and node.module != name:
                    out.append(f"{path.name}:{node.lineno} imports {full}")
        elif isinstance(node, ast.Import):
            bound.update({(a.asname or a.name): a.name for a in node.names if a.name.startswith("distill")})
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                and isinstance(node.value, ast.Name) and bound.get(node.value.id, name) != name):
            out.append(f"{path.name}:{node.lineno} uses {node.value.id}.{node.attr}")
    return out


def test_no_private_name_crosses_a_module():
    modules = _modules()
    benches = sorted((PKG.parent / "benchmarks").rglob("*.py"))
    found = [c for m, p in modules.items() for c in _private_crossings(p, m, modules)]
    found += [c for p in benches for c in _private_crossings(p, "", modules)]
    assert found == [], "a private name is used outside its module: make it public or keep it at home"


def test_private_crossing_detector_sees_both_forms(tmp_path):
    modules = _modules()
    f = tmp_path / "x.py"
    f.write_text("from distill.report import _pct\nfrom distill import report\nreport._fmt(1)\n")
    assert len(_private_crossings(f, "", modules)) == 2
