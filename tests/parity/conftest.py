"""The kvpress references: computed once in the side venv (``make parity-venv``), cached under ``.cache/parity``.

The cache folder is keyed by the reference script, the tiny model's weights and the seeded input; inside it each
case's files carry the case spec they were computed from, so adding or changing a case (``cases.py``) recomputes
only that case. If the side venv is missing or failed to build, every parity test fails and says why (CI must not
pass silently without the reference).
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import time
from pathlib import Path

import pytest

from avkv.config import ROOT
from tests.conftest import CACHE, tiny_model_dir
from tests.parity.cases import CASES, TIE_RTOL

VENV = CACHE / "venv-kvpress"
SCRIPT = ROOT / "scripts" / "parity" / "kvpress_reference.py"
N_CTX, SEED = 300, 0


def side_python() -> Path:
    failed = VENV / ".failed"
    if failed.exists():
        pytest.fail(f"the kvpress side venv could not be built ({failed}): {failed.read_text().strip()}; "
                    "rerun `make parity-venv`", pytrace=False)
    py = VENV / "bin" / "python"
    if not (VENV / ".installed").exists() or not py.exists():
        pytest.fail(f"the kvpress side venv {VENV} is not built: run `make parity-venv` (part of `make test`)",
                    pytrace=False)
    return py


def ref_dir(model: Path) -> Path:
    from avkv.models.base import weights_digest
    h = hashlib.sha256()
    h.update(SCRIPT.read_bytes())
    h.update(weights_digest(model).encode())
    h.update(f"{N_CTX}:{SEED}:{TIE_RTOL}".encode())
    return CACHE / "parity" / h.hexdigest()[:16]


def case_file(out: Path, case: dict, ratio) -> Path:
    return out / f"{case['id']}__{ratio}.json"


def _fresh(out: Path, case: dict) -> bool:
    for r in case["ratios"]:
        f = case_file(out, case, r)
        if not f.exists() or json.loads(f.read_text()).get("spec") != json.loads(json.dumps(case)):
            return False
    return True


@pytest.fixture(scope="session")
def kvpress_refs():
    """``{"meta": ..., (case id, ratio): reference}`` for every case of ``cases.CASES``."""
    py = side_python()
    model = tiny_model_dir("tiny_qwen2")
    out = ref_dir(model)
    todo = [c for c in CASES if not (out / "meta.json").exists() or not _fresh(out, c)]
    if todo:
        out.mkdir(parents=True, exist_ok=True)
        spec = out / "todo_cases.json"
        spec.write_text(json.dumps(todo))
        t0 = time.perf_counter()
        p = subprocess.run([str(py), str(SCRIPT), "--model", str(model), "--cases", str(spec), "--out", str(out),
                            "--n-ctx", str(N_CTX), "--seed", str(SEED), "--tie-rtol", str(TIE_RTOL)],
                           capture_output=True, text=True, timeout=900, cwd=ROOT)
        if p.returncode != 0:
            pytest.fail(f"kvpress reference script failed (rc {p.returncode}):\n{p.stderr[-3000:]}", pytrace=False)
        (out / "last_run.txt").write_text(f"{len(todo)} cases in {time.perf_counter() - t0:.1f}s\n{p.stdout}")
    refs = {"meta": json.loads((out / "meta.json").read_text()), "dir": out}
    for c in CASES:
        for r in c["ratios"]:
            refs[(c["id"], r)] = json.loads(case_file(out, c, r).read_text())
    return refs
