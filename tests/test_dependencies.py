"""The dependency lists agree: every third-party module avkv imports is declared in pyproject.toml and installed by
the GPU recipe (environment.yml), whose pins match the CPU lock (torch to the minor version)."""
from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import packages_distributions

import yaml

from avkv.config import ROOT


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _imports() -> set[str]:
    mods = set()
    for f in (ROOT / "avkv").rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                mods |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods.add(node.module.split(".")[0])
    return {m for m in mods if m not in sys.stdlib_module_names and m != "avkv"}


def _recipe() -> dict[str, str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    return {_norm(p.split("==")[0]): p.split("==")[1] for p in pip if "==" in p}


def _lock() -> dict[str, str]:
    return {_norm(m[1]): m[2] for m in re.finditer(r"^([A-Za-z0-9_.-]+)==(\S+)", (ROOT / "requirements" /
                                                                               "cpu.lock.txt").read_text(), re.M)
            for m in [(None, m.group(1), m.group(2))]}


def _declared() -> set[str]:
    import tomllib
    proj = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(proj["dependencies"]) + [r for extra in proj["optional-dependencies"].values() for r in extra]
    return {_norm(re.split(r"[<>=!~\[ ;]", r, maxsplit=1)[0]) for r in reqs}


def _distributions(modules: set[str]) -> dict[str, set[str]]:
    dist = packages_distributions()
    # a module not installed here (torchvision on the CPU stack) is named like its distribution
    return {m: {_norm(d) for d in dist.get(m, [])} or {_norm(m)} for m in modules}


def test_gpu_recipe_covers_every_import():
    recipe, declared = _recipe(), _declared()
    missing = {m: d for m, d in _distributions(_imports()).items() if not d & set(recipe)}
    assert not missing, f"imported by avkv but not installed by environment.yml: {missing}"
    undeclared = {m: d for m, d in _distributions(_imports()).items() if not d & declared}
    assert not undeclared, f"imported by avkv but not declared in pyproject.toml: {undeclared}"
    assert declared <= set(recipe), f"declared but not in environment.yml: {declared - set(recipe)}"


def test_gpu_recipe_pins_match_the_cpu_lock():
    recipe, lock = _recipe(), _lock()
    assert recipe["torch"].split(".")[:2] == lock["torch"].split("+")[0].split(".")[:2]
    differ = {p: (v, lock[p]) for p, v in recipe.items() if p in lock and p != "torch" and v != lock[p]}
    assert not differ, differ
    assert "datasets" not in lock                                    # unused: not in the CPU stack
    # accelerate is in the CPU lock only for the test extra (the multi-device test on CPU); runs need it for device_map
    assert "accelerate" in lock and "accelerate" in recipe
