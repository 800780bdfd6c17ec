"""Session fixtures for the sweep tests: tiny checkpoints and dataset fixtures (built once, idempotent)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY = ("tiny_qwen2_5_omni", "tiny_qwen2_5_vl", "tiny_videollama2_av", "tiny_llava")


@pytest.fixture(scope="session")
def assets() -> Path:
    """``.cache/models/tiny_*`` and ``.cache/fixtures`` (what ``make assets`` writes)."""
    models = REPO / ".cache" / "models"
    if not all((models / n / "config.json").is_file() for n in TINY):
        subprocess.run([sys.executable, str(REPO / "scripts" / "make_tiny_models.py"), "--out", str(models), *TINY],
                       check=True, cwd=REPO)
    from avkv.tasks import fixtures

    fixtures.build(REPO / ".cache" / "fixtures")
    # AudioKV's head scores for the tiny Omni model (what `make assets` writes; a few seconds, once)
    subprocess.run([sys.executable, str(REPO / "scripts" / "calibrate_audiokv.py"), "--model", "tiny_qwen2_5_omni",
                    "--synthetic", "2", "--teacher-forcing", "--skip-existing"], check=True, cwd=REPO,
                   capture_output=True)
    return REPO / ".cache"


def run_py(*args: str, timeout: float = 240, check: bool = True, env: dict | None = None
           ) -> subprocess.CompletedProcess:
    """``python run.py ARGS`` from the repo root (logger off, no progress bars)."""
    env = dict(os.environ, WANDB_MODE="offline", HYDRA_FULL_ERROR="1", **(env or {}))
    p = subprocess.run([sys.executable, "run.py", *args, "progress=false"], cwd=REPO, env=env, timeout=timeout,
                       capture_output=True, text=True)
    if check and p.returncode != 0:
        raise AssertionError(f"run.py {' '.join(args)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p


def run_py_here(*args: str) -> None:
    """``python run.py ARGS`` in this process (the imports are paid once per test session)."""
    from hydra.core.global_hydra import GlobalHydra

    sys.path.insert(0, str(REPO))
    import run as entry

    argv = sys.argv
    sys.argv = ["run.py", *args, "progress=false"]
    GlobalHydra.instance().clear()
    try:
        entry.main()
    finally:
        sys.argv = argv
        GlobalHydra.instance().clear()


def popen_run_py(*args: str) -> subprocess.Popen:
    env = dict(os.environ, WANDB_MODE="offline")
    return subprocess.Popen([sys.executable, "run.py", *args, "progress=false"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def kill_group(p: subprocess.Popen) -> None:
    """SIGKILL the process we started and its children (its own session), as a preempted job dies."""
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.wait(timeout=30)


@pytest.fixture(scope="session")
def smoke_runs(assets, tmp_path_factory) -> dict:
    """Every preset whose dataset exists, run at smoke scale in this process (imports paid once).

    The grid is the preset's own (``smoke=tiny``) with one budget (two for budget_curves) and at most four of its
    methods (full and the last three, the paper's own method last), so the whole suite stays within its time
    budget; ``python run.py -m experiment=<preset> smoke=tiny`` runs all of them.
    """
    from omegaconf import OmegaConf

    from avkv import grid
    from avkv.config import CONFIG_DIR
    from avkv.experiment import run

    out = {}
    root = tmp_path_factory.mktemp("smoke_runs")
    for f in sorted((CONFIG_DIR / "experiment").glob("*.yaml")):
        y = OmegaConf.to_container(OmegaConf.load(f), resolve=False)
        if any(isinstance(d, dict) and not (CONFIG_DIR / k.replace("override", "").strip().strip("/")
                                            / f"{v}.yaml").is_file()
               for d in y.get("defaults", []) if isinstance(d, dict) for k, v in d.items()):
            continue
        budgets = y["grid"]["budgets"]
        budgets = [budgets[0], budgets[-1]] if f.stem == "budget_curves" else budgets[:1]
        have = [m for m in y["grid"]["methods"] if (CONFIG_DIR / "method" / f"{m}.yaml").is_file()]
        methods = have if len(have) <= 4 else have[:1] + have[-3:]  # full + the last three (the paper's own last)
        runs = root / f.stem
        for job in grid.expand([f"experiment={f.stem}", "smoke=tiny", f"budget={','.join(map(str, budgets))}",
                                f"method={','.join(methods)}", f"paths.runs={runs}", "max_new_tokens=2",
                                "threads=1", "dataset.limit_per_task=1"]):   # every sub-task, one sample each
            run(job.config)
        out[f.stem] = runs
    return out
