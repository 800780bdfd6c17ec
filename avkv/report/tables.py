"""Wide tables (rows model × method × budget, columns tasks + Avg + Δ Full) and their Markdown/LaTeX text."""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import pandas as pd

#: the order methods are listed in when a preset gives none: reference first, then baselines, then papers' methods
DEFAULT_METHOD_ORDER = [
    "full", "random", "streamingllm", "h2o", "snapkv", "pyramidkv", "adakv", "knorm", "tova", "observed_attention",
    "keydiff", "lookm", "fastv", "d2o", "kvmerge",
    "acckv", "purekv", "flowmm", "madakv", "audiokv",
    "expected_attention", "lagkv", "cur", "compactor", "finch", "simlayerkv", "chunkkv", "criticalkv", "criticaladakv",
    "block", "chunk", "composed", "per_layer_compression", "key_rerotation", "decoding",
]


# ------------------------------------------------------------------------------------------------ tables
def method_order(methods: Iterable[str], preferred: Sequence[str] | None = None) -> list[str]:
    order = list(preferred or []) + [m for m in DEFAULT_METHOD_ORDER if m not in (preferred or [])]
    ms = list(dict.fromkeys(methods))
    return sorted(ms, key=lambda m: (order.index(m) if m in order else len(order), m))


def fmt(mean: float, lo: float, hi: float, digits: int = 2, latex: bool = False, signed: bool = False) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    pm = r"$\pm$" if latex else "±"
    m = f"{mean:+.{digits}f}" if signed else f"{mean:.{digits}f}"
    if latex and m.startswith("-"):
        m = "$-$" + m[1:]
    half = (hi - lo) / 2 if not (math.isnan(lo) or math.isnan(hi)) else float("nan")
    if math.isnan(half):
        return m
    return f"{m} {pm} {half:.{digits}f}"


#: columns that tell apart points a table must not pool (besides model, method, variant, budget, task)
CONTEXT_COLUMNS = ("experiment", "table_id", "context_id", "limit", "compress_at")


class MixedPoints(ValueError):
    """Points from different contexts (experiment, dataset limit, compress_at, ...) that would share a table cell."""


def check_alike(points: pd.DataFrame) -> None:
    """Refuse (:class:`MixedPoints`) points that would land in one cell of a table though they come from different
    contexts: the message names the columns that differ, so the caller can split (``avkv report --experiment``,
    ``--filter``; :func:`avkv.report.build` makes one table per context)."""
    keys = [k for k in ("model", "method", "variant", "budget", "task") if k in points]
    dup = points.duplicated(keys, keep=False)
    if not dup.any():
        return
    d = points[dup]
    differ = [c for c in CONTEXT_COLUMNS if c in d and d.groupby(keys, dropna=False)[c].nunique(dropna=False).max() > 1]
    first = d.iloc[0]
    where = ", ".join(f"{k}={first[k]}" for k in keys)
    raise MixedPoints(f"{int(dup.sum())} points would share table cells (e.g. {where}) but differ in "
                      f"{', '.join(differ) or 'their run context'}; select one context (avkv report --experiment NAME "
                      "or --filter key=value) or build one table per context (report.build does)")


def wide_table(points: pd.DataFrame, avg: pd.DataFrame | None = None, methods: Sequence[str] | None = None,
               tasks: Sequence[str] | None = None, latex: bool = False, digits: int = 2) -> pd.DataFrame:
    """Rows (model, method, budget), columns tasks (+ Avg, Δ Full, KV held): ``mean ± half-width`` strings.

    The full cache appears once per model, whatever budget its runs carried. ``KV held`` is the fraction of the
    full cache's bytes the point really held; a point that did not hold its budget is listed after the model's
    other rows, its budget cell saying ``0.5 → held 0.36``.
    """
    if points.empty:
        return pd.DataFrame()
    p = collapse_full(points)
    check_alike(p)
    task_cols = list(tasks) if tasks else list(dict.fromkeys(p["task"]))
    task_cols = [t for t in task_cols if t in set(p["task"])]
    multi_variant = p.groupby(["model", "method", "budget"])["variant"].nunique().max() > 1
    order = method_order(p["method"], methods)
    rows = []
    a = collapse_full(avg) if avg is not None and not avg.empty else None
    held = lambda g: "budget_held" not in g or bool(g["budget_held"].fillna(True).astype(bool).all())
    for (model, method, variant, budget), g in sorted(
            p.groupby(["model", "method", "variant", "budget"], dropna=False),
            key=lambda kv: (str(kv[0][0]), not held(kv[1]), order.index(kv[0][1]), budget_sort_key(kv[0][3]),
                            str(kv[0][2]))):
        label = method + (f" [{variant[:6]}]" if multi_variant and variant else "")
        row = {"model": model, "method": label, "budget": "–" if method == "full" else budget_str(budget)}
        ach = float(g["budget_achieved"].mean()) if "budget_achieved" in g else float("nan")
        if not held(g):
            row["budget"] += f" → held {ach:.2f}"
        row["n"] = int(g["score_n"].fillna(0).sum()) if "score_n" in g else 0     # samples scored, all tasks
        by_task = {t: r for t, r in zip(g["task"], g.to_dict("records"))}
        for t in task_cols:
            r = by_task.get(t)
            row[t] = fmt(r["score_mean"], r["score_lo"], r["score_hi"], digits, latex) if r else "–"
        if a is not None and len(task_cols) > 1:
            ra = a[(a["model"] == model) & (a["method"] == method) & (a["variant"] == variant)
                   & (a["budget"] == budget)]
            if len(ra):
                r = ra.iloc[0]
                row["Avg"] = fmt(r["score_mean"], r["score_lo"], r["score_hi"], digits, latex)
                row["Δ Full"] = "–" if method == "full" else fmt(r["diff_mean"], r["diff_lo"], r["diff_hi"],
                                                                   digits, latex, signed=True)
        elif len(task_cols) == 1:
            r = by_task.get(task_cols[0])
            row["Δ Full"] = "–" if (method == "full" or r is None) else fmt(
                r["diff_mean"], r["diff_lo"], r["diff_hi"], digits, latex, signed=True)
        row["KV held"] = "–" if math.isnan(ach) else f"{ach:.2f}"
        rows.append(row)
    return pd.DataFrame(rows)


def _num(x) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("nan")


def same_budget(col: pd.Series, b) -> pd.Series:
    """``col == b`` where NaN equals NaN (a paper's number over all its budgets)."""
    return (col == b) | (col.isna() & math.isnan(_num(b)))


def budget_sort_key(b) -> float:
    """Sort key: larger budgets first, unknown ones last."""
    v = _num(b)
    return math.inf if math.isnan(v) else -v


def budget_str(b) -> str:
    b = _num(b)
    if math.isnan(b):
        return "all"  # a paper's average over its budgets
    if b < 0:
        return "?"
    if b > 1:
        return f"{int(b)} tok"
    return f"{b:g}"


def collapse_full(p: pd.DataFrame) -> pd.DataFrame:
    """The full cache ignores the budget: keep one row per (model, context, task) for it (the largest n)."""
    if p is None or p.empty or "method" not in p:
        return p
    full = p[p["method"] == "full"]
    rest = p[p["method"] != "full"]
    keys = [k for k in ("model", "context_id", "task", "variant") if k in p]
    full = full.sort_values("score_n", ascending=False).drop_duplicates(keys).assign(budget=1.0)
    return pd.concat([full, rest], ignore_index=True)


def to_markdown(table: pd.DataFrame) -> str:
    if table.empty:
        return "_no results_\n"
    cols = list(table.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in table.itertuples(index=False):
        lines.append("| " + " | ".join(_md_cell(x) for x in r) + " |")
    return "\n".join(lines) + "\n"


def _md_cell(x) -> str:
    return str(x).replace("|", "\\|")


def to_latex(table: pd.DataFrame, caption: str | None = None, label: str | None = None) -> str:
    if table.empty:
        return "% no results\n"
    cols = list(table.columns)
    esc = lambda s: (str(s).replace("_", r"\_").replace("%", r"\%").replace("&", r"\&")
                     .replace("Δ", r"$\Delta$").replace("–", "--"))
    out = [r"\begin{table}[t]", r"\centering", r"\small",
           r"\begin{tabular}{" + "l" * 3 + "r" * (len(cols) - 3) + "}", r"\toprule",
           " & ".join(esc(c) for c in cols) + r" \\", r"\midrule"]
    prev_model = None
    for r in table.itertuples(index=False):
        cells = [str(x) if "$" in str(x) else esc(x) for x in r]
        if prev_model is not None and r[0] != prev_model:
            out.append(r"\midrule")
        prev_model = r[0]
        out.append(" & ".join(cells) + r" \\")
    out += [r"\bottomrule", r"\end{tabular}"]
    if caption:
        out.append(r"\caption{" + esc(caption) + "}")
    if label:
        out.append(r"\label{" + label + "}")
    out.append(r"\end{table}")
    return "\n".join(out) + "\n"

