"""Per-layer cost of the all-query statistics routes, as a fraction of that layer's prefill (interleaved repetitions).

    python scripts/bench_allquery.py --shape 0.5b --lengths 4096 16384
    python scripts/bench_allquery.py --shape 7b --lengths 4096 --before-src /path/to/old/avkv/methods/base.py

For one decoder layer of a Qwen2.5 shape (random weights, SDPA, one intra-op thread on CPU) and a prompt length it
times, in interleaved rounds (every route once per round, so machine load hits them alike), the thread CPU time of:

* ``prefill``: the layer's prefill (a one-layer model's forward under SDPA, the reference of every ratio);
* ``prefill_fused``: the same forward with the layer's attention on the ``fused`` route
  (:func:`avkv.methods.allquery.attention_with_sums` through ``avkv_stats``, plain column sums): its excess over
  ``prefill`` is the fused route's whole cost; ``prefill_fused_torch`` / ``fused_torch/...``: the same without the
  compiled kernel (``AVKV_FUSED_KERNEL=0`` / ``kernel=False``: the torch ops, the "before" of that kernel);
* ``sdpa_kernel`` / ``fused/acc`` / ``fused/sums``: the attention alone, SDPA's kernel (with log-sum-exps) against
  the fused attention with plain column sums and with AccKV's row weights; ``fused − sdpa_kernel`` is the fused
  route's cost at kernel level (also written, as ``fused_excess/...``, the median of the per-round differences);
* ``lse`` (the route used when the prefill captured the log-sum-exps) at several row chunks, for
  ``accumulated_scores`` (H2O, LOOK-M, D2O, KVMerger) and ``attention_sums`` with AccKV's weights and blocks;
* ``softmax``: the exact chunked softmax over the queries (the route without captured statistics);
* ``lse_first``: recomputing the log-sum-exps with the fused kernel, then the ``lse`` pass (the alternative to
  ``softmax`` when nothing was captured);
* with ``--before-src`` (an older ``avkv/methods/base.py``): that version's ``accumulated_scores`` (its default
  route) and ``attention_sums``, for before/after tables;
* with ``--before-kernel-src`` (an older ``avkv/methods/fused_kernel.py``): ``fused_before/acc`` and
  ``fused_before/sums``, that version's compiled kernel on the same chunks, tiles and rows as ``fused/...``, in the
  same rounds (its excess over ``sdpa_kernel`` is written as ``fused_excess/fused_before/...``).

Writes ``results/bench/allquery_<shape>.csv`` (one row per route and length: median seconds, ratio to the prefill;
``max_abs_diff``: for the fused rows, the largest difference of its attention output from SDPA's kernel's;
``layer_max_abs_diff``: for ``prefill_fused``, that of the decoder layer's output from the SDPA forward's).
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

from avkv import lse_attention  # noqa: E402
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
    ap.add_argument("--chunks", type=int, nargs="+", default=[128])
    ap.add_argument("--before-src", default=None, help="an older avkv/methods/base.py to time as 'before'")
    ap.add_argument("--before-kernel-src", default=None, help="an older avkv/methods/fused_kernel.py to time as "
                    "'fused_before'")
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
    before_kernel = None
    if a.before_kernel_src:
        spec = importlib.util.spec_from_file_location("avkv_before_fused_kernel", a.before_kernel_src)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        before_kernel = (mod, mod.load())
    sh = SHAPES[a.shape]
    H, kvH = sh["num_attention_heads"], sh["num_key_value_heads"]
    D = sh["hidden_size"] // H
    adapter = BenchAdapter(1, "cpu", "float32", "sdpa", a.shape)
    lse_attention.register()
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

        def prefill(impl="sdpa"):
            from transformers import DynamicCache
            adapter.model.config._attn_implementation = impl
            for m in adapter.decoder_layers():
                setattr(m.self_attn, lse_attention._SINK, {"modality": None, "methods": [], "rows": {}})
            adapter.model(input_ids=ids, past_key_values=DynamicCache(config=adapter.model.config), use_cache=True,
                          logits_to_keep=1)
            adapter.model.config._attn_implementation = "sdpa"

        def torch_ops(f):                                      # the fused route without the compiled kernel
            def run():
                os.environ["AVKV_FUSED_KERNEL"] = "0"
                try:
                    return f()
                finally:
                    os.environ.pop("AVKV_FUSED_KERNEL")
            return run

        fused_rows = allquery.row_matrix(S, "cpu", rw, blocks)
        print(f"fused route implementation: {allquery.fused_impl('cpu')}", flush=True)
        routes = {"prefill": prefill, "prefill_fused": lambda: prefill(lse_attention.STATS_IMPL),
                  "prefill_fused_torch": torch_ops(lambda: prefill(lse_attention.STATS_IMPL)),
                  "sdpa_kernel": lambda: _kernel(q[None], k[None], v[None], scale),
                  "fused/acc": lambda: allquery.attention_with_sums(q, k, v, scale),
                  "fused/sums": lambda: allquery.attention_with_sums(q, k, v, scale, fused_rows),
                  "fused_torch/acc": lambda: allquery.attention_with_sums(q, k, v, scale, kernel=False),
                  "fused_torch/sums": lambda: allquery.attention_with_sums(q, k, v, scale, fused_rows, kernel=False),
                  "softmax/acc": lambda: accumulated_scores(view, 512),
                  "lse_first/acc": lambda: accumulated_scores(replace(view, stats=allquery.PrefillStats(
                      q, _kernel(q[None], k[None], v[None], scale)[1][0].float())), 512)}
        for c in a.chunks:
            routes[f"lse/acc/c{c}"] = lambda c=c: accumulated_scores(sview, c)
            routes[f"lse/sums/c{c}"] = lambda c=c: attention_sums(sview, c, rw, cw, blocks)
        routes["softmax/sums"] = lambda: attention_sums(view, 512, rw, cw, blocks)
        if before_kernel is not None:                          # what _with_sums_kernel hands the kernel
            bk, bso = before_kernel
            c = max(1, min(allquery.FUSED_CHUNK, (1 << 26) // max(1, (H // kvH) * S)))
            routes["fused_before/acc"] = lambda: bk.fused_attention(bso, q, k, v, scale, torch.ones(1, S), c,
                                                                    allquery.KERNEL_TILE)
            routes["fused_before/sums"] = lambda: bk.fused_attention(bso, q, k, v, scale, fused_rows, c,
                                                                     allquery.KERNEL_TILE)
        if before is not None:
            routes["before/acc"] = lambda: before.accumulated_scores(view, 512)
            routes["before/sums"] = lambda: before.attention_sums(view, 512, rw, cw, blocks)
        routes = {n: f for n, f in routes.items() if n not in a.skip}
        ref_out = _kernel(q[None], k[None], v[None], scale)[0][0].transpose(0, 1)
        diff = float((allquery.attention_with_sums(q, k, v, scale)[0] - ref_out).abs().max())
        diff_t = float((allquery.attention_with_sums(q, k, v, scale, kernel=False)[0] - ref_out).abs().max())
        print(f"S={S}: fused output vs SDPA's kernel, max abs diff {diff:.3g} (torch ops {diff_t:.3g}; "
              f"max |out| {float(ref_out.abs().max()):.3g})")
        times = {n: [] for n in routes}
        with torch.no_grad():
            for n, f in routes.items():                        # warm-up (first-call costs)
                if n == "prefill" or S <= 4096:
                    f()
            layer_diff = ""
            if "prefill_fused" in routes:                      # the fused route did run inside the forward
                outs = []
                hook = adapter.decoder_layers()[0].register_forward_hook(
                    lambda mod, args, out: outs.append((out[0] if isinstance(out, tuple) else out).clone()))
                routes["prefill"]()
                routes["prefill_fused"]()
                hook.remove()
                st = getattr(adapter.decoder_layers()[0].self_attn, lse_attention._SINK).get("stats")
                assert st is not None and st.sums is not None, "prefill_fused did not take the fused route"
                layer_diff = float((outs[0] - outs[1]).abs().max())
                print(f"S={S}: decoder layer output, fused route vs SDPA: max abs diff {layer_diff:.3g} "
                      f"(max |out| {float(outs[0].abs().max()):.3g})", flush=True)
            for r in range(a.rounds):
                for n, f in routes.items():
                    t = time.thread_time()
                    f()
                    times[n].append(time.thread_time() - t)
                print(f"S={S} round {r}: " + ", ".join(f"{n} {times[n][-1]:.2f}s" for n in routes),
                      f"(load {os.getloadavg()[0]:.1f})", flush=True)
        ref = statistics.median(times["prefill"])
        for base, n in [("sdpa_kernel", "fused/acc"), ("sdpa_kernel", "fused/sums"), ("prefill", "prefill_fused"),
                        ("sdpa_kernel", "fused_before/acc"), ("sdpa_kernel", "fused_before/sums"),
                        ("sdpa_kernel", "fused_torch/acc"), ("sdpa_kernel", "fused_torch/sums"),
                        ("prefill", "prefill_fused_torch")]:
            if base in times and n in times:                   # the fused route's cost: per-round differences
                times[f"fused_excess/{n}"] = [x - y for x, y in zip(times[n], times[base])]
        for n in times:
            med = statistics.median(times[n])
            rows.append({"shape": a.shape, "prompt_len": S, "route": n, "rounds": a.rounds, "median_s": med,
                         "ratio_to_prefill": med / ref, "min_s": min(times[n]), "max_s": max(times[n]),
                         "max_abs_diff": (diff_t if "torch" in n else diff) if "fused" in n and "before" not in n else "",
                         "fused_impl": "torch" if "torch" in n else "c (before)" if "before" in n else allquery.fused_impl("cpu"),
                         "layer_max_abs_diff": layer_diff if n == "prefill_fused" else ""})
            print(f"  {n:<28} {med:8.3f} s  {100 * med / ref:7.2f}% of the layer's prefill", flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"allquery_{a.shape}.csv"
    old = [r for r in _read(path) if int(r["prompt_len"]) not in a.lengths] if path.exists() else []
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), restval="")
        w.writeheader()
        w.writerows(old + rows)
    print(f"wrote {path}")


def _read(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


if __name__ == "__main__":
    main()
