"""scripts/bench_gpu.sh: its CPU dry run (1 layer, 256 tokens) goes through every step the GPU run takes and
writes the overhead / decode tables with peak memory; without a GPU the real run stops with a message naming it."""
import csv
import subprocess

import pytest
import torch

from tests.conftest import ROOT


def _csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_dry_run_writes_the_tables(tmp_path):
    out = tmp_path / "gpu"
    p = subprocess.run(["bash", str(ROOT / "scripts" / "bench_gpu.sh"), "--dry-run", "--out", str(out)],
                       capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = _csv(out / "overhead" / "overhead.csv")
    assert {r["method"] for r in rows} == {"full", "snapkv", "h2o"}
    assert all(int(r["prompt_len"]) == 256 and int(float(r["peak_mem_bytes"])) > 0 for r in rows)
    dec = _csv(out / "overhead" / "decode.csv")
    assert {(r["method"], float(r["budget"])) for r in dec} >= {("full", 1.0), ("snapkv", 0.2)}
    assert all(float(r["decode_ms_per_token"]) > 0 for r in dec)
    assert (out / "overhead" / "table.md").read_text().count("| snapkv |") >= 1
    env = (out / "environment.txt").read_text()
    assert "dry_run: 1" in env and "torch " in env


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: the real run would start")
def test_real_run_without_a_gpu_says_so(tmp_path):
    p = subprocess.run(["bash", str(ROOT / "scripts" / "bench_gpu.sh"), "--out", str(tmp_path)],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert p.returncode != 0 and "no CUDA device" in p.stderr
