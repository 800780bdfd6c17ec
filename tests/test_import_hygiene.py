"""A default run imports only what it needs: after ``run.py``'s entry point has run one sample of the default
experiment (in a fresh interpreter), none of the modules only other commands or optional features use is loaded
(reporting, plots, the judge, trackers, sweep launchers, the kvpress parity stack). Each of them costs start-up
that every run would pay (pandas + pyarrow ≈ 0.5 s, matplotlib ≈ 0.3 s, wandb ≈ 1 s); see
results/bench/harness/README.md for the start-up that remains (torch + transformers' modeling stack)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: modules a default run (run.py defaults: proxy_av, SnapKV, logger none) must not import
OPTIONAL = ("pandas", "pyarrow", "matplotlib", "scipy", "sklearn", "wandb", "submitit", "kvpress", "datasets",
            "avkv.report", "avkv.judge", "avkv.grid", "avkv.coverage", "avkv.api")
# (Hydra's plugin scan imports hydra_plugins.hydra_submitit_launcher's module on every run, not submitit itself)

CHILD = """
import json, sys
from avkv import app
rc = app.main(sys.argv[2:], prog="run.py")
print("MODULES " + json.dumps(sorted(sys.modules)))
"""


def test_a_default_run_imports_no_optional_module(tmp_path):
    args = ["dataset.limit=1", "max_new_tokens=2", "progress=false", f"run_dir={tmp_path / 'run'}",
            f"hydra.run.dir={tmp_path / 'hydra'}"]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", CHILD, "--", *args], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    modules = set(json.loads(next(l for l in out.stdout.splitlines() if l.startswith("MODULES "))[8:]))
    assert (tmp_path / "run" / "samples.jsonl").is_file()           # the run did run its sample
    loaded = [m for m in OPTIONAL if m in modules]
    assert not loaded, f"a default run imported optional modules: {loaded}"
