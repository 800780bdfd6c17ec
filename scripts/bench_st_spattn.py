#!/usr/bin/env python
"""PureKV's ST-SpAttn against dense prefill on the same input: attention alone and a whole-model prefill.

    python scripts/bench_st_spattn.py                       # CPU, writes results/bench/st_spattn_cpu.csv
    python scripts/bench_st_spattn.py --device cuda --dtype bfloat16

* ``attention`` rows: one layer's prefill attention, dense causal SDPA vs :func:`st_sparse_attention`, for a video
  of T frames × N tokens between a text prefix and a question (Qwen2.5-VL layout: N = tokens per temporal patch).
* ``model`` rows: the prefill forward of a random-weight Qwen2 decoder (default: 8 layers, hidden 1024,
  16 heads / 4 KV heads, 64-dim heads) on the same ids, with ST-SpAttn's begin/end inside the timed call, with stock SDPA and with ST-SpAttn switched on through
  :class:`avkv.methods.purekv.PureKV` (layers 0-1 dense, as the method's default).

Dense and sparse runs alternate (``--reps`` pairs after a warm-up, CUDA-synchronised on GPU); the CSV keeps the
minimum of each (the figure least affected by other load on a shared machine) and the medians. The sparse path does
O(T·N·(M+N) + T²·N) work instead of O((T·N+M)²) but is written in plain PyTorch (einsum + softmax), while the dense
path is a fused SDPA kernel; the table reports what is measured, speed-up or not.
"""
from __future__ import annotations

import argparse
import csv
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from avkv.attention import AttentionBackend  # noqa: E402
from avkv.methods.base import TEXT, VIDEO  # noqa: E402
from avkv.methods.purekv import PureKV, st_sparse_attention  # noqa: E402
from avkv.methods.request import Request  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def layout(frames: int, per_frame: int, pre: int, post: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = pre + frames * per_frame + post
    frame = torch.full((n,), -1, dtype=torch.long)
    spatial = torch.full((n,), -1, dtype=torch.long)
    v = torch.arange(frames * per_frame)
    frame[pre:pre + v.numel()] = v // per_frame
    spatial[pre:pre + v.numel()] = v % per_frame
    return frame, spatial


def _once(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def ab(dense, sparse, reps: int, device: torch.device) -> tuple[float, float, float, float]:
    """Interleaved A/B timing after one warm-up each: (dense min, sparse min, dense median, sparse median).

    Interleaving and the minimum keep the comparison fair on a shared machine (both see the same contention)."""
    dense(), sparse()
    td, ts = [], []
    for _ in range(reps):
        td.append(_once(dense, device))
        ts.append(_once(sparse, device))
    return min(td), min(ts), statistics.median(td), statistics.median(ts)


@torch.no_grad()
def bench_attention(frames, per_frame, pre, post, H, kvH, D, dtype, device, reps):
    frame, spatial = layout(frames, per_frame, pre, post)
    n = frame.numel()
    g = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(H, n, D, generator=g).to(device, dtype)
    k = torch.randn(kvH, n, D, generator=g).to(device, dtype)
    v = torch.randn(kvH, n, D, generator=g).to(device, dtype)
    fr, sp = frame.to(device), spatial.to(device)
    G = H // kvH
    dense = lambda: F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True,  # noqa: E731
                                                   enable_gqa=G > 1)
    sparse = lambda: st_sparse_attention(q, k, v, fr, sp, D ** -0.5)  # noqa: E731
    return (n, *ab(dense, sparse, reps, device))


@torch.no_grad()
def bench_model(frames, per_frame, pre, post, layers, hidden, H, kvH, dtype, device, reps):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    frame, spatial = layout(frames, per_frame, pre, post)
    n = frame.numel()
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=1024, hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
                      num_attention_heads=H, num_key_value_heads=kvH, max_position_embeddings=max(4096, 2 * n),
                      attn_implementation="sdpa")
    model = Qwen2ForCausalLM(cfg).to(device, dtype).eval()
    ids = torch.randint(0, 1024, (1, n), generator=torch.Generator().manual_seed(1)).to(device)
    run = lambda: model(ids, logits_to_keep=1, use_cache=False)  # noqa: E731
    m = PureKV()                                          # ST-SpAttn on, layers 0-1 dense (the defaults)
    req = Request(n_prompt=n, split=n, n_keep=n, num_layers=layers, num_heads=H, num_kv_heads=kvH,
                  modality=torch.where(frame >= 0, VIDEO, TEXT), layout={"video_frame": frame, "video_spatial": spatial})
    used: set = set()

    def sparse():                                         # the engine's installation of PureKV's prefill plan
        plan = m.begin(req)
        try:
            with AttentionBackend(model.config) as backend, backend.pattern(plan.attention):
                run()
            used.update(m._ctx.used_layers)
        finally:
            m.end()
    return (n, *ab(run, sparse, reps, device), sorted(used))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--per-frame", type=int, default=256, help="video tokens per temporal patch (N)")
    ap.add_argument("--frames", type=int, nargs="*", default=[4, 8, 16], help="temporal patches T")
    ap.add_argument("--no-model", action="store_true", help="attention rows only")
    ap.add_argument("--layers", type=int, default=8, help="decoder layers of the model rows")
    ap.add_argument("--hidden", type=int, default=1024, help="hidden size of the model rows")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--out", help="CSV path (default results/bench/st_spattn_<device>.csv)")
    a = ap.parse_args(argv)
    device, dtype = torch.device(a.device), getattr(torch, a.dtype)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    if a.threads:
        torch.set_num_threads(a.threads)
    rows = []
    pre, post = 20, 40
    for T in a.frames:
        n, d, s, dm, sm = bench_attention(T, a.per_frame, pre, post, 16, 4, 64, dtype, device, a.reps)
        rows.append(dict(kind="attention", frames=T, per_frame=a.per_frame, n=n, layers=1, dense_s=d, st_s=s,
                         speedup=d / s, dense_median_s=dm, st_median_s=sm, st_layers="0"))
        print(f"attention T={T:3d} n={n:6d}: dense {d * 1e3:9.2f} ms  st {s * 1e3:9.2f} ms  x{d / s:.2f}  "
              f"(medians {dm * 1e3:.1f} / {sm * 1e3:.1f} ms)", flush=True)
    if not a.no_model:
        for T in a.frames:
            n, d, s, dm, sm, used = bench_model(T, a.per_frame, pre, post, a.layers, a.hidden, 16, 4, dtype, device,
                                                a.reps)
            rows.append(dict(kind="model", frames=T, per_frame=a.per_frame, n=n, layers=a.layers, dense_s=d,
                             st_s=s, speedup=d / s, dense_median_s=dm, st_median_s=sm,
                             st_layers=" ".join(map(str, used))))
            print(f"model     T={T:3d} n={n:6d}: dense {d * 1e3:9.2f} ms  st {s * 1e3:9.2f} ms  x{d / s:.2f}  "
                  f"(medians {dm * 1e3:.1f} / {sm * 1e3:.1f} ms; sparse layers {used})", flush=True)
    out = Path(a.out) if a.out else ROOT / "results" / "bench" / f"st_spattn_{device.type}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["device", "dtype", "torch", "threads", "kind", "frames", "per_frame", "n",
                                          "layers", "st_layers", "dense_s", "st_s", "speedup", "dense_median_s",
                                          "st_median_s"])
        w.writeheader()
        for r in rows:
            w.writerow(dict(device=name, dtype=a.dtype, torch=torch.__version__, threads=torch.get_num_threads(), **r))
    print(f"→ {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
