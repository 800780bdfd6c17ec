"""The layers of avkv, checked statically on the import graph (every ``import`` of an avkv module, at module level
or inside a function, read from the source with ``ast``; nothing is imported).

Rules (``docs/architecture.md``):

* no import circle between units (a sub-package — ``avkv.tasks``, ``avkv.models``, ... — counts as one unit, a
  top-level module such as ``avkv.config`` as another);
* ``avkv.schema`` imports nothing of avkv (it is the leaf every layer shares);
* methods never import tasks or models; tasks never import models or methods; models never import tasks.
"""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "avkv"
FORBIDDEN = {"avkv.methods": ("avkv.tasks", "avkv.models"), "avkv.tasks": ("avkv.models", "avkv.methods"),
             "avkv.models": ("avkv.tasks",)}


def module_name(path: Path, pkg: Path = PKG) -> str:
    parts = list(path.relative_to(pkg.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, pkg: Path = PKG) -> set[str]:
    """The avkv modules ``path`` imports (``from avkv import x`` names module ``avkv.x`` when that is a module)."""
    me = module_name(path, pkg)
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "avkv"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:                                     # relative: resolve against this module
                base = me.split(".") if is_pkg else me.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "avkv":
                continue
            for a in node.names:
                sub = f"{mod}.{a.name}"
                as_path = pkg.parent / Path(*sub.split("."))
                out.add(sub if as_path.with_suffix(".py").is_file() or (as_path / "__init__.py").is_file() else mod)
    return out


def unit(module: str) -> str:
    """``avkv.tasks.fixtures.proxy`` -> ``avkv.tasks``; ``avkv.config`` -> ``avkv.config``."""
    parts = module.split(".")
    if len(parts) >= 2 and (PKG / parts[1]).is_dir():
        return ".".join(parts[:2])
    return ".".join(parts[:2]) if len(parts) >= 2 else module


def graph(pkg: Path = PKG) -> dict[str, set[str]]:
    """module -> the avkv modules it imports, for every module of ``pkg``."""
    return {module_name(p, pkg): imports(p, pkg) for p in sorted(pkg.rglob("*.py"))}


def unit_cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups (of more than one unit) of the unit graph (Tarjan)."""
    edges: dict[str, set[str]] = {}
    for m, deps in g.items():
        u = unit(m)
        edges.setdefault(u, set())
        for d in deps:
            if unit(d) != u and d != "avkv":
                edges[u].add(unit(d))
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
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

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def violations(g: dict[str, set[str]]) -> list[str]:
    out = []
    for m, deps in sorted(g.items()):
        for d in sorted(deps):
            if m == "avkv.schema":
                out.append(f"avkv.schema imports {d} (it must import nothing of avkv)")
            for low, banned in FORBIDDEN.items():
                if unit(m) == low and unit(d) in banned:
                    out.append(f"{m} imports {d} ({low} never imports {', '.join(banned)})")
    return out


def test_no_import_circle_between_units():
    cycles = unit_cycles(graph())
    assert not cycles, f"import circles between units: {cycles}"


def test_layer_rules():
    bad = violations(graph())
    assert not bad, "\n".join(bad)


def _plant(tmp_path: Path, files: dict[str, str]) -> dict[str, set[str]]:
    root = tmp_path / "avkv"
    for rel, text in {"__init__.py": "", "schema.py": "", "tasks/__init__.py": "", "models/__init__.py": "",
                      "methods/__init__.py": "", **files}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return {module_name(p, root): imports(p, root) for p in sorted(root.rglob("*.py"))}


def test_the_checks_catch_planted_violations(tmp_path):
    g = _plant(tmp_path, {"config.py": "def f():\n    from avkv.grid import x\n", "grid.py": "from avkv import config\n",
                          "models/base.py": "from avkv.tasks.base import Prompt\n",
                          "methods/x.py": "from ..models import base\n", "schema.py": "import avkv.config\n"})
    assert ["avkv.config", "avkv.grid"] in unit_cycles(g)
    bad = "\n".join(violations(g))
    assert "avkv.models.base imports avkv.tasks.base" in bad and "avkv.methods.x imports avkv.models.base" in bad
    assert "avkv.schema imports avkv.config" in bad
