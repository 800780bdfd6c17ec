"""Reference outputs of NVIDIA's kvpress for the parity suite (tests/parity). Runs in the side venv
``.cache/venv-kvpress`` (kvpress 0.5.5, transformers 5.2; ``make parity-venv``), never in avkv's venv, and imports
nothing from avkv.

    .cache/venv-kvpress/bin/python scripts/parity/kvpress_reference.py --model .cache/models/tiny_qwen2 \
        --cases cases.json --out .cache/parity/<key>

For the seeded context (``--n-ctx`` random token ids, then one probe token) it writes ``meta.json`` (the ids, the
full-cache logits of the probe step, versions) and, per case and ratio, ``<id>__<ratio>.json``:

* ``n_kept``: kvpress's count per KV head, ``max(1, int(n·(1−ratio)))``;
* ``layers[l].kept[h]``: the context positions KV head h of layer l keeps, recovered by matching each row of the
  compressed cache to the rows of the uncompressed keys (exact equality; a row that matches none is -1, e.g. a
  merged entry); for presses that mask instead of dropping (AdaKV, KVzip), the positions not masked;
* ``layers[l].scores[h]``: the press's scores (when it has a ``score``), ``tied[h]``: whether the scores on both
  sides of the head's cut are equal within ``tie_rtol``, ``gap[h]``: their difference (a selection over several
  heads at once, KVzip's: the group's cut, :func:`selection_ties`);
* ``logits``: the logits of the probe step on the compressed cache (its position is n, the logical one).

Compression happens at the end of the context prefill (kvpress's hook during prefilling, ``compress_at=context``
in avkv); the probe is one forward on the compressed cache.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import torch


def build_press(spec: dict, kvpress):
    """``{"press": name, "kwargs": {...}}`` → a press; nested specs in kwargs are built first."""
    kwargs = {}
    for k, v in spec.get("kwargs", {}).items():
        if isinstance(v, dict) and "press" in v:
            v = build_press(v, kvpress)
        elif isinstance(v, list) and v and all(isinstance(x, dict) and "press" in x for x in v):
            v = [build_press(x, kvpress) for x in v]
        kwargs[k] = v
    press = getattr(kvpress, spec["press"])(**kwargs)
    for k, v in spec.get("attrs", {}).items():            # fields a press sets outside its constructor (FINCH)
        setattr(press, k, v)
    return press


def set_ratio(press, ratio: float | None) -> None:
    """Set ``compression_ratio`` on the outer press (wrappers forward it), or on every nested press that has one;
    ``None``: the press fixes its own ratios (SimLayerKV, PerLayerCompression), nothing is set."""
    if ratio is None:
        return
    if hasattr(type(press), "compression_ratio") or "compression_ratio" in getattr(press, "__dataclass_fields__", {}):
        press.compression_ratio = ratio
        return
    for name in getattr(press, "__dataclass_fields__", {}):
        inner = getattr(press, name, None)
        for p in inner if isinstance(inner, list) else [inner]:      # ComposedPress: every stage at the ratio
            if hasattr(p, "compression_ratio"):
                set_ratio(p, ratio)


def scorers(press) -> list:
    """The press and every nested press (``press``/``presses`` fields), outermost first."""
    out, todo = [], [press]
    while todo:
        p = todo.pop(0)
        out.append(p)
        for name in ("press", "base_press"):
            inner = getattr(p, name, None)
            if inner is not None and hasattr(inner, "compress"):
                todo.append(inner)
        for inner in getattr(p, "presses", None) or []:
            todo.append(inner)
    return out


def kept_rows(compressed: torch.Tensor, full: torch.Tensor) -> list[list[int]]:
    """Per KV head, the position in ``full`` [kvH, S, D] of each row of ``compressed`` [kvH, k, D] (-1: none)."""
    out = []
    for h in range(full.shape[0]):
        eq = (compressed[h][:, None, :] == full[h][None, :, :]).all(-1)            # [k, S]
        pos = torch.where(eq.any(-1), eq.float().argmax(-1), torch.full((eq.shape[0],), -1))
        out.append(sorted(int(p) for p in pos))
    return out


def cut_ties(scores: torch.Tensor, counts: list[int], rtol: float) -> tuple[list[bool], list[float | None]]:
    """Per head: are the scores at ranks count-1 and count (best first) equal within ``rtol``; their gap."""
    tied, gaps = [], []
    for h, k in enumerate(counts):
        s = scores[h].double().sort(descending=True).values
        if k <= 0 or k >= s.numel() or not torch.isfinite(s[k - 1]) or not torch.isfinite(s[k]):
            tied.append(False)
            gaps.append(None)
            continue
        a, b = float(s[k - 1]), float(s[k])
        gaps.append(a - b)
        tied.append(abs(a - b) <= rtol * max(abs(a), abs(b), 1e-30))
    return tied, gaps


def selection_ties(scores: torch.Tensor, keep: torch.Tensor, layerwise: bool, rtol: float
                   ) -> tuple[list[list[bool]], list[list[float | None]]]:
    """Ties of a selection over several heads at once (KVzip: one top-k over every layer and head, or per layer):
    the cut is the smallest kept and the largest dropped score of the group; when the two are equal within
    ``rtol``, every head holding a score in that band is tied (which of them keeps it is not defined)."""
    L, H, _ = scores.shape
    tied = [[False] * H for _ in range(L)]
    gaps: list[list[float | None]] = [[None] * H for _ in range(L)]
    for group in ([[i] for i in range(L)] if layerwise else [list(range(L))]):
        s, k = scores[group].double(), keep[group]
        fin = torch.isfinite(s)
        if not (k & fin).any() or not (~k & fin).any():
            continue
        a, b = float(s[k & fin].min()), float(s[~k & fin].max())
        for j, i in enumerate(group):
            for h in range(H):
                gaps[i][h] = a - b
        if abs(a - b) > rtol * max(abs(a), abs(b), 1e-30):
            continue
        lo, hi = min(a, b) - rtol * abs(min(a, b)), max(a, b) + rtol * abs(max(a, b))
        band = fin & (s >= lo) & (s <= hi)
        for j, i in enumerate(group):
            for h in range(H):
                tied[i][h] = bool(band[j, h].any())
    return tied, gaps


def run_case(model, case: dict, ratio: float, ids: torch.Tensor, probe: torch.Tensor, kvpress, rtol: float) -> dict:
    from transformers import DynamicCache
    from kvpress.utils import compute_n_kept
    n = ids.shape[1]
    press = build_press(case, kvpress)
    set_ratio(press, None if case.get("ratio_fixed_by_press") else ratio)
    seen_scores: dict[int, torch.Tensor] = {}
    seen_keys: dict[int, torch.Tensor] = {}
    restore = []
    for p in scorers(press):
        if hasattr(p, "score"):
            orig = p.score

            def score(module, *a, _orig=orig, **kw):
                s = _orig(module, *a, **kw)
                seen_scores.setdefault(module.layer_idx, s.detach().clone())
                return s
            p.score = score
            restore.append((p, "score"))
    # a press that drives its own passes after the prefill (KVzip's context reconstruction): its scores over every
    # layer are read when it selects (``compress_post``); the prefill's keys are the rows its cache keeps
    driven = hasattr(press, "compress_post")
    if driven:
        orig_post = press.compress_post

        def compress_post(model_):
            orig_post(model_)
            seen_scores["all"] = press.score_val.detach().clone()[:, 0]                   # [L, kvH, n]
        press.compress_post = compress_post
    else:
        # the press whose compress sees the uncompressed keys: a press with its own forward hook (ComposedPress,
        # PerLayerCompressionPress) hands the cache to its (first) inner press instead of calling its own compress
        first = press
        while type(first).forward_hook is not kvpress.presses.base_press.BasePress.forward_hook:
            first = first.presses[0] if getattr(first, "presses", None) else first.press
        orig_compress = first.compress

        def compress(module, hidden_states, keys, values, attentions, kwargs):
            seen_keys.setdefault(module.layer_idx, keys.detach().clone())
            return orig_compress(module, hidden_states, keys, values, attentions, kwargs)
        first.compress = compress
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        with press(model):
            model(input_ids=ids, past_key_values=cache, use_cache=True)
        layers = []
        for i, layer in enumerate(model.model.layers):
            full = cache.layers[i].keys[0] if driven else seen_keys[i][0]
            masked = getattr(layer.self_attn, "masked_key_indices", None)
            if masked is not None:                       # head-wise masking (AdaKV): the cache keeps every row
                _, hh, ss = (t.cpu() for t in masked)
                keep = torch.ones(full.shape[0], full.shape[1], dtype=torch.bool)
                keep[hh, ss] = False
                kept = [torch.nonzero(keep[h]).flatten().tolist() for h in range(full.shape[0])]
            else:
                kept = kept_rows(cache.layers[i].keys[0], full)
            entry = {"kept": kept, "cache_len": int(cache.layers[i].keys.shape[2])}
            if i in seen_scores:
                s = seen_scores[i][0].float()
                entry["scores"] = s.tolist()
                entry["tied"], entry["gap"] = cut_ties(s, [len(k) for k in kept], rtol)
            layers.append(entry)
        if driven and "all" in seen_scores:             # one selection over every layer (or per layer): its ties
            sc = seen_scores["all"].float()
            keep = torch.zeros(sc.shape, dtype=torch.bool)
            for i, entry in enumerate(layers):
                for h, kept_h in enumerate(entry["kept"]):
                    keep[i, h, kept_h] = True
            tied, gaps = selection_ties(sc, keep, bool(getattr(press, "layerwise", False)), rtol)
            for i, entry in enumerate(layers):
                entry.update(scores=sc[i].tolist(), tied=tied[i], gap=gaps[i])
        out = model(input_ids=probe, past_key_values=cache, use_cache=True,
                    position_ids=torch.tensor([[n]]))
    for layer in model.model.layers:
        if hasattr(layer.self_attn, "masked_key_indices"):
            layer.self_attn.masked_key_indices = None
    return {"case": case["id"], "spec": case, "press": case["press"], "ratio": ratio, "n_ctx": n,
            "n_kept": None if case.get("ratio_fixed_by_press") else int(compute_n_kept(n, ratio)),
            "layers": layers, "logits": out.logits[0, -1].float().tolist()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--cases", required=True, help="JSON list of cases (tests/parity/cases.py entries)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--n-ctx", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tie-rtol", type=float, default=1e-5)
    a = ap.parse_args()
    import kvpress
    import transformers
    from transformers import AutoModelForCausalLM, DynamicCache
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cases = json.loads(Path(a.cases).read_text())
    g = torch.Generator().manual_seed(a.seed)
    models = {}

    def model_for(attn: str):
        if attn not in models:
            models[attn] = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32, use_safetensors=True,
                                                                attn_implementation=attn).eval()
            if getattr(models[attn].config, "head_dim", None) is None:      # CriticalKV reads config.head_dim
                models[attn].config.head_dim = models[attn].config.hidden_size // models[attn].config.num_attention_heads
        return models[attn]
    m = model_for("sdpa")
    vocab = m.config.vocab_size
    specials = {t for t in (m.config.bos_token_id, m.config.eos_token_id, m.config.pad_token_id) if t is not None}
    ids = torch.randint(0, vocab, (a.n_ctx + 1,), generator=g)
    while any(int(t) in specials for t in ids):          # ordinary tokens only
        ids = torch.tensor([int(t) if int(t) not in specials else (int(t) + 17) % vocab for t in ids])
    ctx, probe = ids[None, :-1], ids[None, -1:]
    with torch.no_grad():
        cache = DynamicCache(config=m.config)
        m(input_ids=ctx, past_key_values=cache, use_cache=True)
        full = m(input_ids=probe, past_key_values=cache, use_cache=True, position_ids=torch.tensor([[a.n_ctx]]))
    meta = {"ids": ctx[0].tolist(), "probe": int(probe[0, 0]), "full_logits": full.logits[0, -1].tolist(),
            "kvpress": getattr(kvpress, "__version__", None) or _version("kvpress"),
            "transformers": transformers.__version__, "torch": torch.__version__, "tie_rtol": a.tie_rtol}
    (out / "meta.json").write_text(json.dumps(meta))
    for case in cases:
        model = model_for(case.get("kvpress_attn", "sdpa"))
        for r in case["ratios"]:
            t0 = time.perf_counter()
            ref = run_case(model, case, float(r), ctx, probe, kvpress, a.tie_rtol)
            ref["seconds"] = time.perf_counter() - t0
            (out / f"{case['id']}__{r}.json").write_text(json.dumps(ref))
            print(f"{case['id']} @ {r}: n_kept={ref['n_kept']} ({ref['seconds']:.2f}s)", flush=True)


def _version(dist: str) -> str | None:
    from importlib.metadata import version
    with contextlib.suppress(Exception):
        return version(dist)
    return None


if __name__ == "__main__":
    main()
