"""Compression overhead and decode speed of every method on a small text-only Qwen2 model (random weights).

    python scripts/bench_overhead.py                 # 1k and 4k prompts (CPU: a few minutes)
    python scripts/bench_overhead.py --long          # also 16k
    python scripts/bench_overhead.py --device cuda --lengths 1024 4096 16384 --repeats 5
    python scripts/bench_overhead.py --shape 7b --layers 1 --lengths 4096 --methods full snapkv h2o --skip-decode

For each method and prompt length, the whole prompt is prefilled with the method hooked (``compress_at=prompt``)
through the real engine; ``compress_s`` is the time spent inside the compression hooks (scoring, selection,
merging, the cache gather), and the overhead is compress_s / prefill time of the full cache (median over
repeats); for the all-query methods, whose sums the prefill's attention computes (fused route), their prefill's
excess over that reference is added (``add_overheads``). Decode time per token is measured at budgets 1.0 / 0.5 / 0.2 / 0.1 at one prompt length.

The model has Qwen2.5-0.5B's layer shapes (hidden 896, 14 query / 2 KV heads of 64, MLP 4864; ``--shape 7b`` for
Qwen2.5-7B's) and fewer layers: every cost here is per layer, so the overhead ratio does not depend on depth. Positions 10%–90% of the prompt are
marked as video so that FastV and LOOK-M's text prior have media tokens to act on. Writes CSVs and a Markdown
table under ``results/bench/``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from avkv.config import compose, instantiate  # noqa: E402
from avkv.engine import Engine  # noqa: E402
from avkv.schema import TEXT, VIDEO  # noqa: E402
from avkv.models.base import Encoded, ModelAdapter  # noqa: E402

METHODS = ["full", "streamingllm", "random", "snapkv", "pyramidkv", "adakv", "fastv", "h2o", "lookm", "d2o",
           "kvmerge", "acckv", "flowmm"]
#: how each method scores, for the targets (window methods ≤ 3%, all-query methods ≤ 10% at 16k)
FAMILY = {"full": "none", "streamingllm": "positional", "random": "positional", "snapkv": "window",
          "pyramidkv": "window", "adakv": "window", "fastv": "one row", "h2o": "all-query", "lookm": "all-query",
          "d2o": "all-query", "kvmerge": "all-query", "acckv": "all-query", "flowmm": "all-query",
          "observed_attention": "all-query"}
TARGET = {"window": 0.03, "positional": 0.03, "one row": 0.03, "all-query": 0.10}
OUT = Path(__file__).resolve().parent.parent / "results" / "bench"
#: per-layer shapes of the Qwen2.5 family (the benchmark model has fewer layers; every cost here is per layer)
SHAPES = {"0.5b": dict(hidden_size=896, intermediate_size=4864, num_attention_heads=14, num_key_value_heads=2),
          "7b": dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4)}


class BenchAdapter(ModelAdapter):
    """A bare Qwen2ForCausalLM behind the adapter interface the engine uses (no processor, 1-D RoPE)."""

    family = "qwen2_text"

    def __init__(self, layers: int, device: str, dtype: str, attn: str, shape: str = "0.5b", seed: int = 0):
        from transformers import Qwen2Config, Qwen2ForCausalLM
        torch.manual_seed(seed)
        cfg = Qwen2Config(vocab_size=1024, num_hidden_layers=layers, max_position_embeddings=32768,
                          rope_parameters={"rope_type": "default", "rope_theta": 1e6}, tie_word_embeddings=True,
                          **SHAPES[shape])
        cfg._attn_implementation = attn
        self.device, self.dtype, self.attn_implementation = torch.device(device), getattr(torch, dtype), attn
        self.model = Qwen2ForCausalLM(cfg).to(device=self.device, dtype=self.dtype).eval()
        self.path = Path("<random-weights>")
        self.calls: list[float] = []

    def decoder_layers(self):
        return list(self.model.model.layers)

    def text_config(self):
        return self.model.config

    def prompt_position_ids(self, enc: Encoded) -> torch.Tensor:
        return torch.arange(enc.input_ids.shape[1], device=self.device)[None]

    #: the batched prefill's left padding (avkv.batch_prefill.pad_token): any id of this text-only vocabulary
    tokenizer = SimpleNamespace(pad_token_id=0, eos_token_id=None)

    def forward(self, input_ids, cache, position_ids, mm_inputs=None, logits_to_keep=1, attention_mask=None):
        """The engine's forward, with the calling thread's CPU time of each call recorded in ``self.calls``."""
        t = time.thread_time()
        try:
            return super().forward(input_ids, cache, position_ids, mm_inputs, logits_to_keep, attention_mask)
        finally:
            self.calls.append(time.thread_time() - t)

    @property
    def eos_token_ids(self) -> list[int]:
        return []                                   # decode a fixed number of tokens

    def decode(self, ids: list[int]) -> str:
        return ""


def encoded(n: int, seed: int = 0) -> Encoded:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 1024, (1, n), generator=g)
    mod = torch.full((n,), TEXT, dtype=torch.long)
    mod[n // 10: 9 * n // 10] = VIDEO
    return Encoded(inputs={"input_ids": ids}, input_ids=ids, modality=mod, question_start=n, assistant_start=n)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def cpu_timed(method: Any) -> dict:
    """Accumulate the calling thread's CPU time spent in the method's compress/observe/decode_step."""
    acc = {"s": 0.0}
    for attr in ("compress", "observe", "decode_step"):
        f = getattr(method, attr)

        def timed(*args, _f=f, **kwargs):
            t = time.thread_time()
            try:
                return _f(*args, **kwargs)
            finally:
                acc["s"] += time.thread_time() - t
        setattr(method, attr, timed)
    return acc


def run_one(adapter, name: str, n: int, budget: float, new_tokens: int) -> dict:
    """One engine run. Wall times come from the engine's record (CUDA events on GPU); on CPU the thread's CPU
    time is measured too (with one intra-op thread it is the work done, whatever else runs on the machine)."""
    method = instantiate(compose([f"method={name}"]).method)
    acc = cpu_timed(method)
    eng = Engine(adapter, method, budget=budget, compress_at="prompt", max_new_tokens=new_tokens)
    # every row of the last decoder layer, for every method: the engine's last-row restriction saves a fixed part of
    # one layer per model (all of its attention for most methods, only its MLP for the all-query ones, which read
    # that attention), which on this model of a few layers would be counted as a per-layer cost
    eng.last_row_prefill = False
    sync(str(adapter.device))
    adapter.calls = []
    g = eng.generate(encoded(n))
    sync(str(adapter.device))
    r = g.record
    calls = adapter.calls                   # [prefill (with the compression hooks), decode step, ...]
    return {"prefill_s": r["prefill_s"], "compress_s": r["compress_s"], "decode_s_per_token": r["decode_s_per_token"],
            "cpu_prefill_total_s": calls[0], "cpu_compress_s": acc["s"],
            "cpu_decode_s_per_token": statistics.mean(calls[1:]) if len(calls) > 1 else None,
            "kept_ratio": r["kept_ratio"], "kv_bytes_ratio": r["kv_bytes_ratio"],
            "decode_policy": r["decode_policy"], "new_tokens": r["new_tokens"],
            "peak_mem_bytes": r["peak_mem_bytes"], "peak_mem_kind": r["peak_mem_kind"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float32 on CPU, bfloat16 on CUDA by default")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="0.5b", help="per-layer shape (Qwen2.5-0.5B / -7B)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--long", action="store_true", help="add 16384 to the prompt lengths")
    ap.add_argument("--repeats", type=int, default=None, help="CPU: 2 (1 at 16k); CUDA: 5")
    ap.add_argument("--budget", type=float, default=0.2, help="budget of the overhead runs")
    ap.add_argument("--decode-length", type=int, default=4096)
    ap.add_argument("--decode-budgets", type=float, nargs="+", default=[1.0, 0.5, 0.2, 0.1])
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--threads", type=int, default=None, help="CPU default 1: on a shared machine more threads "
                    "spin-wait in OpenMP and small ops get 100x slower")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--skip-decode", action="store_true")
    ap.add_argument("--table-only", action="store_true", help="rewrite table.md from the CSVs in --out")
    a = ap.parse_args()
    if a.table_only:
        out = Path(a.out)
        meta = json.loads((out / "meta.json").read_text())
        rows = _read_csv(out / "overhead.csv")
        for n in sorted({r["prompt_len"] for r in rows}):
            add_overheads(rows, n, meta["device_kind"].startswith("cuda"))
        _write_csv(out / "overhead.csv", rows)
        drows = _read_csv(out / "decode.csv") if (out / "decode.csv").exists() else []
        (out / "table.md").write_text(markdown(meta, rows, drows))
        print((out / "table.md").read_text())
        return
    cuda = a.device.startswith("cuda")
    torch.set_num_threads(a.threads or (torch.get_num_threads() if cuda else 1))
    dtype = a.dtype or ("bfloat16" if cuda else "float32")
    lengths = sorted(set(a.lengths + ([16384] if a.long else [])))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()

    adapter = BenchAdapter(a.layers, a.device, dtype, "sdpa", a.shape)
    meta = {"device": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
            "device_kind": a.device, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "dtype": dtype, "layers": a.layers, "shape": a.shape,
            "model": "Qwen2 text, {hidden_size} hidden, {num_attention_heads} q / {num_key_value_heads} kv heads, "
                     "MLP {intermediate_size} (Qwen2.5-{shape} layer shape)".format(shape=a.shape.upper(),
                                                                                    **SHAPES[a.shape]),
            "attn": "sdpa", "last_row_prefill": False, "budget": a.budget, "date": time.strftime("%Y-%m-%d %H:%M"),
            "load_avg_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "metric": "CUDA-event wall time" if cuda else "thread CPU time (1 thread); wall time also in the CSV"}
    print(json.dumps(meta), flush=True)
    run_one(adapter, "full", 256, 1.0, 2)                           # warm-up (first-call costs)
    run_one(adapter, "h2o", 256, 0.5, 2)

    rows = []
    for n in lengths:
        reps = a.repeats or (5 if cuda else (1 if n >= 16384 else 2))
        for name in a.methods:
            res = [run_one(adapter, name, n, a.budget, 1) for _ in range(reps)]
            med = lambda key: statistics.median(r[key] for r in res)  # noqa: E731
            row = {"method": name, "family": FAMILY.get(name, "?"), "prompt_len": n, "repeats": reps,
                   "prefill_s": med("prefill_s"), "compress_s": med("compress_s"),
                   "overhead_wall_same_run": statistics.median(
                       r["compress_s"] / max(r["prefill_s"] - r["compress_s"], 1e-9) for r in res),
                   "kept_ratio": res[0]["kept_ratio"], "kv_bytes_ratio": res[0]["kv_bytes_ratio"]}
            if not cuda:
                row.update(cpu_prefill_s=statistics.median(r["cpu_prefill_total_s"] - r["cpu_compress_s"] for r in res),
                           cpu_compress_s=med("cpu_compress_s"))
            row["peak_mem_bytes"] = max(x["peak_mem_bytes"] for x in res)    # CUDA max_memory_allocated / CPU RSS
            rows.append(row)
            print(f"n={n:>6} {name:<13} prefill {row['prefill_s']:8.3f}s wall  compress {row['compress_s']:8.4f}s wall"
                  + ("" if cuda else f"  | cpu: prefill {row['cpu_prefill_s']:8.3f}s compress {row['cpu_compress_s']:8.4f}s")
                  + f"  kept {row['kept_ratio']:.3f}", flush=True)
        add_overheads(rows, n, cuda)
        _write_csv(out / "overhead.csv", rows)

    drows = []
    if not a.skip_decode:
        for name in a.methods:
            for b in a.decode_budgets:
                if b >= 1.0 and name != "full":          # budget 1.0 compresses nothing: every method is Full
                    continue
                r = run_one(adapter, name, a.decode_length, b, a.new_tokens)
                row = {"method": name, "prompt_len": a.decode_length, "budget": b, "new_tokens": a.new_tokens,
                       "decode_ms_per_token": 1000 * r["decode_s_per_token"], "kept_ratio": r["kept_ratio"],
                       "kv_bytes_ratio": r["kv_bytes_ratio"], "decode_policy": r["decode_policy"]}
                row["peak_mem_bytes"] = r["peak_mem_bytes"]
                if not cuda:
                    row["cpu_decode_ms_per_token"] = 1000 * r["cpu_decode_s_per_token"]
                drows.append(row)
                print(f"decode {name:<13} budget {b:.1f}: {row['decode_ms_per_token']:7.2f} ms/token wall"
                      + ("" if cuda else f", {row['cpu_decode_ms_per_token']:7.2f} ms/token cpu")
                      + f" (kept {r['kept_ratio']:.3f}, {r['decode_policy']})", flush=True)
        _write_csv(out / "decode.csv", drows)
    meta["load_avg_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    (out / "table.md").write_text(markdown(meta, rows, drows))
    print(f"wrote {out}/overhead.csv, decode.csv, meta.json, table.md")


def add_overheads(rows: list[dict], n: int, cuda: bool) -> None:
    """Overhead = the method's extra time / prefill time without compression. The window and positional methods run
    the same forward as the full cache, so the reference prefill is their median prefill-minus-compression time at
    this length (less noisy than the full-cache run alone, which is also reported as ``overhead_vs_full``); their
    extra time is the compression hooks'. FastV prunes hidden states (another forward: left out of the reference).
    All-query methods run the prefill's attention through ``avkv_stats``, whose fused route computes their sums
    inside the attention (:mod:`avkv.lse_attention`): they are left out of the reference and their extra time is
    the hooks' plus their prefill's excess over the reference (``prefill_excess_s``; with one repeat, noise of the
    prefill shows up there)."""
    at = [r for r in rows if r["prompt_len"] == n]
    pre = (lambda r: r["prefill_s"] - r["compress_s"]) if cuda else (lambda r: r["cpu_prefill_s"])  # noqa: E731
    comp = (lambda r: r["compress_s"]) if cuda else (lambda r: r["cpu_compress_s"])  # noqa: E731
    same = [r for r in at if r["method"] != "fastv" and r["family"] != "all-query"]
    ref = statistics.median(pre(r) for r in (same or [r for r in at if r["method"] != "fastv"]))
    full = next((r for r in at if r["method"] == "full"), None)
    for r in at:
        excess = pre(r) - ref if r["family"] == "all-query" else 0.0
        r["ref_prefill_s"] = ref
        r["prefill_excess_s"] = excess
        r["overhead"] = (comp(r) + excess) / ref
        if full is not None:
            r["overhead_vs_full"] = (comp(r) + (pre(r) - pre(full) if r["family"] == "all-query" else 0.0)) / pre(full)
        r["target"] = TARGET.get(r["family"])


def _read_csv(path: Path) -> list[dict]:
    import csv
    out = []
    with path.open() as f:
        for row in csv.DictReader(f):
            out.append({k: _num(v) for k, v in row.items()})
    return out


def _num(v: str):
    for cast in (int, float):
        try:
            return cast(v)
        except (TypeError, ValueError):
            pass
    return None if v == "" else v


def _write_csv(path: Path, rows: list[dict]) -> None:
    import csv
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def markdown(meta: dict, rows: list[dict], drows: list[dict]) -> str:
    cpu = meta["device_kind"] == "cpu"
    lengths = sorted({r["prompt_len"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    get = {(r["method"], r["prompt_len"]): r for r in rows}
    what = "thread CPU time" if cpu else "wall time (CUDA events)"
    lines = [f"Device: {meta['device']} ({meta['device_kind']}, {meta['threads']} thread(s)), torch {meta['torch']}, "
             f"{meta['dtype']}; {meta['model']}, {meta['layers']} layers, random weights, SDPA; budget "
             f"{meta['budget']}, whole prompt compressed (`compress_at=prompt`).", "",
             f"Compression time / prefill time without compression ({what}, median over repeats; the reference "
             "prefill is the median over the methods that run the same forward, i.e. all but FastV and the "
             "all-query methods, whose prefill excess over it is added to their compression time):", "",
             "| method | scoring | " + " | ".join(f"{n // 1024}k" for n in lengths) + " | target |",
             "|---|---|" + "---|" * len(lengths) + "---|"]
    for m in methods:
        if m == "full":
            continue
        cells = []
        for n in lengths:
            r = get.get((m, n))
            cells.append("-" if r is None or "overhead" not in r else f"{100 * r['overhead']:.2f}%")
        fam = FAMILY.get(m, "?")
        tgt = TARGET.get(fam)
        lines.append(f"| {m} | {fam} | " + " | ".join(cells) + f" | {'-' if tgt is None else f'≤ {tgt:.0%}'} |")
    lines += ["", "Reference prefill: " + ", ".join(
        f"{n // 1024}k {get[(methods[0], n)]['ref_prefill_s']:.2f} s" for n in lengths if (methods[0], n) in get)
        + f" ({what}).", ""]
    if drows:
        budgets = sorted({r["budget"] for r in drows}, reverse=True)
        dget = {(r["method"], r["budget"]): r for r in drows}
        dkey = "cpu_decode_ms_per_token" if cpu else "decode_ms_per_token"
        full1 = dget.get(("full", 1.0))
        lines += [f"Decode time per token (ms, {what}) after a {drows[0]['prompt_len'] // 1024}k prompt, "
                  f"{drows[0]['new_tokens']} new tokens; budget 1.0 compresses nothing, so it is the full cache "
                  f"for every method:", "",
                  "| method | policy | " + " | ".join(f"budget {b}" for b in budgets) + " |",
                  "|---|---|" + "---|" * len(budgets)]
        for m in dict.fromkeys(r["method"] for r in drows):
            pol = dget[(m, budgets[-1])]["decode_policy"]
            cells = []
            for b in budgets:
                r = dget.get((m, b)) or (full1 if b >= 1.0 else None)
                cells.append("-" if r is None else f"{r[dkey]:.2f}")
            lines.append(f"| {m} | {pol} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
