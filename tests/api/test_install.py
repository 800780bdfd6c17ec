"""`pip install .` into a clean venv outside the clone gives a runnable `avkv`: configs, papers and the proxy
checkpoints come as package data, the proxy's held-out fixture is generated on first use, results go under the
working directory. The venv borrows this environment's site-packages through a .pth line (no torch download)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from avkv.config import ROOT


def _source_copy(dest: Path) -> Path:
    """The clone's tracked and untracked-but-not-ignored files (what a fresh clone plus local edits hold)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split("\n")
    for f in filter(None, files):
        src = ROOT / f
        if src.is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)
    return dest


@pytest.mark.slow
def test_pip_install_outside_the_clone_runs(tmp_path):
    src = _source_copy(tmp_path / "src")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    (Path(purelib) / "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")   # torch & co, no copy
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    pip = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                          "--no-index", str(src)], capture_output=True, text=True, env=env,
                         timeout=300)
    assert pip.returncode == 0, pip.stdout + pip.stderr
    home = tmp_path / "work"                                   # a directory with no avkv clone in or above it
    home.mkdir()
    avkv = [str(venv / "bin" / "avkv")]                      # the console script pip wrote
    where = subprocess.run([str(py), "-c", "import avkv, avkv.config as c; print(avkv.__file__, c.IN_CLONE)"],
                           capture_output=True, text=True, cwd=home, env=env, timeout=120)
    assert where.stdout.split() == [f"{purelib}/avkv/__init__.py", "False"], where.stdout + where.stderr
    v = subprocess.run([*avkv, "--version"], capture_output=True, text=True, cwd=home, env=env, timeout=120)
    assert v.returncode == 0 and v.stdout.startswith("avkv "), v.stderr
    r = subprocess.run([*avkv, "run", "method=snapkv", "budget=0.2", "dataset.limit=2", "max_new_tokens=2",
                        "progress=false"], capture_output=True, text=True, cwd=home, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "accuracy" in r.stdout and "avkv report" in r.stdout
    runs = list((home / "runs").glob("proxy_av__proxy_av__snapkv__b0.2__*"))
    assert len(runs) == 1 and (runs[0] / "summary.json").is_file()
    assert (home / ".cache" / "fixtures" / "proxy_av").is_dir()      # generated on first use
    bad = subprocess.run([*avkv, "run", "budgt=0.2"], capture_output=True, text=True, cwd=home, env=env, timeout=120)
    assert bad.returncode == 2 and "did you mean budget" in bad.stderr
