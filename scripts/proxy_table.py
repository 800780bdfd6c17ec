"""Reference table of the trained proxies: every available method at budgets 1.0 / 0.5 / 0.2 / 0.1 / 0.05.

    python scripts/proxy_table.py                       # all proxies, every configs/method/*.yaml
    python scripts/proxy_table.py --proxies av --limit 0           # the whole held-out set

Each cell is one ``avkv.experiment`` run (run directory ``results/proxy/<proxy>/<method>__b<budget>/``, resumed when
it exists) on the proxy's held-out set (``dataset=proxy_<name>``, ``compress_at=question``). Budget 1.0 is the full
cache, one run shared by every method. Controls beside the table: the untrained proxy (random init, same
architecture and tokenizer) with the full cache, and the trained proxy with every media entry dropped from the
cache (``method=drop_media``), once before the question is prefilled (``compress_at=context``: the answer can only
come from the media, so this is the leak control and must be at chance) and once after (``compress_at=question``:
what the question's own KV absorbed from the media while it was prefilled). ``results/proxy/table.md`` holds mean accuracy with a percentile bootstrap 95%
interval over samples (2000 resamples, seed 0), plus accuracy per question type at budget 0.1.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from avkv.config import CONFIG_DIR, compose  # noqa: E402
from avkv.engine import within_budget  # noqa: E402
from avkv.experiment import display_path, run  # noqa: E402
from avkv.models.base import weights_digest  # noqa: E402
from avkv.proxies.build import PROXIES, build_init  # noqa: E402
from avkv.results import SAMPLES, SUMMARY, read_records  # noqa: E402

CONTROLS = ("full", "drop_media")
CHANCE = 0.25


def bootstrap(scores: list[float], n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    x = np.asarray(scores, dtype=float)
    if len(x) == 0:
        return float("nan"), float("nan"), float("nan")
    idx = np.random.default_rng(seed).integers(0, len(x), (n_boot, len(x)))
    lo, hi = np.percentile(x[idx].mean(1), [2.5, 97.5])
    return float(x.mean()), float(lo), float(hi)


def methods_available() -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / "method").glob("*.yaml") if p.stem not in CONTROLS)


def run_cell(proxy: str, method: str, budget: float, out: Path, args, extra: list[str] = (),
             tag: str | None = None, compress_at: str = "question") -> dict:
    tag = tag or f"{method}__b{budget:g}"
    cfg = compose([f"model=proxy_{proxy}", f"dataset=proxy_{proxy}", f"method={method}", f"budget={budget}",
                   f"compress_at={compress_at}", f"run_dir={out / proxy / tag}", "progress=false",
                   f"threads={args.threads}", f"paths.fixtures={args.fixtures}",
                   *([f"dataset.limit={args.limit}"] if args.limit else []), *extra])
    s = summary_of(out / proxy / tag, args) if args.from_runs else run(cfg)
    recs = read_records(Path(s["run_dir"]) / SAMPLES)
    ok = [r for r in recs if r.get("error") is None]
    mean, lo, hi = bootstrap([r["score"] for r in ok])
    by_type: dict[str, list[float]] = {}
    for r in ok:
        by_type.setdefault(f"{r.get('question_relation')}/{r.get('question_type')}", []).append(r["score"])
    cell = {"proxy": proxy, "method": method, "budget": budget, "mean": mean, "lo": lo, "hi": hi, "n": len(recs),
            "n_failed": len(recs) - len(ok), "kept_ratio": s.get("kept_ratio_mean"), **budget_fields(ok, budget),
            "error": next((r["error"].split("\n")[0][:300] for r in recs if r.get("error")), None),
            "by_type": {k: float(np.mean(v)) for k, v in sorted(by_type.items())}, "run_dir": display_path(s["run_dir"])}
    print(json.dumps({k: v for k, v in cell.items() if k != "run_dir"}), flush=True)
    return cell


def summary_of(run_dir: Path, args) -> dict:
    """A finished cell's summary, read back from its run directory (``--from-runs``: nothing is run)."""
    path = run_dir / SUMMARY
    if not path.is_file():
        raise SystemExit(f"--from-runs: {path} does not exist; run the cell first (without --from-runs)")
    s = json.loads(path.read_text())
    n = len(read_records(run_dir / SAMPLES))
    if args.limit and n != args.limit:
        raise SystemExit(f"--from-runs: {run_dir} holds {n} samples, not --limit {args.limit}; resume it first")
    return dict(s, run_dir=str(run_dir))


def fmt(c: dict | None) -> str:
    if c is None or c["mean"] != c["mean"]:
        return "–" if c is None else f"– ({c['n_failed']}/{c['n']} failed)"
    failed = f" ({c['n_failed']}/{c['n']} failed)" if c.get("n_failed") else ""
    return f"{c['mean']:.2f} [{c['lo']:.2f}, {c['hi']:.2f}]{failed}"


def budget_fields(recs: list[dict], budget: float) -> dict:
    """What the cell's cache held: mean entries and bytes ratios, whether every sample held the budget (the
    engine's ``budget_held``; records older than it are judged by the same rule) and what the method declared."""
    if not recs:
        return {}
    def held(r):
        if "budget_held" in r:
            return bool(r["budget_held"])
        target = r.get("budget_target", budget)
        return (within_budget(r["kept_ratio"], target, r["n_prompt"])
                and within_budget(r["kv_bytes_ratio"], target, r["n_prompt"]))
    return {"bytes_ratio": float(np.mean([r["kv_bytes_ratio"] for r in recs])),
            "entries_ratio": float(np.mean([r["kept_ratio"] for r in recs])),
            "all_held": all(held(r) for r in recs),
            "budget_mode": recs[0].get("budget_mode", "held"),
            "infeasible": any(r.get("budget_infeasible") for r in recs)}


def over(c: dict | None, budget: float) -> str:
    """Flag a cell whose cache is not its budget: entries or bytes more than ±1 % away in either direction (the
    engine's rule, sample by sample), with what it held and why (infeasible, declared, or off budget)."""
    if not c or c.get("budget") == 1.0:
        return ""
    if "all_held" not in c:                               # a cells.json from before these fields
        kr = c.get("kept_ratio")
        return f" **(kept {kr:.2f})**" if kr is not None and abs(kr - budget) > 0.01 * budget + 0.005 else ""
    if c["all_held"]:
        return ""
    why = "infeasible" if c.get("infeasible") else "declared" if c.get("budget_mode") == "achieved" else "off budget"
    return f" **(held {c['entries_ratio']:.2f} entries / {c['bytes_ratio']:.2f} bytes: {why})**"


def table(cells: list[dict], proxies: list[str], budgets: list[float], methods: list[str]) -> str:
    get = {(c["proxy"], c["method"], c["budget"]): c for c in cells}
    lines = ["# Trained proxies: accuracy under KV compression", "",
             "Generated by `scripts/proxy_table.py` (held-out sets `dataset=proxy_<name>`, `compress_at=question`, "
             "greedy decoding, answers parsed as option letters). Cells: mean accuracy [bootstrap 95% interval] over the "
             "samples that ran (failed samples are counted beside it). "
             f"Chance is {CHANCE:.2f} for every question type. Budget 1.0 is the full cache. A cell whose cache is "
             "not its budget — kept entries or KV bytes more than ±1 % away, in either direction (the engine's "
             "`budget_held`) — says in bold what it held and why: `infeasible` (the method cannot reach the budget "
             "on this model), `declared` (its config keeps what its mechanism keeps) or `off budget`. Compare such a "
             "cell with the others at the ratio it held, not at its column's budget.", ""]
    for p in proxies:
        tr = json.loads((PROXIES[p].checkpoint / "TRAINING.json").read_text()) \
            if (PROXIES[p].checkpoint / "TRAINING.json").exists() else {}
        full = get.get((p, "full", 1.0))
        n = full["n"] if full else "?"
        lines += [f"## proxy_{p} ({tr.get('class', PROXIES[p].family)}, {tr.get('params', '?')} params, n={n})", "",
                  "| method | " + " | ".join(f"{b:g}" for b in budgets) + " |",
                  "|---|" + "---|" * len(budgets)]
        for m in methods:
            row = [fmt(full) if b == 1.0 else fmt(get.get((p, m, b))) + over(get.get((p, m, b)), b) for b in budgets]
            lines.append(f"| {m} | " + " | ".join(row) + " |")
        lines += ["", "| control | accuracy |", "|---|---|",
                  f"| random-init weights, full cache | {fmt(get.get((p, 'random_init', 1.0)))} |",
                  "| trained, all media dropped before the question is read (`compress_at=context`) | "
                  f"{fmt(get.get((p, 'drop_media_context', 0.5)))} |",
                  "| trained, all media dropped after the question is read (`compress_at=question`) | "
                  f"{fmt(get.get((p, 'drop_media', 0.5)))} |", ""]
        failed = {}
        for c in cells:
            if c["proxy"] == p and c.get("error") and c["mean"] != c["mean"]:
                failed.setdefault(c["method"], c["error"])
        if failed:
            lines += ["Failed cells (every sample recorded its error; the first one):", ""]
            lines += [f"- {m}: {e}" for m, e in sorted(failed.items())] + [""]
        low = 0.1 if 0.1 in budgets else min(budgets)       # per-type detail at the smallest budget
        if full:
            types = list(full["by_type"])
            lines += [f"Per question type (full cache, and each method at {low:g}):", "",
                      "| | " + " | ".join(types) + " |", "|---|" + "---|" * len(types),
                      "| full | " + " | ".join(f"{full['by_type'][t]:.2f}" for t in types) + " |"]
            for m in methods:
                c = get.get((p, m, low))
                if c:
                    lines.append(f"| {m} @{low:g} | " + " | ".join(f"{c['by_type'].get(t, float('nan')):.2f}"
                                                                   for t in types) + " |")
            lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--proxies", nargs="+", default=list(PROXIES), choices=list(PROXIES))
    ap.add_argument("--methods", nargs="+", default=None, help="default: every configs/method/*.yaml")
    ap.add_argument("--budgets", nargs="+", type=float, default=[1.0, 0.5, 0.2, 0.1, 0.05],
                    help="0.05 is beyond the issue's four budgets: it is where query-aware methods part")
    ap.add_argument("--limit", type=int, default=48,
                    help="first N held-out items (a prefix is type-balanced; 0 = all 150)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "proxy")
    ap.add_argument("--from-runs", action="store_true",
                    help="rebuild cells.json and table.md from the finished run directories without running anything")
    ap.add_argument("--fixtures", type=Path, default=ROOT / ".cache" / "fixtures")
    args = ap.parse_args()
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    from avkv.tasks import fixtures
    fixtures.build(args.fixtures, only=[f"proxy_{p}" for p in args.proxies])
    methods = args.methods or methods_available()
    cells = []
    for p in args.proxies:
        stamp = args.out / p / "WEIGHTS.sha256"        # run dirs resume; they must not outlive the weights
        digest = weights_digest(PROXIES[p].checkpoint)
        if args.from_runs and (not stamp.exists() or stamp.read_text().strip() != digest):
            raise SystemExit(f"--from-runs: {stamp} does not match the checkpoint of proxy_{p}; rerun the cells")
        if stamp.exists() and stamp.read_text().strip() != digest:
            print(f"proxy_{p}: the checkpoint changed since {args.out / p} was written; starting it afresh", flush=True)
            shutil.rmtree(args.out / p)
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.write_text(digest + "\n")
        cells.append(run_cell(p, "full", 1.0, args.out, args))
        for m in methods:
            for b in args.budgets:
                if b < 1.0:
                    cells.append(run_cell(p, m, b, args.out, args))
        init = ROOT / ".cache" / "proxy_init" / f"proxy_{p}"
        build_init(p, init)            # seconds; always rebuilt so it matches the current builder and tokenizer
        c = run_cell(p, "full", 1.0, args.out, args, extra=[f"model.path={init}"], tag="random_init__b1")
        cells.append(dict(c, method="random_init"))
        cells.append(run_cell(p, "drop_media", 0.5, args.out, args))
        c = run_cell(p, "drop_media", 0.5, args.out, args, tag="drop_media_context__b0.5", compress_at="context")
        cells.append(dict(c, method="drop_media_context"))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cells.json").write_text(json.dumps(cells, indent=1))
    (args.out / "table.md").write_text(table(cells, args.proxies, args.budgets, methods))
    print((args.out / "table.md").read_text())


if __name__ == "__main__":
    main()
