"""The layers of avkv, checked statically on the import graph (every ``import`` of an avkv module, at module level
or inside a function, read from the source with ``ast``; nothing is imported).

Rules (``docs/architecture.md``):

* no import circle between units (a sub-package — ``avkv.tasks``, ``avkv.models``, ... — counts as one unit, a
  top-level module such as ``avkv.config`` as another);
* ``avkv.schema`` imports nothing of avkv (it is the leaf every layer shares);
* methods never import tasks or models; tasks never import models or methods; models never import tasks;
* ``avkv.measure`` is the one owner of the host clock: no other module reads ``time.perf_counter``,
  ``time.monotonic``, ``time.time`` (or their ``_ns``, ``process_time``, ``thread_time``) — harness timings, the
  adapters' ``media_s`` and deadlines go through ``measure.wall`` / ``Stopwatch`` / ``epoch``; it imports nothing of
  avkv, so every layer may use it;
* no avkv module imports another's private name (``from avkv.x import _y``, or ``x._y`` on an imported avkv module):
  a name another module uses is public.
"""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "avkv"
LEAVES = ("avkv.schema", "avkv.measure")          # import nothing of avkv
CLOCK_OWNER = "avkv.measure"
CLOCKS = {"perf_counter", "perf_counter_ns", "monotonic", "monotonic_ns", "time", "time_ns", "process_time",
          "process_time_ns", "thread_time", "thread_time_ns"}
FORBIDDEN = {"avkv.methods": ("avkv.tasks", "avkv.models"), "avkv.tasks": ("avkv.models", "avkv.methods"),
             "avkv.models": ("avkv.tasks",)}


def module_name(path: Path, pkg: Path = PKG) -> str:
    parts = list(path.relative_to(pkg.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _from_module(node: ast.ImportFrom, me: str, is_pkg: bool) -> str:
    """The module a ``from ... import`` reads (relative imports resolved against ``me``)."""
    if not node.level:
        return node.module or ""
    base = me.split(".") if is_pkg else me.split(".")[:-1]
    base = base[: len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _is_module(name: str, pkg: Path) -> bool:
    as_path = pkg.parent / Path(*name.split("."))
    return as_path.with_suffix(".py").is_file() or (as_path / "__init__.py").is_file()


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_imports(path: Path, pkg: Path = PKG) -> list[str]:
    """``file:line`` of every private name (``_x``, not a dunder) that ``path`` takes from another avkv module."""
    me, is_pkg = module_name(path, pkg), path.name == "__init__.py"
    where = path.relative_to(pkg.parent)
    tree = ast.parse(path.read_text(encoding="utf-8"))
    mods: set[str] = set()                            # local names bound to an avkv module
    out = []
    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            mods |= {a.asname for a in n.names if a.asname and a.name.split(".")[0] == "avkv"}
        elif isinstance(n, ast.ImportFrom):
            mod = _from_module(n, me, is_pkg)
            if mod.split(".")[0] != "avkv":
                continue
            for a in n.names:
                if _is_module(f"{mod}.{a.name}", pkg):
                    mods.add(a.asname or a.name)
                elif _private(a.name) and mod != me:
                    out.append(f"{where}:{n.lineno}: from {mod} import {a.name}")
    for n in ast.walk(tree):
        if isinstance(n, ast.Attribute) and _private(n.attr) and isinstance(n.value, ast.Name) and n.value.id in mods:
            out.append(f"{where}:{n.lineno}: {n.value.id}.{n.attr}")
    return out


def imports(path: Path, pkg: Path = PKG) -> set[str]:
    """The avkv modules ``path`` imports (``from avkv import x`` names module ``avkv.x`` when that is a module)."""
    me = module_name(path, pkg)
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "avkv"}
        elif isinstance(node, ast.ImportFrom):
            mod = _from_module(node, me, is_pkg)
            if mod.split(".")[0] != "avkv":
                continue
            for a in node.names:
                sub = f"{mod}.{a.name}"
                out.add(sub if _is_module(sub, pkg) else mod)
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
            if m in LEAVES:
                out.append(f"{m} imports {d} (it must import nothing of avkv)")
            for low, banned in FORBIDDEN.items():
                if unit(m) == low and unit(d) in banned:
                    out.append(f"{m} imports {d} ({low} never imports {', '.join(banned)})")
    return out


def clock_reads(path: Path, pkg: Path = PKG) -> list[str]:
    """``file:line`` of every read of a host clock of ``time`` in ``path`` (``time.perf_counter()``, an alias of the
    module, ``from time import monotonic``), unless ``path`` is the clock's owner."""
    if module_name(path, pkg) == CLOCK_OWNER:
        return []
    tree = ast.parse(path.read_text(encoding="utf-8"))
    mods = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
            if a.name == "time"}
    out = []
    for n in ast.walk(tree):
        if isinstance(n, ast.ImportFrom) and n.module == "time" and not n.level:
            out += [f"{path.relative_to(pkg.parent)}:{n.lineno}: from time import {a.name}" for a in n.names
                    if a.name in CLOCKS or a.name == "*"]
        elif isinstance(n, ast.Attribute) and n.attr in CLOCKS and isinstance(n.value, ast.Name) \
                and n.value.id in mods:
            out.append(f"{path.relative_to(pkg.parent)}:{n.lineno}: {n.value.id}.{n.attr}")
    return out


def all_clock_reads(pkg: Path = PKG) -> list[str]:
    return [r for p in sorted(pkg.rglob("*.py")) for r in clock_reads(p, pkg)]


def all_private_imports(pkg: Path = PKG) -> list[str]:
    return [r for p in sorted(pkg.rglob("*.py")) for r in private_imports(p, pkg)]


def test_no_module_imports_another_modules_private_name():
    bad = all_private_imports()
    assert not bad, "private names used across avkv modules (make them public):\n" + "\n".join(bad)


def test_no_import_circle_between_units():
    cycles = unit_cycles(graph())
    assert not cycles, f"import circles between units: {cycles}"


def test_layer_rules():
    bad = violations(graph())
    assert not bad, "\n".join(bad)


def test_only_measure_reads_the_host_clock():
    bad = all_clock_reads()
    assert not bad, ("read the host clock through avkv.measure (wall, Stopwatch, epoch), not time:\n"
                     + "\n".join(bad))


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


def test_the_private_import_check_catches_planted_ones(tmp_path):
    _plant(tmp_path, {"a.py": "_x = 1\ndef _f(): pass\n", "b.py": "from avkv.a import _x, __doc__\n",
                      "c.py": "from avkv import a as m\nm._f()\n", "tasks/t.py": "from ..a import _f\n",
                      "models/m.py": "import avkv.a as aa\ny = aa._x\n",
                      "d.py": "from avkv.a import public\nfrom os import _exit\n"})
    assert all_private_imports(tmp_path / "avkv") == [
        "avkv/b.py:1: from avkv.a import _x", "avkv/c.py:2: m._f", "avkv/models/m.py:2: aa._x",
        "avkv/tasks/t.py:1: from avkv.a import _f"]


def test_the_clock_check_catches_planted_reads(tmp_path):
    _plant(tmp_path, {"a.py": "import time\nt = time.perf_counter()\n", "b.py": "import time as t\nx = t.monotonic()\n",
                      "c.py": "from time import time as now\n", "d.py": "import time\ntime.sleep(1)\n",
                      "measure.py": "import time\nx = time.perf_counter()\n", "e.py": "import os\nos.time = 1\n"})
    bad = all_clock_reads(tmp_path / "avkv")
    assert bad == ["avkv/a.py:2: time.perf_counter", "avkv/b.py:2: t.monotonic", "avkv/c.py:1: from time import time"]
