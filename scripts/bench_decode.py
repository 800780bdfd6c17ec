"""Decode time per token against the budget, through the one decode path (``prealloc``) and the path before it
(``dynamic``: transformers' growing DynamicCache, torch.cat of the whole cache each step, with the storage's own
attention), compared with the bandwidth model (weights + b·KV bytes) / (weights + KV bytes).

    python scripts/bench_decode.py                       # MHA variant of the 0.5B shape, 1 layer, 8k prompt
    python scripts/bench_decode.py --kv-heads 2 --length 16384

A decode step reads every weight once and every KV byte the cache holds once, so on a bandwidth-bound
configuration its time is proportional to (weights + KV bytes read). The default configuration makes KV bytes
matter: Qwen2.5-0.5B's layer shape with as many KV heads as query heads (14, no GQA), one layer, a 8192-token
prompt (KV 58.7 MB vs 69 MB of weights, fp32, both above the 32 MB L3 of the machine measured). Each
(method, budget, path) runs once per round, rounds interleaved, the path order alternating; the time is the
calling thread's CPU time per decode forward with one intra-op thread (mean over the run's decode steps, median
over rounds). Methods: SnapKV (every layer and head keeps the same count: dense), PyramidKV (per-layer counts),
AdaKV (per-head counts: ragged, padded to the layer's longest head in the preallocated buffer).
"""
from __future__ import annotations

import argparse
import csv
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from avkv.config import compose, instantiate  # noqa: E402
from avkv.engine import Engine  # noqa: E402
from bench_overhead import SHAPES, BenchAdapter, encoded  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "results" / "bench"


def weight_bytes(model) -> int:
    """Bytes a decode step reads from the weights: every parameter (the tied embedding once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def run(adapter, name: str, n: int, budget: float, new_tokens: int, path: str) -> dict:
    method = instantiate(compose([f"method={name}"]).method)
    eng = Engine(adapter, method, budget=budget, compress_at="prompt", max_new_tokens=new_tokens)
    eng.decode_cache = path
    adapter.calls = []
    g = eng.generate(encoded(n))
    r = g.record
    steps = adapter.calls[1:]                     # [prefill, decode step, ...]
    return {"cpu_decode_ms_per_token": 1000 * statistics.mean(steps), "wall_decode_ms_per_token":
            1000 * r["decode_s_per_token"], "kept_ratio": r["kept_ratio"], "kv_bytes_kept": r["kv_bytes_kept"],
            "kv_bytes_full": r["kv_bytes_full"], "kv_bytes_allocated": r["kv_bytes_allocated"],
            "kv_storage": r["kv_storage"], "decode_cache": r["decode_cache"], "tokens": g.token_ids}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="0.5b")
    ap.add_argument("--kv-heads", type=int, default=14, help="KV heads (the shape's own: 2 for 0.5B)")
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--budgets", type=float, nargs="+", default=[1.0, 0.5, 0.2, 0.1])
    ap.add_argument("--methods", nargs="+", default=["snapkv", "pyramidkv", "adakv"])
    ap.add_argument("--paths", nargs="+", default=["dynamic", "prealloc"])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--out", default=str(OUT / "decode_path"))
    a = ap.parse_args()
    torch.set_num_threads(1)
    SHAPES[a.shape] = dict(SHAPES[a.shape], num_key_value_heads=a.kv_heads)
    adapter = BenchAdapter(a.layers, "cpu", "float32", "sdpa", a.shape)
    adapter.model.config.max_position_embeddings = max(a.length + a.new_tokens, 32768)
    W = weight_bytes(adapter.model)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    run(adapter, a.methods[0], 512, 0.5, 3, a.paths[0])                        # warm-up
    for rnd in range(a.rounds):
        for b in a.budgets:
            for name in a.methods:
                for path in (a.paths if rnd % 2 == 0 else a.paths[::-1]):
                    r = run(adapter, name, a.length, b, a.new_tokens, path)
                    tokens = r.pop("tokens")
                    row = {"round": rnd, "method": name, "budget": b, "path": path, "prompt_len": a.length,
                           "new_tokens": a.new_tokens, "weight_bytes": W, **r, "tokens": " ".join(map(str, tokens))}
                    rows.append(row)
                    print(f"r{rnd} b={b:.1f} {name:<10} {path:<8} {r['cpu_decode_ms_per_token']:8.2f} ms/token cpu "
                          f"(kept {r['kept_ratio']:.3f}, {r['kv_storage']}, alloc/kept "
                          f"{r['kv_bytes_allocated'] / r['kv_bytes_kept']:.3f})", flush=True)
                    with open(out / "decode_path.csv", "w", newline="") as f:
                        w = csv.DictWriter(f, fieldnames=list(rows[0]))
                        w.writeheader()
                        w.writerows(rows)
    meta = {"shape": a.shape, "kv_heads": a.kv_heads, "layers": a.layers, "length": a.length,
            "new_tokens": a.new_tokens, "rounds": a.rounds, "threads": 1, "dtype": "float32",
            "weight_bytes": W, "torch": torch.__version__, "platform": platform.platform(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    (out / "table.md").write_text(table(rows, W, a))
    print(table(rows, W, a))


def table(rows: list[dict], W: int, a) -> str:
    """Median over rounds; ratios to the path's budget-1.0 time; the model's ratio from the bytes kept (b·KV) and
    from the bytes the preallocated buffer spans (kept + the ragged heads' padding)."""
    med = {}
    for key in {(r["method"], r["budget"], r["path"]) for r in rows}:
        rs = [r for r in rows if (r["method"], r["budget"], r["path"]) == key]
        med[key] = {"ms": statistics.median(r["cpu_decode_ms_per_token"] for r in rs), **rs[0]}
    # budget 1.0 compresses nothing: the same full cache for every method, so its baseline pools them all
    base = {path: statistics.median(r["cpu_decode_ms_per_token"] for r in rows
                                    if r["budget"] == 1.0 and r["path"] == path) for path in a.paths}
    lines = [f"Budget-1.0 baseline (every method's full-cache runs pooled, median): before {base['dynamic']:.2f} ms, "
             f"after {base['prealloc']:.2f} ms per token.", "",
             "| method | budget | before ms/token | after ms/token | before ratio | after ratio | model (kept bytes) | "
             "model (allocated bytes) | after / model | after / model (allocated) | tokens equal |", "|---" * 11 + "|"]
    for name in a.methods:
        for b in a.budgets:
            d, p = med.get((name, b, "dynamic")), med.get((name, b, "prealloc"))
            if not (d and p):
                continue
            d1, p1 = {"ms": base["dynamic"]}, {"ms": base["prealloc"]}
            full = p["kv_bytes_full"]
            model = (W + p["kv_bytes_kept"]) / (W + full)
            model_alloc = (W + p["kv_bytes_allocated"]) / (W + full)
            same = all(x["tokens"] == y["tokens"] for x in rows for y in rows
                       if (x["method"], x["budget"]) == (y["method"], y["budget"]) == (name, b))
            rp = p["ms"] / p1["ms"]
            lines.append(f"| {name} | {b:.1f} | {d['ms']:.2f} | {p['ms']:.2f} | {d['ms'] / d1['ms']:.3f} | "
                         f"{rp:.3f} | {model:.3f} | {model_alloc:.3f} | {rp / model:.3f} | {rp / model_alloc:.3f} | "
                         f"{'yes' if same else 'NO'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
