"""Budget conformance table: method × budget → the KV cache each method really holds (entries and bytes).

    python scripts/budget_table.py                                   # tiny Qwen2.5-Omni + AV proxy, 4 samples each
    python scripts/budget_table.py --models proxy_av --methods acckv fastv --budgets 0.5 --limit 8

For every (model, method, budget) the engine runs the first ``--limit`` samples of the model's dataset
(``compress_at=question``; decoding stops after ``--max-new`` tokens, which does not change the prefill cache) and the
cell shows the mean ``kept_ratio`` (entries kept / full) and ``kv_bytes_ratio`` (bytes held / full) as
``entries / bytes``. A cell more than 1 % of the budget away from it (either direction, entries or bytes; one entry per
layer and head of rounding aside) is bold; ``!`` marks a method that declared it cannot hold the budget (record
``budget_mode: achieved`` or ``budget_infeasible: true``). Nothing is written to disk unless ``--json`` is given.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from avkv.config import CONFIG_DIR, compose, instantiate  # noqa: E402

DATASET = {"tiny_qwen2_5_omni": "avqa", "tiny_qwen2_5_omni_deep": "avqa", "tiny_qwen2_5_vl": "avqa",
           "tiny_qwen2_audio": "librispeech", "proxy_av": "proxy_av", "proxy_video": "proxy_video",
           "proxy_audio": "proxy_audio"}
SKIP = ("full", "drop_media")


def methods_available() -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / "method").glob("*.yaml") if p.stem not in SKIP)


def off_budget(ratio: float, budget: float, n: int) -> bool:
    """The engine's rule (:func:`avkv.engine.within_budget`): more than ±1 % of the budget away from it (plus one
    entry of rounding per layer and head)."""
    from avkv.engine import within_budget
    return not within_budget(ratio, budget, n)


def measure(model: str, methods: list[str], budgets: list[float], limit: int, max_new: int) -> list[dict]:
    from avkv.engine import Engine
    from avkv.experiment import build_prompt, sample_seed
    if model.startswith("tiny_"):
        from tests.conftest import tiny_model_dir
        tiny_model_dir(model)
    ds = DATASET.get(model, "avqa")
    cfg = compose([f"model={model}", f"dataset={ds}", f"dataset.limit={limit}"])
    adapter = instantiate(cfg.model, device="cpu")
    task = instantiate(cfg.dataset)
    docs = list(task.docs())[:limit]
    encs = [(str(d.id), adapter.encode(build_prompt(task, adapter, d))) for d in docs]
    cells = []
    for name in methods:
        for b in budgets:
            mcfg = compose([f"model={model}", f"method={name}"]).method
            recs, errors = [], []
            for sid, enc in encs:
                method = instantiate(mcfg)
                try:
                    g = Engine(adapter, method, budget=b, compress_at="question", max_new_tokens=max_new).generate(
                        enc, seed=sample_seed(0, sid))
                    recs.append(g.record)
                except Exception as e:  # noqa: BLE001 - a failing cell is data
                    errors.append(f"{type(e).__name__}: {e}"[:200])
            cell = {"model": model, "method": name, "budget": b, "n": len(recs), "errors": errors}
            if recs:
                cell["entries"] = sum(r["kept_ratio"] for r in recs) / len(recs)
                cell["bytes"] = sum(r["kv_bytes_ratio"] for r in recs) / len(recs)
                cell["n_prompt"] = min(r["n_prompt"] for r in recs)
                cell["declared"] = any(r.get("budget_mode") == "achieved" or r.get("budget_infeasible")
                                       for r in recs)
                cell["extra"] = {k: recs[0][k] for k in ("budget_mode", "budget_reason", "budget_infeasible",
                                                         "clie_active", "st_spattn_used", "fastv_layer")
                                 if k in recs[0]}
            cells.append(cell)
            print(json.dumps({k: v for k, v in cell.items()}), flush=True)
    return cells


def fmt(c: dict) -> str:
    if not c.get("n"):
        return "error: " + (c["errors"][0] if c["errors"] else "?")
    s = f"{c['entries']:.3f} / {c['bytes']:.3f}"
    off = off_budget(c["entries"], c["budget"], c["n_prompt"]) or off_budget(c["bytes"], c["budget"], c["n_prompt"])
    s = f"**{s}**" if off else s
    return s + (" !" if c.get("declared") else "")


def table(cells: list[dict], budgets: list[float]) -> str:
    out = []
    for model in dict.fromkeys(c["model"] for c in cells):
        get = {(c["method"], c["budget"]): c for c in cells if c["model"] == model}
        out += [f"### {model} (entries / bytes, mean over samples)", "",
                "| method | " + " | ".join(f"{b:g}" for b in budgets) + " |", "|---|" + "---|" * len(budgets)]
        for m in dict.fromkeys(k[0] for k in get):
            out.append(f"| {m} | " + " | ".join(fmt(get[(m, b)]) if (m, b) in get else "–" for b in budgets) + " |")
        out.append("")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["tiny_qwen2_5_omni", "proxy_av"])
    ap.add_argument("--methods", nargs="+", default=None, help="default: every configs/method/*.yaml but controls")
    ap.add_argument("--budgets", nargs="+", type=float, default=[0.5, 0.2, 0.1])
    ap.add_argument("--limit", type=int, default=4)
    ap.add_argument("--max-new", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    import torch
    from transformers.utils import logging as hf_logging
    torch.set_num_threads(a.threads)
    hf_logging.set_verbosity_error()
    t0 = time.perf_counter()
    cells = []
    for model in a.models:
        cells += measure(model, a.methods or methods_available(), a.budgets, a.limit, a.max_new)
    if a.json:
        a.json.write_text(json.dumps(cells, indent=1))
    print(table(cells, a.budgets))
    print(f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
