"""How many of the papers' published score numbers avkv can regenerate, and what blocks the rest.

A published number (a row of ``results/papers/*.csv`` with ``metric_kind=score`` and a value) is *runnable* when
its model, its method and its dataset each have a config in ``configs/``. The CSVs name them by avkv keys
(``model_key``, ``method_key``, ``task_key``); ``results/papers/keys/config_keys.csv`` maps every key to its config
(``kind,key,config,note``), so the mapping is data, not guesswork:

* ``model`` keys map to ``configs/model/<config>.yaml``; an empty ``model_key`` (a model avkv has no key for yet)
  is blocked by the paper's model name;
* ``method`` keys map to ``configs/method/<config>.yaml``;
* ``task`` keys map to ``configs/dataset/<config>.yaml`` (``a|b`` keys are looked up whole); a task key whose
  config is empty is an **aggregate** (``Avg``, ``Avg21``): it is runnable when every task of that model in the
  same paper table is (``strict``), or, by the rule the issue's first count used, whenever its model and method
  are (``lenient``).

``python scripts/coverage.py`` (or :func:`main`) prints, per paper table, runnable / published numbers under both
rules, then every missing model, method and dataset with the count of numbers it blocks (``blocks``: numbers that
need it; ``alone``: numbers it is the only thing missing for).
"""
from __future__ import annotations

import argparse
import csv
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from avkv.config import CONFIG_DIR, PAPERS_DIR, ROOT  # noqa: E402,F401 - clone or installed package data
KEYS_FILE = "keys/config_keys.csv"   # in a subfolder: report.paper_numbers reads every *.csv of papers/
GROUP = {"model": "model", "method": "method", "task": "dataset"}


@dataclass
class Number:
    file: str
    table: str
    model: str
    model_key: str
    method_key: str
    task_key: str
    budget: str
    missing: set[str] = field(default_factory=set)          # strict rule
    missing_lenient: set[str] = field(default_factory=set)  # aggregates need their model and method only


def load_keys(papers_dir: Path) -> dict[tuple[str, str], str]:
    """``(kind, key) -> config name`` ('' for an aggregate task key) from ``config_keys.csv``."""
    path = papers_dir / KEYS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"key mapping not found: {path}")
    out: dict[tuple[str, str], str] = {}
    with open(path, encoding="utf-8", newline="") as f:
        for ln, row in enumerate(csv.DictReader(f), 2):
            kind, key = (row.get("kind") or "").strip(), (row.get("key") or "").strip()
            if kind not in GROUP or not key:
                raise ValueError(f"{path}: line {ln} needs kind in {sorted(GROUP)} and a key, got {row}")
            if (kind, key) in out:
                raise ValueError(f"{path}: line {ln} repeats {kind} key {key!r}")
            out[(kind, key)] = (row.get("config") or "").strip()
    return out


def published(papers_dir: Path) -> list[dict]:
    """Every published score number (``metric_kind=score`` with a value) of every paper CSV, with its file."""
    rows = []
    for f in sorted(papers_dir.glob("*.csv")):
        with open(f, encoding="utf-8", newline="") as fh:
            for r in csv.DictReader(fh):
                if r.get("metric_kind") == "score" and (r.get("value") or "").strip():
                    rows.append({**r, "_file": f.stem})
    return rows


def compute(papers_dir: str | Path | None = None, config_dir: str | Path | None = None) -> dict:
    """Coverage of the published numbers: per table counts, per-number blockers, blocker counts."""
    papers_dir = Path(papers_dir) if papers_dir else PAPERS_DIR
    config_dir = Path(config_dir) if config_dir else CONFIG_DIR
    keys = load_keys(papers_dir)

    def have(kind: str, key: str) -> str | None:
        """None when the key's config exists, else the blocker label."""
        label = f"{GROUP[kind]} {key}"
        if (kind, key) not in keys:
            return f"{label} (no row in {KEYS_FILE})"
        conf = keys[(kind, key)]
        if not (config_dir / GROUP[kind] / f"{conf}.yaml").is_file():
            return f"{label} (configs/{GROUP[kind]}/{conf}.yaml)"
        return None

    rows = published(papers_dir)
    numbers: list[Number] = []
    for r in rows:
        n = Number(r["_file"], r.get("table", ""), r.get("model", ""), r.get("model_key", "").strip(),
                   r.get("method_key", "").strip(), r.get("task_key", "").strip(), r.get("budget", ""))
        base = set()
        base.add(have("model", n.model_key) if n.model_key else f"model {n.model} (no model_key)")
        base.add(have("method", n.method_key) if n.method_key else "method (no method_key)")
        base.discard(None)
        n.missing, n.missing_lenient = set(base), set(base)
        numbers.append(n)

    # the tasks of each (file, table, model): an aggregate needs all of them
    tasks_of: dict[tuple, set[str]] = defaultdict(set)
    for n in numbers:
        if n.task_key and keys.get(("task", n.task_key), None) != "":
            tasks_of[(n.file, n.table, n.model)].add(n.task_key)
    for n in numbers:
        if not n.task_key:
            n.missing.add("dataset (no task_key)")
            n.missing_lenient.add("dataset (no task_key)")
            continue
        aggregate = keys.get(("task", n.task_key)) == ""
        if aggregate:
            for t in sorted(tasks_of[(n.file, n.table, n.model)]):
                b = have("task", t)
                if b:
                    n.missing.add(b)
        else:
            b = have("task", n.task_key)
            if b:
                n.missing.add(b)
                n.missing_lenient.add(b)

    tables: dict[tuple[str, str], dict] = {}
    for n in numbers:
        t = tables.setdefault((n.file, n.table), {"published": 0, "runnable": 0, "runnable_lenient": 0})
        t["published"] += 1
        t["runnable"] += not n.missing
        t["runnable_lenient"] += not n.missing_lenient
    blocks, alone = Counter(), Counter()
    for n in numbers:
        for b in n.missing:
            blocks[b] += 1
        if len(n.missing) == 1:
            alone[next(iter(n.missing))] += 1
    return {"numbers": numbers, "tables": tables, "blocks": blocks, "alone": alone,
            "published": len(numbers), "runnable": sum(not n.missing for n in numbers),
            "runnable_lenient": sum(not n.missing_lenient for n in numbers)}


def format_report(res: dict) -> str:
    lines = ["coverage of the published score numbers (results/papers/*.csv, metric_kind=score)", "",
             f"{'paper table':<34} {'published':>9} {'runnable':>9} {'lenient':>8}"]
    for (file, table), t in sorted(res["tables"].items()):
        lines.append(f"{file + ' · ' + table:<34} {t['published']:>9} {t['runnable']:>9} {t['runnable_lenient']:>8}")
    tot, ok, okl = res["published"], res["runnable"], res["runnable_lenient"]
    lines.append(f"{'total':<34} {tot:>9} {ok:>9} {okl:>8}")
    lines += ["", f"runnable: {ok} of {tot} ({100 * ok / max(tot, 1):.0f} %); lenient rule (an average counts when its "
              f"model and method run): {okl} of {tot} ({100 * okl / max(tot, 1):.0f} %)"]
    if res["blocks"]:
        lines += ["", f"{'missing':<72} {'blocks':>6} {'alone':>6}"]
        for b, c in sorted(res["blocks"].items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"{b:<72} {c:>6} {res['alone'].get(b, 0):>6}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="avkv coverage", description=__doc__.split("\n\n")[0])
    ap.add_argument("--papers-dir", type=Path, default=None, help="folder of the paper CSVs (results/papers)")
    ap.add_argument("--config-dir", type=Path, default=None, help="Hydra config folder (configs/)")
    a = ap.parse_args(argv)
    print(format_report(compute(a.papers_dir, a.config_dir)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
