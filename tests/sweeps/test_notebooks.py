"""The paper-table notebooks execute on fixture-scale results (the smoke runs of the presets)."""
from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


def test_notebooks_are_current():
    """The committed notebooks are what scripts/make_notebooks.py writes (edit the template, not the .ipynb)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_notebooks", REPO / "scripts" / "make_notebooks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert {p.stem for p in NOTEBOOKS} == set(mod.NOTEBOOKS)
    for p in NOTEBOOKS:
        want = mod.notebook(p.stem, mod.NOTEBOOKS[p.stem])
        got = nbformat.read(p, as_version=4)
        assert [c.source for c in got.cells] == [c.source for c in want.cells], p.name
        assert not any(c.get("outputs") for c in got.cells if c.cell_type == "code"), f"{p.name}: clear outputs"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path, smoke_runs, tmp_path):
    nb = nbformat.read(path, as_version=4)
    runs_root = next(iter(smoke_runs.values())).parent if smoke_runs else tmp_path
    i = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    nb.cells.insert(i + 1, nbformat.v4.new_code_cell(  # papermill-style injected parameters
        f"RUNS = {str(runs_root)!r}\nOUT = {str(tmp_path / 'out')!r}\nN_BOOT = 100"))
    client = nbclient.NotebookClient(nb, timeout=180, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    text = "\n".join(o.get("text", "") or str(o.get("data", {}).get("text/markdown", ""))
                     for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    exps = nb.cells[i].source
    ran = [e for e in smoke_runs if f"'{e}'" in exps]
    if ran:  # its preset ran at smoke scale: our table has rows, the plots exist
        assert "| tiny_" in text, text[-2000:]
        assert list((tmp_path / "out" / "plots").glob("*.png"))
    else:
        assert "no runs yet" in text
    if "PAPER = None" not in exps:  # the paper's table as published, and ours beside it
        model = exps.split("PAPER_MODEL = ")[1].splitlines()[0].strip("'\"")
        assert f"| {model} |" in text
        assert "| method | budget |" in text
