"""The report's capacity plot (avkv.report.capacity) from a small capacity.csv as scripts/bench_capacity.py writes
it: per budget the largest batch that fitted under the cap (never one that did not), its tokens/s and batch 1's."""
import json

import pandas as pd
import pytest

from avkv.report.capacity import capacity_points, plot_capacity
from tests.sweeps.fake_runs import make_run

ROWS = [  # budget, batch, fits, tokens/s
    (1.0, 1, True, 50.0), (1.0, 2, True, 90.0), (1.0, 3, False, 120.0),
    (0.5, 1, True, 52.0), (0.5, 4, True, 170.0), (0.5, 5, False, 200.0),
    (0.1, 1, True, 55.0), (0.1, 20, True, 600.0), (0.1, 21, False, 610.0),
]


def _write(tmp_path):
    d = tmp_path / "capacity"
    d.mkdir()
    pd.DataFrame([{"budget": b, "batch": n, "fits": f, "tokens_per_s": t, "batch_kv_bytes_allocated": n * 1000}
                  for b, n, f, t in ROWS]).to_csv(d / "capacity.csv", index=False)
    (d / "meta.json").write_text(json.dumps({"method": "snapkv", "shape": "0.5b", "layers": 2, "length": 2048,
                                             "device": "cpu", "cap_kv_bytes": 9 * 2**20}))
    return d


def test_points_are_the_largest_fitting_batch(tmp_path):
    pts = capacity_points(pd.read_csv(_write(tmp_path) / "capacity.csv"))
    assert list(pts["budget"]) == [1.0, 0.5, 0.1]
    assert list(pts["max_batch"]) == [2, 4, 20]                       # never the batch that went over the cap
    assert list(pts["tokens_per_s"]) == [90.0, 170.0, 600.0]
    assert list(pts["tokens_per_s_batch1"]) == [50.0, 52.0, 55.0]


def test_plot_is_written_from_the_folder_and_through_the_report(tmp_path):
    d = _write(tmp_path)
    paths = plot_capacity(d, tmp_path / "plots")
    assert [p.name for p in paths] == ["capacity.png"] and paths[0].stat().st_size > 5000
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(FileNotFoundError, match="bench_capacity.py"):
        plot_capacity(tmp_path / "absent", tmp_path / "plots")
    from avkv import cli
    make_run(tmp_path / "runs", "snap", method="snapkv", budget=0.2, task="ALFRED", ids=["a", "b"], scores=[1, 0])
    out = tmp_path / "rep"
    assert cli.main(["report", str(tmp_path / "runs"), "--out", str(out), "--n-boot", "50",
                     "--capacity", str(d)]) == 0
    assert (out / "plots" / "capacity.png").is_file()
