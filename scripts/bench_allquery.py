"""Per-layer cost of the all-query statistics routes, as a fraction of that layer's prefill (interleaved repetitions).

    python scripts/bench_allquery.py --shape 0.5b --lengths 4096 16384
    python scripts/bench_allquery.py --shape 7b --lengths 4096 --before-src /path/to/old/avkv/methods/base.py

For one decoder layer of a Qwen2.5 shape (random weights, SDPA, one intra-op thread on CPU) and a prompt length it
times, in interleaved rounds (every route once per round, so machine load hits them alike), the thread CPU time of:

* ``prefill``: the layer's prefill (a one-layer model's forward, the reference of every ratio);
* ``lse`` (the route used when the prefill captured the log-sum-exps) at several row chunks, for
  ``accumulated_scores`` (H2O, LOOK-M, D2O, KVMerger) and ``attention_sums`` with AccKV's weights and blocks;
* ``softmax``: the exact chunked softmax over the queries (the route without captured statistics);
* ``lse_first``: recomputing the log-sum-exps with the fused kernel, then the ``lse`` pass (the alternative to
  ``softmax`` when nothing was captured);
* with ``--before-src`` (an older ``avkv/methods/base.py``): that version's ``accumulated_scores`` (its default
  route) and ``attention_sums``, for before/after tables.

Writes ``results/bench/allquery_<shape>.csv`` (one row per route and length: median seconds, ratio to the prefill).
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import math
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from avkv.lse_attention import _kernel  # noqa: E402
from avkv.methods import allquery  # noqa: E402
from avkv.methods.base import LayerView, accumulated_scores, attention_sums  # noqa: E402
from scripts.bench_overhead import SHAPES, BenchAdapter  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "results" / "bench"


def acckv_args(S: int):
    pos = torch.arange(S, dtype=torch.float32)
    mod = torch.zeros(S, dtype=torch.long)
    mod[S // 10: 9 * S // 10] = 2
    text, vid = mod == 0, mod == 2
    return pos + 1, 1.0 / (S - pos), {"tv": (text, vid), "ta": (text, mod == 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="0.5b")
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--chunks", type=int, nargs="+", default=[128, 256, 512])
    ap.add_argument("--before-src", default=None, help="an older avkv/methods/base.py to time as 'before'")
    ap.add_argument("--skip", nargs="*", default=[], help="route names to leave out")
    ap.add_argument("--out", default=str(OUT))
    a = ap.parse_args()
    torch.set_num_threads(1)
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    before = None
    if a.before_src:
        spec = importlib.util.spec_from_file_location("avkv_before_base", a.before_src)
        before = importlib.util.module_from_spec(spec)
        sys.modules["avkv_before_base"] = before
        spec.loader.exec_module(before)
    sh = SHAPES[a.shape]
    H, kvH = sh["num_attention_heads"], sh["num_key_value_heads"]
    D = sh["hidden_size"] // H
    adapter = BenchAdapter(1, "cpu", "float32", "sdpa", a.shape)
    rows = []
    for S in a.lengths:
        g = torch.Generator().manual_seed(S)
        q = torch.randn(H, S, D, generator=g)
        k = torch.randn(kvH, S, D, generator=g)
        v = torch.randn(kvH, S, D, generator=g)
        scale = D ** -0.5
        _, lse = _kernel(q[None], k[None], v[None], scale)
        view = LayerView(layer_idx=0, num_layers=1, keys=k, values=v, modality=torch.zeros(S, dtype=torch.long),
                         n_keep=S // 5, num_heads=H, scaling=scale, state={}, generator=torch.Generator(),
                         query_fn=lambda s, e: q[:, s:e])
        sview = replace(view, stats=allquery.PrefillStats(q, lse[0].float()))
        ids = torch.randint(0, 1024, (1, S), generator=g)
        rw, cw, blocks = acckv_args(S)

        def prefill():
            from transformers import DynamicCache
            adapter.model(input_ids=ids, past_key_values=DynamicCache(config=adapter.model.config), use_cache=True,
                          logits_to_keep=1)

        routes = {"prefill": prefill, "softmax/acc": lambda: accumulated_scores(view, 512),
                  "lse_first/acc": lambda: accumulated_scores(replace(view, stats=allquery.PrefillStats(
                      q, _kernel(q[None], k[None], v[None], scale)[1][0].float())), 512)}
        for c in a.chunks:
            routes[f"lse/acc/c{c}"] = lambda c=c: accumulated_scores(sview, c)
            routes[f"lse/sums/c{c}"] = lambda c=c: attention_sums(sview, c, rw, cw, blocks)
        routes["softmax/sums"] = lambda: attention_sums(view, 512, rw, cw, blocks)
        if before is not None:
            routes["before/acc"] = lambda: before.accumulated_scores(view, 512)
            routes["before/sums"] = lambda: before.attention_sums(view, 512, rw, cw, blocks)
        routes = {n: f for n, f in routes.items() if n not in a.skip}
        times = {n: [] for n in routes}
        with torch.no_grad():
            for n, f in routes.items():                        # warm-up (first-call costs)
                if n == "prefill" or S <= 4096:
                    f()
            for r in range(a.rounds):
                for n, f in routes.items():
                    t = time.thread_time()
                    f()
                    times[n].append(time.thread_time() - t)
                print(f"S={S} round {r}: " + ", ".join(f"{n} {times[n][-1]:.2f}s" for n in routes),
                      f"(load {os.getloadavg()[0]:.1f})", flush=True)
        ref = statistics.median(times["prefill"])
        for n in routes:
            med = statistics.median(times[n])
            rows.append({"shape": a.shape, "prompt_len": S, "route": n, "rounds": a.rounds, "median_s": med,
                         "ratio_to_prefill": med / ref, "min_s": min(times[n]), "max_s": max(times[n])})
            print(f"  {n:<16} {med:8.3f} s  {100 * med / ref:7.2f}% of the layer's prefill", flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"allquery_{a.shape}.csv"
    old = [r for r in _read(path) if int(r["prompt_len"]) not in a.lengths] if path.exists() else []
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(old + rows)
    print(f"wrote {path}")


def _read(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


if __name__ == "__main__":
    main()
