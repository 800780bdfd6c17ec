"""avkv vs NVIDIA's kvpress 0.5.5, speed: the same random-weight Qwen2 checkpoint, the same token ids, SnapKV at
the same settings (window 64, kernel 5, average pooling; keep 20 %: kvpress ``compression_ratio=0.8``, avkv
``budget=0.2`` with ``compress_at=prompt``), the whole context compressed during its prefill.

    python scripts/parity/kvpress_speed.py                  # driver (main venv): writes results/bench/kvpress_speed/
    python scripts/parity/kvpress_speed.py --rounds 3 --reps 2 --n-ctx 4096 --layers 8

The driver writes the checkpoint once (``--hidden 1024 --layers 8``, random weights, safetensors), then runs
``--rounds`` rounds, each one process per side in alternating order (kvpress in ``.cache/venv-kvpress``, which
imports nothing from avkv; avkv in this venv), each process doing one warm-up at 512 tokens and ``--reps`` timed
prefills. Per prefill it records the calling thread's CPU time (one intra-op thread) and the wall time of

* ``prefill``: the context forward with the compression hooks (kvpress: ``model.model(...)`` inside
  ``with press(model)``, as its pipeline does; avkv: the engine's prefill forward);
* ``compress``: the time inside the compression hooks (kvpress: ``press.forward_hook``, i.e. scoring, top-k,
  gather and the cache write; avkv: the engine's attention hooks, the same work).

The table gives the medians and the ratios avkv / kvpress (below 1: avkv is faster).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
KVPRESS_PY = ROOT / ".cache" / "venv-kvpress" / "bin" / "python"
OUT = ROOT / "results" / "bench" / "kvpress_speed"


def token_ids(n: int, vocab: int):
    import torch
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(0))


def timed(acc: dict, fn):
    def wrapper(*a, **k):
        t, w = time.thread_time(), time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            acc["cpu"] += time.thread_time() - t
            acc["wall"] += time.perf_counter() - w
    return wrapper


# ------------------------------------------------------------------------------------------------ kvpress side
def run_kvpress(path: str, n: int, reps: int, window: int, kernel: int, keep: float) -> list[dict]:
    import torch
    from kvpress import SnapKVPress
    from transformers import AutoModelForCausalLM, DynamicCache
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()
    out = []
    for i, length in enumerate([512] + [n] * reps):
        press = SnapKVPress(compression_ratio=1 - keep, window_size=window, kernel_size=kernel)
        acc = {"cpu": 0.0, "wall": 0.0}
        press.forward_hook = timed(acc, press.forward_hook)       # registered by press(model) on entry
        ids = token_ids(length, model.config.vocab_size)
        with torch.no_grad(), press(model):
            cache = DynamicCache(config=model.config)
            t, w = time.thread_time(), time.perf_counter()
            model.model(input_ids=ids, past_key_values=cache, use_cache=True)
            cpu, wall = time.thread_time() - t, time.perf_counter() - w
        kept = int(cache.layers[0].keys.shape[2])
        if i:
            out.append({"prefill_cpu_s": cpu, "prefill_wall_s": wall, "compress_cpu_s": acc["cpu"],
                        "compress_wall_s": acc["wall"], "kept": kept, "n": length})
    return out


# ------------------------------------------------------------------------------------------------ avkv side
def run_avkv(path: str, n: int, reps: int, window: int, kernel: int, keep: float) -> list[dict]:
    import torch
    from transformers import Qwen2ForCausalLM
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "scripts"))
    from avkv import engine as engine_mod
    from avkv.config import compose, instantiate
    from avkv.methods.base import TEXT
    from avkv.models.base import Encoded
    from bench_overhead import BenchAdapter
    torch.set_num_threads(1)

    class Loaded(BenchAdapter):
        def __init__(self, p: str):                  # the driver's checkpoint instead of BenchAdapter's own model
            self.device, self.dtype, self.attn_implementation = torch.device("cpu"), torch.float32, "sdpa"
            self.model = Qwen2ForCausalLM.from_pretrained(p, dtype=torch.float32, attn_implementation="sdpa").eval()
            self.path, self.calls = Path(p), []

    adapter = Loaded(path)
    acc = {"cpu": 0.0, "wall": 0.0}
    try:                                             # the engine's compression hooks (module split in issue 17)
        from avkv.compressor import Compressor
    except ImportError:
        Compressor = engine_mod.Compressor
    Compressor._hook = timed(acc, Compressor._hook)
    cfg = compose(["method=snapkv", f"method.window={window}", f"method.kernel={kernel}", "method.pooling=avg",
                   "method.gqa=mean"]).method
    out = []
    for i, length in enumerate([512] + [n] * reps):
        ids = token_ids(length, adapter.model.config.vocab_size)
        enc = Encoded(inputs={"input_ids": ids}, input_ids=ids, modality=torch.full((length,), TEXT),
                      question_start=length, assistant_start=length)
        eng = engine_mod.Engine(adapter, instantiate(cfg), budget=keep, compress_at="prompt", max_new_tokens=1)
        acc.update(cpu=0.0, wall=0.0)
        adapter.calls = []
        w = time.perf_counter()
        g = eng.generate(enc)
        if i:
            out.append({"prefill_cpu_s": adapter.calls[0], "prefill_wall_s": g.record["prefill_s"],
                        "compress_cpu_s": acc["cpu"], "compress_wall_s": acc["wall"],
                        "kept": int(round(g.record["kept_ratio"] * length)), "n": length,
                        "generate_wall_s": time.perf_counter() - w})
    return out


# ------------------------------------------------------------------------------------------------ driver
def write_checkpoint(path: Path, hidden: int, layers: int, heads: int, kv_heads: int, mlp: int, vocab: int) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM
    if (path / "config.json").exists():
        return
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=32768,
                      rope_parameters={"rope_type": "default", "rope_theta": 1e6}, tie_word_embeddings=True)
    Qwen2ForCausalLM(cfg).eval().save_pretrained(path)


def drive(a) -> int:
    if not KVPRESS_PY.exists():
        print(f"no kvpress side venv at {KVPRESS_PY} (make parity-venv)", file=sys.stderr)
        return 2
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = ROOT / ".cache" / "bench" / f"qwen2_h{a.hidden}_l{a.layers}_q{a.heads}_kv{a.kv_heads}_m{a.mlp}_v{a.vocab}"
    write_checkpoint(ckpt, a.hidden, a.layers, a.heads, a.kv_heads, a.mlp, a.vocab)
    common = ["--path", str(ckpt), "--n-ctx", str(a.n_ctx), "--reps", str(a.reps), "--window", str(a.window),
              "--kernel", str(a.kernel), "--keep", str(a.keep)]
    sides = {"kvpress": [str(KVPRESS_PY), __file__, "--side", "kvpress", *common],
             "avkv": [sys.executable, __file__, "--side", "avkv", *common]}
    runs: dict[str, list[dict]] = {"kvpress": [], "avkv": []}
    commands = []
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for r in range(a.rounds):
        for side in (("kvpress", "avkv") if r % 2 == 0 else ("avkv", "kvpress")):
            commands.append(" ".join(sides[side]).replace(f"{ROOT}/", ""))
            p = subprocess.run(sides[side], capture_output=True, text=True, cwd=ROOT, env=env)
            if p.returncode != 0:
                print(p.stderr[-3000:], file=sys.stderr)
                return p.returncode
            res = json.loads(p.stdout.strip().splitlines()[-1])
            for x in res:
                x["round"] = r
            runs[side] += res
            print(f"round {r} {side:<8} " + "  ".join(f"prefill {x['prefill_cpu_s']:.2f}s cpu / "
                  f"compress {x['compress_cpu_s']:.4f}s cpu (kept {x['kept']})" for x in res), flush=True)
    med = {s: {k: statistics.median(x[k] for x in v) for k in
               ("prefill_cpu_s", "prefill_wall_s", "compress_cpu_s", "compress_wall_s")} for s, v in runs.items()}
    meta = {"model": f"Qwen2 random weights, hidden {a.hidden}, {a.layers} layers, {a.heads} q / {a.kv_heads} kv heads, "
                     f"MLP {a.mlp}, vocab {a.vocab}", "n_ctx": a.n_ctx, "keep": a.keep, "window": a.window,
            "kernel": a.kernel, "rounds": a.rounds, "reps_per_process": a.reps, "threads": 1,
            "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "load_avg_end": os.getloadavg(),
            "commands": commands}
    (out / "runs.json").write_text(json.dumps({"meta": meta, "runs": runs, "median": med}, indent=1))
    rows = [("prefill + SnapKV, thread CPU", "prefill_cpu_s"), ("prefill + SnapKV, wall", "prefill_wall_s"),
            ("compression hooks alone, thread CPU", "compress_cpu_s"), ("compression hooks alone, wall", "compress_wall_s")]
    md = [f"# avkv vs kvpress 0.5.5: SnapKV speed", "",
          f"{meta['model']}; {a.n_ctx}-token context, keep {a.keep:.0%} (window {a.window}, kernel {a.kernel}, "
          f"avg pooling), CPU, 1 thread; {a.rounds} interleaved rounds x {a.reps} timed prefills per process "
          f"(medians; {meta['date']} UTC, load average at the end {meta['load_avg_end'][0]:.1f}).", "",
          "| quantity | kvpress | avkv | avkv / kvpress |", "|---|---|---|---|"]
    for label, k in rows:
        md.append(f"| {label} | {med['kvpress'][k]:.4f} s | {med['avkv'][k]:.4f} s | "
                  f"{med['avkv'][k] / med['kvpress'][k]:.3f}x |")
    md += ["", "Reproduce: `python scripts/parity/kvpress_speed.py " + " ".join(
        f"--{k.replace('_', '-')} {getattr(a, k)}" for k in ("rounds", "reps", "n_ctx", "layers", "hidden")) + "`",
        "", "Per-process commands (in this order):", ""] + [f"    {c}" for c in commands]
    (out / "table.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--side", choices=["kvpress", "avkv"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--path", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--n-ctx", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=2, help="timed prefills per process")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (one process per side each)")
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--kernel", type=int, default=5)
    ap.add_argument("--keep", type=float, default=0.2)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--mlp", type=int, default=2816)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--out", default=str(OUT))
    a = ap.parse_args()
    if a.side:
        fn = run_kvpress if a.side == "kvpress" else run_avkv
        print(json.dumps(fn(a.path, a.n_ctx, a.reps, a.window, a.kernel, a.keep)))
        return 0
    return drive(a)


if __name__ == "__main__":
    sys.exit(main())
