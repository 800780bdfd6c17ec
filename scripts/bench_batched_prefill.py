"""Prefill tokens/s: one left-padded batched prefill of B prompts vs the B per-sample prefills it replaces.

    python scripts/bench_batched_prefill.py                      # CPU: 0.5B shape, 2 layers, B = 4, ~1k tokens
    python scripts/bench_batched_prefill.py --device cuda --shape 7b --layers 4 --length 8192 --batch 8

Model: ``scripts/bench_overhead.py``'s ``BenchAdapter`` (Qwen2 text decoder, random weights, Qwen2.5-0.5B or -7B
per-layer shapes). A batch is B prompts of random tokens whose lengths spread over ``[(1 − spread)·length,
length]`` (so the batched path pays for its padding), compressed whole (``compress_at=prompt``) by ``--method`` at
``--budget``; ``generate_batch(max_new_tokens=1)``: the prefill only. Each round runs both variants (order
alternating between rounds) and batch 1 (the first prompt alone). Time: the calling thread's CPU time of the
forwards (one intra-op thread on CPU; CUDA: the record's ``batch_prefill_s``). Reported: real prompt tokens per
second per variant (median over rounds) and the per-round ratio batched / per-sample (median, min, max). Writes
``prefill.json`` and ``table.md`` under ``--out``.
"""
from __future__ import annotations

import json
import statistics
import sys
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

OUT = Path(__file__).resolve().parent.parent / "results" / "bench" / "batched_prefill"


def prefill(adapter, a, encs, batched: bool) -> tuple[float, str]:
    """Seconds of the prefill of ``encs`` (thread CPU time of its forwards on CPU) and the path that ran."""
    method = instantiate(compose([f"method={a.method}", *a.override]).method)
    eng = Engine(adapter, method, budget=a.budget, compress_at="prompt", max_new_tokens=1)
    adapter.calls = []
    gens = generate_batch(eng, encs, batched_prefill=batched)
    r = gens[0].record
    s = r["batch_prefill_s"] if adapter.device.type == "cuda" else sum(adapter.calls)
    return s, r["prefill_path"]


def main() -> None:
    ap = parser(__doc__)
    add_model_options(ap, length=1024)
    ap.add_argument("--spread", type=float, default=0.25, help="prompt lengths spread over [(1-spread)·length, length]")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--method", default="snapkv")
    ap.add_argument("--override", action="append", default=[],
                    help="a config override of the method, repeatable (method.decode_policy=grow: H2O and D2O's "
                         "default, fixed, is refused at batch size > 1)")
    ap.add_argument("--budget", type=float, default=0.2)
    ap.add_argument("--rounds", type=int, default=5)
    add_output_options(ap, OUT)
    a = ap.parse_args()
    cuda = on_cuda(a)
    adapter, dtype = build_adapter(a)
    B = a.batch
    lengths = [a.length - round(a.spread * a.length * i / max(B - 1, 1)) for i in range(B)]
    encs = [encoded(n, seed=i) for i, n in enumerate(lengths)]
    tokens = sum(lengths)
    prefill(adapter, a, [encoded(128, seed=99)] * 2, True)                    # warm-up
    runs: dict[str, list[float]] = {"batched": [], "per_sample": [], "batch1": []}
    paths = set()
    for rnd in range(a.rounds):
        order = ("batched", "per_sample") if rnd % 2 == 0 else ("per_sample", "batched")
        for v in order:
            s, path = prefill(adapter, a, encs, v == "batched")
            runs[v].append(s)
            paths.add((v, path))
        s, _ = prefill(adapter, a, encs[:1], True)
        runs["batch1"].append(s)
        print(f"round {rnd}: batched {runs['batched'][-1]:.3f} s, per-sample {runs['per_sample'][-1]:.3f} s, "
              f"batch 1 {s:.3f} s", flush=True)
    ratios = [p / b for b, p in zip(runs["batched"], runs["per_sample"])]     # > 1: batched is faster
    res = {"meta": {"device": a.device, "shape": a.shape, "layers": a.layers, "lengths": lengths, "method": a.method,
                    "overrides": a.override, "budget": a.budget, "rounds": a.rounds, "dtype": dtype,
                    **environment(cuda),
                    "paths": sorted(paths)},
           "tokens_per_s": {"batched": tokens / statistics.median(runs["batched"]),
                            "per_sample": tokens / statistics.median(runs["per_sample"]),
                            "batch1": lengths[0] / statistics.median(runs["batch1"])},
           "speedup_batched_over_per_sample": {"median": statistics.median(ratios), "min": min(ratios),
                                               "max": max(ratios)},
           "seconds": runs}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "prefill.json").write_text(json.dumps(res, indent=1))
    t, sp = res["tokens_per_s"], res["speedup_batched_over_per_sample"]
    table = (f"{a.method} at budget {a.budget}, Qwen2.5-{a.shape.upper()}-shaped random weights, {a.layers} layers, "
             f"B = {B} prompts of {lengths} tokens, {dtype} on {a.device}, {a.rounds} interleaved rounds "
             f"({'CUDA-event' if cuda else 'thread CPU'} time).\n\n"
             "| prefill | real prompt tokens/s (median) |\n|---|---|\n"
             f"| batch 1 (first prompt alone) | {t['batch1']:.1f} |\n"
             f"| B per-sample prefills | {t['per_sample']:.1f} |\n"
             f"| one batched prefill of B | {t['batched']:.1f} |\n\n"
             f"batched / per-sample speed, per round: median {sp['median']:.3f} (min {sp['min']:.3f}, "
             f"max {sp['max']:.3f}).\n")
    (out / "table.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
