"""Are the proxy table's cells unchanged? Re-run cells of ``results/proxy/`` on the current code and compare them
sample by sample with the committed records.

    python scripts/proxy_cells_check.py --proxies av --budgets 0.1 --limit 8     # every method, first 8 samples
    python scripts/proxy_cells_check.py --methods snapkv h2o --budgets 0.5 0.1

Each cell runs as ``scripts/proxy_table.py`` runs it (same overrides) into a temporary directory, on the first
``--limit`` samples of the held-out set; for every sample id the fields in :data:`FIELDS` (prediction, score, kept
entries per layer and modality, bytes, budget) must equal the committed record's. Timings are not compared. Prints
one line per cell and a total; exits 1 when any cell differs.
"""
from __future__ import annotations

import argparse
import math
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from avkv.config import compose  # noqa: E402
from avkv.experiment import run  # noqa: E402
from avkv.proxies.build import PROXIES  # noqa: E402
from avkv.results import SAMPLES, read_records  # noqa: E402

#: what a cell's behaviour is (everything in a record but timings, memory and the environment)
FIELDS = ("prediction", "score", "error", "parsed", "n_prompt", "split", "compressed", "kv_bytes_full",
          "kv_bytes_kept", "kept_ratio", "kv_bytes_ratio", "kept_by_modality", "kept_per_layer", "kv_storage",
          "budget_achieved", "budget_held", "budget_mode", "new_tokens")


def same(a: Any, b: Any) -> bool:
    """Equal, numbers within 1e-12 relative (a mean summed in another order) and error messages without the
    checkout's path (``/work/wt/x/avkv/...`` and ``/work/main/avkv/...`` name the same file)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-12)
    if isinstance(a, str) and isinstance(b, str):
        return re.sub(r"\S*/(?=avkv/|\.cache/)", "<root>/", a) == re.sub(r"\S*/(?=avkv/|\.cache/)", "<root>/", b)
    return a == b


def differences(fresh: list[dict], committed: list[dict]) -> list[str]:
    """What differs between the fresh records and the committed ones of the same sample ids (empty: identical)."""
    old = {r["sample_id"]: r for r in committed}
    out = []
    for r in fresh:
        o = old.get(r["sample_id"])
        if o is None:
            out.append(f"sample {r['sample_id']}: not in the committed cell")
            continue
        out += [f"sample {r['sample_id']}: {k} {o.get(k)!r} -> {r.get(k)!r}" for k in FIELDS
                if not same(r.get(k), o.get(k))]
    return out


def check_cell(proxy: str, method: str, budget: float, limit: int, out: Path, table: Path) -> list[str] | None:
    """The differences of one cell, or None when the committed table has no such cell."""
    tag = "full__b1" if method == "full" else f"{method}__b{budget:g}"
    committed = table / proxy / tag / SAMPLES
    if not committed.is_file():
        return None
    cfg = compose([f"model=proxy_{proxy}", f"dataset=proxy_{proxy}", f"method={method}", f"budget={budget}",
                   "compress_at=question", f"run_dir={out / proxy / tag}", "progress=false", "threads=1",
                   f"paths.fixtures={ROOT / '.cache' / 'fixtures'}", f"dataset.limit={limit}", "logger=none"])
    s = run(cfg)
    fresh = read_records(Path(s["run_dir"]) / SAMPLES)
    if len(fresh) != limit:
        return [f"{len(fresh)} samples ran, not {limit}"]
    return differences(fresh, read_records(committed))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--proxies", nargs="+", default=list(PROXIES), choices=list(PROXIES))
    ap.add_argument("--methods", nargs="+", default=None, help="default: every committed cell's method")
    ap.add_argument("--budgets", nargs="+", type=float, default=[0.1])
    ap.add_argument("--limit", type=int, default=8)
    ap.add_argument("--table", type=Path, default=ROOT / "results" / "proxy")
    args = ap.parse_args(argv)
    n_same = n_diff = 0
    with tempfile.TemporaryDirectory(prefix="proxy_cells_") as tmp:
        for proxy in args.proxies:
            methods = args.methods or sorted({d.name.split("__b")[0] for d in (args.table / proxy).iterdir()
                                              if d.is_dir() and "__b" in d.name and d.name.split("__b")[0] != "full"})
            for method in methods:
                for budget in args.budgets:
                    diff = check_cell(proxy, method, budget, args.limit, Path(tmp), args.table)
                    if diff is None:
                        continue
                    n_same += not diff
                    n_diff += bool(diff)
                    print(f"{proxy} {method} b{budget:g}: " + ("identical" if not diff else
                          f"{len(diff)} differences: " + "; ".join(diff[:3])), flush=True)
    print(f"{n_same} cells identical, {n_diff} differ ({args.limit} samples each)")
    return 1 if n_diff else 0


if __name__ == "__main__":
    raise SystemExit(main())
