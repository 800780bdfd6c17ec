"""Collect run directories into one table, print the papers' tables with confidence intervals, plot budget curves.

Usage (see ``docs/sweeps.md``)::

    avkv report runs/ --out reports/flowmm           # or: python -m avkv.report runs/ --out ...
    avkv report runs/ --experiment flowmm_table1      # one sweep only (--filter key=value selects further)
    avkv report runs/ --paper flowmm_table1           # our numbers beside the paper's
    avkv missing experiment=flowmm_table1 smoke=tiny   # grid points not yet complete (see avkv.grid)

What it reads is the results store (``avkv/results.py``): every directory holding a ``samples.jsonl`` (one JSON line
per finished sample) next to its resolved ``config.yaml``; ``summary.json`` is written when a run completes.
Nothing is read from W&B: the files are the ground truth.

* **One long table.** Every sample of every run becomes a row with the run's coordinates (experiment, model,
  method, budget, dataset, task, shard) and the sample's fields (nested dicts such as ``kept_by_modality`` are
  flattened to ``kept_by_modality.video``). Shards of one grid point (``shard``/``num_shards``) have their own run
  directories and are merged here; a sample id seen twice (a rerun, an overlapping shard) is kept once, the last
  error-free record winning. Written as ``samples.parquet`` and ``samples.csv``.
The package: :mod:`~avkv.report.collect` (run directories → one long table), :mod:`~avkv.report.aggregate`
(points), :mod:`~avkv.report.tables` (wide tables, Markdown/LaTeX), :mod:`~avkv.report.plots`,
:mod:`~avkv.report.papers` (published numbers beside ours); file names, records and identity are
:mod:`avkv.results`'s.

* **Never merging unlike points.** The key of a point holds the experiment, the dataset limit (``limit``:
  ``all``, ``8``, ``2/task``), ``compress_at`` and the whole run context (``context_id``/``table_id``); a table is
  one (experiment, dataset, context) and shows ``n``, so snapkv@0.2 on 8 samples and on 150 are two tables, never
  one row. :func:`~avkv.report.tables.wide_table` refuses points that would share a cell (:class:`MixedPoints`).
* **Points.** One row per (context, task, method, hyper-parameters, budget): the mean score with a bootstrap 95%
  interval, the paired difference against the full cache on the same samples (with its own interval), kept
  ratio, KV bytes, prefill and decode time, peak memory, error count, and whether every shard completed.
  Failed samples (``error`` set) are excluded from means and counted in ``n_err``.
* **Tables.** Rows (model, method, budget), columns the tasks plus ``Avg`` (the mean of task means, stratified
  bootstrap) and ``Δ Full`` (paired, on the same average); Markdown and LaTeX. Scores are multiplied by
  ``--scale`` (100 by default: accuracy and ROUGE-L in percent, as the papers print them).
* **Plots.** Score vs budget per method (the full cache as a dashed line), KV memory vs budget, decode latency
  vs budget (mean ± 95% CI); one PNG per (experiment, model, dataset, context), titled with the model, dataset,
  metric and n, the score axis labelled with the metric. Each method is placed at the ratio of the KV cache it
  really held (``budget_achieved``), not at its nominal budget.
* **Capacity** (``--capacity results/bench/capacity``): decode tokens/s against the budget at the largest batch
  that fitted under a memory cap, from ``scripts/bench_capacity.py``'s CSV (:mod:`~avkv.report.capacity`), as
  ``plots/capacity.png``.
* **Budgets held.** Every point says what it held (``budget_achieved``: the fraction of the full cache's bytes) and
  whether every sample held its budget (``budget_held``: entries and bytes within ±1 %, the engine's rule). In the
  tables a point that did not is listed after the ones that did, its budget cell saying what it held.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from avkv import stats
from avkv.config import PAPERS_DIR  # noqa: F401 - results/papers in a clone, package data when installed
from avkv.report.aggregate import (POINT_KEYS, aggregate, average_over_tasks, budget_held_of,  # noqa: F401
                                   full_reference, keyed, valid_rows)
from avkv.report.collect import (RUN_COLUMNS, SAMPLE_NUMERIC, SKIP_DIRS, collect, dedupe,  # noqa: F401
                                 describe, find_runs, identities, limit_label, load_config, load_run, read_samples,
                                 read_table, write_samples)
from avkv.report.papers import beside_paper, efficiency_beside, paper_numbers, paper_table  # noqa: F401
from avkv.report.plots import plot_budget_curves, safe_name  # noqa: F401
from avkv.report.tables import (CONTEXT_COLUMNS, DEFAULT_METHOD_ORDER, MixedPoints, budget_str,  # noqa: F401
                                check_alike, collapse_full, fmt, method_order, to_latex, to_markdown, wide_table)


class ReportError(ValueError):
    """A report that cannot be made as asked (no such path, no runs, a filter that selects nothing)."""


#: columns ``--filter`` may select on
FILTER_COLUMNS = ("experiment", "model", "method", "budget", "dataset", "task", "limit", "compress_at", "paper",
                  "variant", "table_id", "context_id", "run_id")


def select(df: pd.DataFrame, experiments: Sequence[str] = (), filters: Sequence[str] = ()) -> pd.DataFrame:
    """The samples of the chosen experiments (``--experiment``) whose columns match every ``key=value`` filter
    (``value`` may be a comma list; budgets compare as numbers). An unknown column or a value no run has is a
    :class:`ReportError` naming what there is (and the closest match)."""
    from avkv.config import close_match
    out = df
    conds = [f"experiment={','.join(experiments)}"] if experiments else []
    for f in [*conds, *filters]:
        key, eq, value = f.partition("=")
        key = key.strip()
        if not eq or key not in FILTER_COLUMNS:
            near = close_match(key, FILTER_COLUMNS)
            raise ReportError(f"--filter {f!r}: write key=value with key one of {', '.join(FILTER_COLUMNS)}"
                              + (f" (did you mean {near}?)" if near and eq else ""))
        wanted = [v.strip() for v in value.split(",") if v.strip()]
        col = out[key] if key in out else pd.Series([None] * len(out), index=out.index)
        if key == "budget":
            try:
                nums = [float(v) for v in wanted]
            except ValueError:
                raise ReportError(f"--filter {f!r}: budgets are numbers") from None
            mask = col.astype(float).apply(lambda b: any(abs(b - w) < 1e-9 for w in nums))
        else:
            mask = col.astype(str).isin(wanted)
        if not mask.any():
            have = sorted({str(v) for v in col.dropna().unique()})
            missing = wanted[0] if len(wanted) == 1 else ",".join(wanted)
            near = close_match(wanted[0], have) if wanted else None
            raise ReportError(f"{key}={missing}: no run has it; the runs have {key} in "
                              f"{{{', '.join(have[:20])}{', ...' if len(have) > 20 else ''}}}"
                              + (f" (did you mean {near}?)" if near else ""))
        out = out[mask]
    return out


def _table_title(exp: Any, ds: Any, pe: pd.DataFrame, several: bool) -> str:
    n = sorted({int(v) for v in pe["score_n"].dropna()})
    n_s = "n=?" if not n else f"n={n[0]}" if len(n) == 1 else f"n={n[0]}–{n[-1]}"
    bits = [f"{exp or 'runs'} · {ds}", n_s, f"limit {pe['limit'].iloc[0] or 'all'}"]
    if "compress_at" in pe and str(pe["compress_at"].iloc[0]):
        bits.append(f"compress_at {pe['compress_at'].iloc[0]}")
    if several:
        bits.append(f"context {str(pe['table_id'].iloc[0])[:6]}")
    return " · ".join(bits)


def build(paths: Sequence[str | Path], out: Path | None = None, scale: float = 100.0, paper: str | None = None,
          paper_model: str | None = None, n_boot: int = stats.N_BOOT, plots: bool = True,
          quiet: bool = False, experiments: Sequence[str] = (), filters: Sequence[str] = (),
          capacity: str | Path | None = None) -> dict:
    """The whole report: collect → select → points → one table per (experiment, dataset, context) (→ files
    under ``out``). Returns the frames and text; ``res["n_runs"]`` counts the runs read."""
    df = collect(paths)
    res0_runs = int(df["run_dir"].nunique()) if len(df) else 0
    if len(df) and (experiments or filters):
        df = select(df, experiments, filters)
    points = aggregate(df, scale=scale, n_boot=n_boot)
    avg = average_over_tasks(df, scale=scale, n_boot=n_boot)
    res: dict[str, Any] = {"samples": df, "points": points, "avg": avg, "n_runs": res0_runs}
    if points.empty:
        res["markdown"] = "_no results found under " + ", ".join(map(str, paths)) + "_\n"
        if not quiet:
            print(res["markdown"])
        return res
    # which paper tables to print beside ours: the one asked for, else each paper the runs' presets name
    if paper is not None:
        sides = [(paper, paper_model, points, avg)]
    else:
        sides = []
        for p_name, pe in points[points["paper"].notna()].groupby("paper", sort=False) if "paper" in points else []:
            models = [m for m in pe["paper_model"].dropna().unique() if m] if "paper_model" in pe else []
            if paper_model or len(models) <= 1:
                ae = avg[avg["experiment"].isin(pe["experiment"].unique())] if not avg.empty else avg
                sides.append((p_name, paper_model or (models[0] if models else None), pe, ae))
                continue
            for m in models:                       # one table per paper model the runs stand for
                pm = pe[pe["paper_model"] == m]
                ae = avg[avg["experiment"].isin(pm["experiment"].unique()) & avg["model"].isin(pm["model"].unique())] \
                    if not avg.empty else avg
                sides.append((p_name, m, pm, ae))
    md_parts, tex_parts = [], []
    for (exp, ds), pe in points.groupby(["experiment", "dataset"], sort=False):
        contexts = list(pe.groupby("table_id", sort=False))
        if len(contexts) > 1:
            differ = [c for c in ("limit", "compress_at") if pe[c].astype(str).nunique() > 1]
            md_parts.append(f"_{exp or 'runs'} · {ds}: the runs come from {len(contexts)} different contexts ("
                            + (", ".join(f"{c} {' / '.join(map(str, dict.fromkeys(pe[c])))}" for c in differ)
                               or "other settings differ: seed, model or dataset keys")
                            + "); one table each, never pooled_\n")
        for tid, pt in contexts:
            at = avg[(avg["experiment"] == exp) & (avg["dataset"] == ds) & (avg["table_id"] == tid)] \
                if not avg.empty else avg
            title = _table_title(exp, ds, pt, several=len(contexts) > 1)
            md_parts.append(f"### {title}\n\n" + to_markdown(wide_table(pt, at)))
            tex_parts.append(to_latex(wide_table(pt, at, latex=True), caption=title,
                                      label=f"tab:{safe_name(exp)}-{safe_name(ds)}-{str(tid)[:6]}"))
    incomplete = points[~points["complete"]]
    if len(incomplete):
        md_parts.append("**Incomplete points** (rerun the same command to resume them):\n\n" + to_markdown(
            incomplete[["model", "method", "budget", "task", "score_n", "shards_seen", "num_shards"]]))
    for p_name, p_model, p_points, p_avg in sides:
        try:
            pn = paper_numbers(p_name)
        except FileNotFoundError as e:
            md_parts.append(f"_paper numbers not found: {e}_\n")
            continue
        if p_points["table_id"].nunique() > 1:        # beside the paper: the largest context only, said so
            sizes = p_points.groupby("table_id")["score_n"].sum().sort_values(ascending=False)
            keep = sizes.index[0]
            md_parts.append(f"_beside {p_name}: {len(sizes)} contexts; showing the largest (context {keep[:6]})_\n")
            p_points = p_points[p_points["table_id"] == keep]
            p_avg = p_avg[p_avg["table_id"] == keep] if p_avg is not None and not p_avg.empty else p_avg
        side = beside_paper(p_points, p_avg, pn, paper_model=p_model)
        ref = ", ".join(sorted(set(pn["ref"])))
        shown = p_model or pn["model"].iloc[0]
        md_parts.append(f"### beside the paper ({p_name}: {ref}; paper model {shown}; cells: ours ± CI (paper))\n\n"
                        + to_markdown(side))
        several = sum(1 for s_ in sides if s_[0] == p_name) > 1
        res.setdefault("beside_paper", {})[f"{p_name} · {shown}" if several else p_name] = side
    res["markdown"] = "\n".join(md_parts)
    res["latex"] = "\n".join(tex_parts)
    if out is not None:
        out = Path(out)
        res["files"] = write_samples(df, out)
        points.to_csv(out / "points.csv", index=False)
        avg.to_csv(out / "avg.csv", index=False)
        (out / "table.md").write_text(res["markdown"])
        (out / "table.tex").write_text(res["latex"])
        res["files"] += [out / "points.csv", out / "avg.csv", out / "table.md", out / "table.tex"]
        if plots:
            res["plots"] = plot_budget_curves(points, out / "plots", avg, scale=scale)
            res["files"] += res["plots"]
        if plots and capacity is not None:
            from avkv.report.capacity import plot_capacity
            res["capacity_plots"] = plot_capacity(capacity, out / "plots")
            res["files"] += res["capacity_plots"]
    if not quiet:
        print(res["markdown"])
        if out is not None:
            print(f"wrote {out}/ (samples.parquet, samples.csv, points.csv, table.md, table.tex"
                  + (", plots/" if plots else "") + ")")
    return res


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("paths", nargs="*", default=["runs"], help="run directories or folders holding them")
    ap.add_argument("--out", "-o", type=Path, default=None, help="folder for tables, parquet/CSV and plots")
    ap.add_argument("--scale", type=float, default=100.0, help="multiply scores by this (default 100: percent)")
    ap.add_argument("--paper", default=None, help="paper numbers to show beside ours (results/papers/<name>.csv); "
                                                  "default: the paper named by the runs' preset")
    ap.add_argument("--paper-model", default=None, help="which of the paper's models to compare with")
    ap.add_argument("--n-boot", type=int, default=stats.N_BOOT, help="bootstrap replicates")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--capacity", type=Path, default=None, metavar="DIR",
                    help="also plot tokens/s vs budget at a memory cap from scripts/bench_capacity.py's folder "
                         "(e.g. results/bench/capacity)")
    ap.add_argument("--experiment", "-e", action="append", default=[],
                    help="only this experiment (a preset's grid.name, or experiment_name); repeatable")
    ap.add_argument("--filter", "-f", action="append", default=[], metavar="KEY=VALUE",
                    help=f"only runs whose KEY is VALUE (a comma list allowed); KEY one of {', '.join(FILTER_COLUMNS)}")


def main(argv: Sequence[str] | None = None) -> int:
    """``avkv report``: 0 when a table was made; 2 for a path that does not exist or a bad filter, 1 when no run
    was found (an empty report is not a success)."""
    ap = argparse.ArgumentParser(prog="avkv report", description=__doc__.split("\n\n")[0])
    add_arguments(ap)
    a = ap.parse_args(argv)
    absent = [p for p in [*a.paths, *([a.capacity] if a.capacity else [])] if not Path(p).exists()]
    if absent:
        print(f"avkv report: no such path: {', '.join(map(str, absent))}", file=sys.stderr)
        return 2
    try:
        res = build(a.paths, out=a.out, scale=a.scale, paper=a.paper, paper_model=a.paper_model, n_boot=a.n_boot,
                    plots=not a.no_plots, experiments=a.experiment, filters=a.filter, quiet=True,
                    capacity=a.capacity)
    except (ReportError, MixedPoints) as e:
        print(f"avkv report: {e}", file=sys.stderr)
        return 2
    if res["points"].empty:
        print(f"avkv report: no runs found under {', '.join(map(str, a.paths))} (a run directory holds "
              "samples.jsonl and config.yaml)", file=sys.stderr)
        return 1
    print(res["markdown"])
    if a.out is not None:
        print(f"wrote {a.out}/ (samples.parquet, samples.csv, points.csv, table.md, table.tex"
              + (", plots/" if not a.no_plots else "") + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
