"""Capacity at a memory cap: the largest batch that fits, and the decode tokens/s at that batch, per budget.

    python scripts/bench_capacity.py                                   # CPU: 0.5B shape, 2 layers, 2k, a small cap
    python scripts/bench_capacity.py --device cuda --shape 7b --layers 4 --length 16384 --cap-kv-bytes 9.26e9

Model: a Qwen2 text decoder with random weights and the per-layer shapes of Qwen2.5-0.5B (``--shape 7b``: of
Qwen2.5-7B), ``--layers`` layers (``scripts/bench_overhead.py``'s ``BenchAdapter``). Every sample is a prompt of
``--length`` random tokens, compressed whole (``compress_at=prompt``) by ``--method`` at each budget, then the batch
decodes ``--new-tokens`` tokens (no end-of-sequence token) through :func:`avkv.batching.generate_batch`: one
left-padded batched prefill compressed row by row (``--per-sample-prefill``: every sample prefilled on its own, the
path before it), then one batched decode over one preallocated cache. Prefill tokens/s at a batch: ``B · length``
over the calling thread's CPU time of the prefill's forwards (CUDA: the record's ``batch_prefill_s``), medians over
the same rounds as the decode figure.

What the cap bounds, and what is measured:

* ``--cap-kv-bytes``: the bytes of the KV cache **the batch allocates** — the batched ``PreallocLayer`` buffers of
  every layer (kept entries, padding to the longest row, and the ``--new-tokens`` decode slots), as
  ``generate_batch`` measures them (``batch_kv_bytes_allocated``). A batch fits when that is ≤ the cap. This is the
  criterion on every device.
* ``--cap-mem-bytes`` (CUDA only): also require the batch's peak ``torch.cuda.max_memory_allocated`` minus the
  weights (KV cache, activations, the batch's uncompressed layer during the batched prefill — each row's full layer
  lives until that row compresses it —, workspace) ≤ the cap. On
  CPU the peak memory recorded is the process's RSS (read at phase boundaries, or ``ru_maxrss`` where it rose:
  weights, interpreter and allocator slack included, earlier trials' freed memory still mapped): it is reported,
  never used as a criterion, since it cannot isolate one batch's own bytes.

Search, per budget, all by measured runs: a batch of 1 gives the allocated bytes per sample; the predicted largest
batch ``B = cap // bytes_per_sample`` is run (stepping down while it does not fit), then ``B + 1`` is run to show it
does not (stepping up while it does). Decode tokens/s at a batch: ``B · decode steps`` over the calling thread's CPU
time of the decode forwards (one intra-op thread on CPU; on CUDA the engine's CUDA-event wall time), the median
over ``--rounds`` (round 0 is the search; each later round runs every budget's largest batch and its batch of one
again, budgets in alternating order, so the machine's load hits them alike), and the wall-clock figure from the
record (``batch_decode_tokens_per_s``, round 0). Writes ``capacity.csv`` (every trial),
``capacity.json`` (the largest batch per budget), ``table.md`` and ``meta.json`` under ``--out``.
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from avkv.batching import generate_batch  # noqa: E402
from avkv.config import compose, instantiate  # noqa: E402
from avkv.engine import Engine  # noqa: E402
from bench_common import (add_model_options, add_output_options, build_adapter, environment,  # noqa: E402
                          on_cuda, parser)
from bench_overhead import encoded  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "results" / "bench" / "capacity"


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def trial(adapter, a, budget: float, B: int, W: int, rnd: int = 0) -> dict:
    """One measured batch of ``B`` prompts at ``budget``: its allocated KV bytes, peak memory and decode speed."""
    method = instantiate(compose([f"method={a.method}"]).method)
    eng = Engine(adapter, method, budget=budget, compress_at="prompt", max_new_tokens=a.new_tokens)
    encs = [encoded(a.length, seed=i) for i in range(B)]
    cuda = adapter.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    adapter.calls = []
    t = time.perf_counter()
    gens = generate_batch(eng, encs, batched_prefill=not a.per_sample_prefill)
    wall = time.perf_counter() - t
    r = gens[0].record
    steps = int(r["batch_decode_steps"])
    prefill_calls = len(adapter.calls) - steps      # [the prefill's forwards (1 batched, or B), decode steps...]
    dec_cpu = sum(adapter.calls[prefill_calls:])
    pre_cpu = sum(adapter.calls[:prefill_calls])
    dec_s = r["decode_s"] if cuda else dec_cpu      # CUDA: the engine's CUDA-event time; CPU: thread CPU time
    pre_s = r["batch_prefill_s"] if cuda else pre_cpu
    alloc, peak = int(r["batch_kv_bytes_allocated"]), int(r["peak_mem_bytes"])
    fits = alloc <= a.cap_kv_bytes
    if a.cap_mem_bytes is not None:
        fits = fits and peak - W <= a.cap_mem_bytes
    row = {"round": rnd, "budget": budget, "batch": B, "fits": fits, "batch_kv_bytes_allocated": alloc,
           "batch_kv_bytes_prompt": int(r["batch_kv_bytes_prompt"]), "kv_bytes_kept_per_sample": r["kv_bytes_kept"],
           "kv_bytes_full_per_sample": r["kv_bytes_full"], "kept_ratio": r["kept_ratio"],
           "peak_mem_bytes": peak, "peak_mem_kind": r["peak_mem_kind"], "weight_bytes": W, "decode_steps": steps,
           "decode_s": dec_s, "tokens_per_s": B * steps / dec_s if dec_s > 0 else None,
           "tokens_per_s_wall": r["batch_decode_tokens_per_s"], "prefill_s_total": r["batch_prefill_s"],
           "prefill_path": r["prefill_path"], "prefill_s": pre_s,
           "prefill_tokens_per_s": B * a.length / pre_s if pre_s > 0 else None, "trial_wall_s": wall}
    print(f"b={budget:<4} B={B:<4} alloc {alloc / 2**20:9.2f} MiB (cap {a.cap_kv_bytes / 2**20:.2f}) "
          f"{'fits' if fits else 'over'}  peak {peak / 2**20:8.1f} MiB ({r['peak_mem_kind']})  "
          f"{row['tokens_per_s'] or 0:8.1f} tok/s  prefill {row['prefill_tokens_per_s'] or 0:8.1f} tok/s  "
          f"[{wall:.1f} s]", flush=True)
    return row


def largest_batch(adapter, a, budget: float, W: int, rows: list[dict]) -> dict:
    """The largest batch that fits at ``budget`` (its row), found by measured runs (see the module docstring)."""
    def run(B):
        row = trial(adapter, a, budget, B, W)
        rows.append(row)
        return row

    one = run(1)
    if not one["fits"]:
        return {"budget": budget, "max_batch": 0, "fit": None, "over": one}
    per_sample = max(one["batch_kv_bytes_allocated"], 1)
    B = max(1, min(a.max_batch, int(a.cap_kv_bytes // per_sample)))
    fit = one if B == 1 else run(B)
    while not fit["fits"] and B > 1:
        B -= 1
        fit = one if B == 1 else run(B)
    over = None
    while B < a.max_batch:
        nxt = run(B + 1)
        if not nxt["fits"]:
            over = nxt
            break
        B, fit = B + 1, nxt
    return {"budget": budget, "max_batch": B, "fit": fit, "over": over, "batch1": one}


def main() -> None:
    ap = parser(__doc__)
    add_model_options(ap, length=2048)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--budgets", type=float, nargs="+", default=[1.0, 0.5, 0.2, 0.1])
    ap.add_argument("--method", default="snapkv")
    ap.add_argument("--cap-kv-bytes", type=float, default=9.0 * 2**20,
                    help="cap on the KV bytes the batch allocates (default 9 MiB: a batch of 2 at budget 1 on the "
                         "CPU default)")
    ap.add_argument("--cap-mem-bytes", type=float, default=None,
                    help="CUDA only: also cap the batch's peak max_memory_allocated minus the weights")
    ap.add_argument("--max-batch", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=2,
                    help="round 0 is the search; each later round times every budget's largest batch and batch 1 "
                         "once more, budgets in alternating order (tokens/s: the median over rounds)")
    ap.add_argument("--per-sample-prefill", action="store_true",
                    help="prefill every sample on its own (generate_batch(batched_prefill=False)) instead of the one "
                         "left-padded batched prefill: the before/after of the prefill tokens/s")
    add_output_options(ap, OUT)
    a = ap.parse_args()
    cuda = on_cuda(a)
    if a.cap_mem_bytes is not None and not cuda:
        ap.error("--cap-mem-bytes needs CUDA: on CPU the peak memory is the process's RSS, which cannot isolate "
                 "one batch's own bytes (use --cap-kv-bytes)")
    if cuda and not torch.cuda.is_available():
        sys.exit(f"bench_capacity.py: no CUDA device visible to torch {torch.__version__}")
    adapter, dtype = build_adapter(a)
    adapter.model.config.max_position_embeddings = max(a.length + a.new_tokens, 32768)
    W = weight_bytes(adapter.model)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    trial(adapter, argparse.Namespace(**{**vars(a), "length": 256, "new_tokens": 3}), 0.5, 1, W)   # warm-up
    rows: list[dict] = []
    best = []
    def save():
        with open(out / "capacity.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)

    for b in a.budgets:                             # round 0: the search
        best.append(largest_batch(adapter, a, b, W, rows))
        save()
    for rnd in range(1, a.rounds):                  # timing rounds: every budget's largest batch and batch 1 again
        for x in (best if rnd % 2 else best[::-1]):
            for B in sorted({x["max_batch"], 1} - {0}, reverse=bool(rnd % 2)):
                rows.append(trial(adapter, a, x["budget"], B, W, rnd))
                save()
    meta = {"rounds": a.rounds, "device": a.device, "shape": a.shape, "layers": a.layers, "length": a.length, "new_tokens": a.new_tokens,
            "method": a.method, "prefill": "per_sample" if a.per_sample_prefill else "batched", "dtype": dtype, "cap_kv_bytes": a.cap_kv_bytes, "cap_mem_bytes": a.cap_mem_bytes,
            "weight_bytes": W, **environment(cuda)}
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    for x in best:                                  # tokens/s: median over the rounds of the same batch
        for key, B in (("fit", x["max_batch"]), ("batch1", 1)):
            same = [r for r in rows if r["budget"] == x["budget"] and r["batch"] == B]
            tps = [r["tokens_per_s"] for r in same if r["tokens_per_s"] is not None]
            pps = [r["prefill_tokens_per_s"] for r in same if r["prefill_tokens_per_s"] is not None]
            if x.get(key) and tps:
                x[key] = dict(x[key], tokens_per_s=statistics.median(tps), rounds=len(tps),
                              prefill_tokens_per_s=statistics.median(pps) if pps else None)
    summary = [summarise(x, best[0]) for x in best]
    (out / "capacity.json").write_text(json.dumps({"meta": meta, "budgets": summary}, indent=1))
    (out / "table.md").write_text(table(meta, summary))
    print(table(meta, summary))


def summarise(x: dict, base: dict) -> dict:
    fit, over, one = x["fit"], x["over"], x.get("batch1") or {}
    tps = fit["tokens_per_s"] if fit else None
    base_tps = base["fit"]["tokens_per_s"] if base.get("fit") else None
    return {"budget": x["budget"], "max_batch": x["max_batch"],
            "kv_bytes_allocated": fit["batch_kv_bytes_allocated"] if fit else None,
            "next_batch_kv_bytes_allocated": over["batch_kv_bytes_allocated"] if over else None,
            "peak_mem_bytes": fit["peak_mem_bytes"] if fit else None, "kept_ratio": fit["kept_ratio"] if fit else None,
            "tokens_per_s": tps, "tokens_per_s_wall": fit["tokens_per_s_wall"] if fit else None,
            "tokens_per_s_batch1": one.get("tokens_per_s"),
            "prefill_tokens_per_s": fit.get("prefill_tokens_per_s") if fit else None,
            "prefill_tokens_per_s_batch1": one.get("prefill_tokens_per_s"),
            "capacity_ratio": x["max_batch"] / base["max_batch"] if base["max_batch"] else None,
            "tokens_per_s_ratio": tps / base_tps if tps and base_tps else None}


def table(meta: dict, summary: list[dict]) -> str:
    mib = lambda v: "-" if v is None else f"{v / 2**20:.2f}"  # noqa: E731
    num = lambda v, f=".1f": "-" if v is None else format(v, f)  # noqa: E731
    lines = [f"{meta['method']}, Qwen2.5-{meta['shape'].upper()}-shaped random weights, {meta['layers']} layers, "
             f"{meta['length']}-token prompts, {meta['new_tokens']} new tokens, {meta['dtype']} on {meta['device']}; "
             f"cap on the KV bytes the batch allocates: {mib(meta['cap_kv_bytes'])} MiB"
             + (f"; cap on peak memory minus weights: {mib(meta['cap_mem_bytes'])} MiB" if meta["cap_mem_bytes"]
                else "") + ".", "",
             "| budget | largest batch | KV allocated (MiB) | batch+1 allocates (MiB) | peak memory (MiB) | "
             "tokens/s at it | tokens/s (wall) | tokens/s at batch 1 | capacity × | tokens/s × | "
             "prefill tokens/s at it | prefill tokens/s at batch 1 |",
             "|---" * 12 + "|"]
    for s in summary:
        lines.append(f"| {s['budget']} | {s['max_batch']} | {mib(s['kv_bytes_allocated'])} | "
                     f"{mib(s['next_batch_kv_bytes_allocated'])} | {mib(s['peak_mem_bytes'])} | "
                     f"{num(s['tokens_per_s'])} | {num(s['tokens_per_s_wall'])} | {num(s['tokens_per_s_batch1'])} | "
                     f"{num(s['capacity_ratio'], '.2f')} | {num(s['tokens_per_s_ratio'], '.2f')} | "
                     f"{num(s['prefill_tokens_per_s'])} | {num(s['prefill_tokens_per_s_batch1'])} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
