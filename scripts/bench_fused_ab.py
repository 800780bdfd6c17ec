"""The compiled fused all-query kernel against another version of it, interleaved in one process, both relative to
SDPA's own CPU kernel on the same q/k/v (thread CPU time, one thread).

    python scripts/bench_fused_ab.py --before-src /path/to/old/avkv/methods/fused_kernel.py --S 16384 --rounds 5
    python scripts/bench_fused_ab.py --shape 7b --S 4096 --rows 3 --variant nosimd:AVKV_FUSED_SIMD=0

Every round times SDPA's kernel (``_scaled_dot_product_flash_attention_for_cpu``), then each version's
``fused_attention`` (chunk 32, tile 1024: what ``allquery.attention_with_sums`` hands the kernel at these lengths).
Printed per version: the median time and the median of the per-round differences to SDPA's kernel (the
"attention − SDPA" of ``results/bench/README.md``), and the outputs' differences from SDPA's. ``--rows 3``: three
row vectors (positions, a text indicator, half of it) instead of the plain sums. ``--variant name:ENV=VAL,...``:
this checkout's kernel again under those environment variables. The old version's library is built into
``$AVKV_KERNEL_DIR`` (default ``.cache/kernels``).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("AVKV_KERNEL_DIR", str(ROOT / ".cache" / "kernels"))

import torch  # noqa: E402

from avkv.lse_attention import _kernel  # noqa: E402
from avkv.methods import fused_kernel  # noqa: E402
from scripts.bench_overhead import SHAPES  # noqa: E402


def _env(env: dict):
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    return old


def _restore(old: dict):
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="0.5b")
    ap.add_argument("--S", type=int, default=16384)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--rows", type=int, choices=[1, 3], default=1)
    ap.add_argument("--before-src", default=None, help="an older avkv/methods/fused_kernel.py")
    ap.add_argument("--variant", action="append", default=[], help="name:ENV=VAL,... (this kernel, other env)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    sh = SHAPES[a.shape]
    H, kvH = sh["num_attention_heads"], sh["num_key_value_heads"]
    D, S = sh["hidden_size"] // H, a.S
    g = torch.Generator().manual_seed(S)
    q, k, v = torch.randn(H, S, D, generator=g), torch.randn(kvH, S, D, generator=g), torch.randn(kvH, S, D, generator=g)
    scale = D ** -0.5
    rows = torch.ones(1, S)
    if a.rows == 3:
        pos = torch.arange(S, dtype=torch.float32) + 1
        text = torch.ones(S)
        text[S // 10: 9 * S // 10] = 0
        rows = torch.stack([pos, pos * text, 0.5 * pos * text])
    versions = {}
    if a.before_src:
        spec = importlib.util.spec_from_file_location("fused_kernel_before", a.before_src)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        versions["before"] = (mod, mod.load(), {})
    versions["this"] = (fused_kernel, fused_kernel.load(), {})
    for spec in a.variant:
        name, _, envs = spec.partition(":")
        versions[name] = (fused_kernel, versions["this"][1], dict(e.split("=", 1) for e in envs.split(",") if e))
    ref = _kernel(q[None], k[None], v[None], scale)[0][0].transpose(0, 1)

    def call(name):
        mod, so, env = versions[name]
        old = _env(env)
        try:
            return mod.fused_attention(so, q, k, v, scale, rows, 32, 1024)
        finally:
            _restore(old)

    for name in versions:
        print(f"{name}: output vs SDPA's kernel, max abs diff {float((call(name)[0] - ref).abs().max()):.3g}")
    times = {n: [] for n in ["sdpa_kernel", *versions]}
    for r in range(a.rounds):
        t = time.thread_time()
        _kernel(q[None], k[None], v[None], scale)
        times["sdpa_kernel"].append(time.thread_time() - t)
        for name in versions:
            t = time.thread_time()
            call(name)
            times[name].append(time.thread_time() - t)
        print(f"round {r}: " + ", ".join(f"{n} {times[n][-1]:.3f}s" for n in times),
              f"(load {os.getloadavg()[0]:.1f})", flush=True)
    sd = statistics.median(times["sdpa_kernel"])
    print(f"{a.shape} S={S} rows={a.rows}: sdpa_kernel median {sd:.3f} s")
    for n in versions:
        ex = statistics.median([x - y for x, y in zip(times[n], times["sdpa_kernel"])])
        print(f"  {n:>8}: median {statistics.median(times[n]):.3f} s, minus SDPA's kernel {ex:+.3f} s "
              f"(median of the rounds' differences)")


if __name__ == "__main__":
    main()
