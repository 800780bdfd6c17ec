"""The fixture generators are found from the modules of ``avkv/tasks/fixtures/`` (no registry): a dataset's
fixture is one file that declares ``VERSION`` + ``build`` (or ``BUILDERS``)."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from avkv.config import CONFIG_DIR
from avkv.tasks import fixtures
from tests import discover


def _fixture_dirs() -> dict[str, str]:
    """dataset config -> the fixture folder its default ``root`` points at."""
    found = {}
    for name in discover.datasets():
        m = re.search(r"^root:\s*\$\{paths\.fixtures\}/([^/\s]+)", (CONFIG_DIR / "dataset" / f"{name}.yaml").read_text(),
                      re.M)
        if m:
            found[name] = m.group(1)
    return found


@pytest.mark.parametrize("config", sorted(_fixture_dirs()))
def test_every_dataset_config_on_a_fixture_has_a_discovered_generator(config):
    assert _fixture_dirs()[config] in fixtures.GENERATORS


def test_a_new_module_is_discovered_and_helpers_are_not(tmp_path, monkeypatch):
    pkg = tmp_path / "fakefixtures"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "newset.py").write_text("VERSION = 'newset-1'\ndef build(dest):\n    return {}\n")
    (pkg / "twosets.py").write_text("VERSION = 'two-1'\ndef _b(dest):\n    return {}\n"
                                    "BUILDERS = {'two_a': _b, 'two_b': _b}\nREQUIRES = lambda: 'no tool'\n")
    (pkg / "helper.py").write_text("SR = 16000\ndef build_frames():\n    return None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        generators, requires = fixtures._discover("fakefixtures", [str(pkg)])
    finally:
        for mod in [m for m in sys.modules if m.startswith("fakefixtures")]:
            del sys.modules[mod]
    assert sorted(generators) == ["newset", "two_a", "two_b"]
    assert generators["newset"][0] == "newset-1" and generators["two_a"][0] == "two-1"
    assert sorted(requires) == ["two_a", "two_b"] and requires["two_a"]() == "no tool"


def test_the_registry_holds_every_generator_module():
    """Each module of the package that defines ``build`` is a generator (none forgotten by a hand list)."""
    mods = {p.stem for p in Path(fixtures.__file__).parent.glob("*.py")
            if not p.stem.startswith("_") and re.search(r"^def build\(", p.read_text(), re.M)}
    assert mods - {"proxy"} <= set(fixtures.GENERATORS)
    assert {d for d in fixtures.GENERATORS if d.startswith("proxy_")} == {f"proxy_{p}" for p in
                                                                         fixtures.proxy.SPECS}
