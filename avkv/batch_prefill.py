"""One left-padded batched prefill for a batch of prompts, compressed row by row (issue 18 item 4).

:func:`prefill_batch` turns B encoded prompts into the B :class:`~avkv.engine.Prefilled` samples that
:func:`avkv.batching.generate_batch` decodes together, with ONE forward over the compressed parts instead of B:

1. every row's compressed part ``[0, s_b)`` is left-padded to the longest (pad token: the tokenizer's pad id, or
   its end-of-sequence id, never a media placeholder: :func:`pad_token`) with an attention mask (0 = padding);
   its position ids are the row's own ``adapter.prompt_position_ids`` (M-RoPE's rope index included), left-padded,
   so every real token sits at exactly its batch-1 position; media inputs are concatenated in row order
   (:func:`media_batch`; inputs the model cannot take as one batch fall back, with the reason);
2. one hook per attention layer hands each row the UNPADDED part of that layer's keys, values, hidden states and
   rotary embeddings (``[b:b+1, ..., pad_b:]``) in the row's own cache; the row's own
   :class:`~avkv.compressor.Compressor` (``row=True``: its own copy of the method, request, ledger, generator and
   scratch) runs on it exactly the code batch 1 runs (:meth:`~avkv.compressor.Compressor.layer_done`), and the
   batch layer's entries are released right after, so padding never enters a kept entry or a statistic (an
   all-query method's row gets the prefill statistics batch 1 gets, from its own unpadded attention:
   :func:`rows_attention`, record field ``allquery_route``);
3. each row's suffix ``[s_b, n_b)`` then runs on the row's own compressed cache, as at batch 1 (with the masked
   attention when the row's layers differ: the row's backend noted it).

Methods that need what a shared forward cannot give one row (:data:`avkv.compressor.ROW_UNSUPPORTED`: a prefill
attention pattern of their own, hidden-state pruning, a reconstruction of the prefill) are refused here with the
reason (:func:`refusal`); :mod:`avkv.batching` then prefills per sample and records why.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from avkv.attention import AttentionBackend
from avkv.attention_support import method_parts
from avkv.compressor import ROW_UNSUPPORTED, Compressor
from avkv.engine import Engine, Prefilled, shift_positions
from avkv.kvstore import CompressionError, RaggedLayer, measure_cache

#: the record's ``prefill_path`` when the one batched prefill ran
BATCHED = "batched_left_padded"
#: model inputs read only to compute the rope index when no position ids are given (transformers 5.23's
#: Qwen2.5-Omni thinker): the batched forward gets every row's own position ids, so they are left out
ROPE_INDEX_ONLY = ("use_audio_in_video",)
#: processor outputs with one entry per prompt token: left-padded like the tokens (everything else is per media
#: item and concatenated in row order)
PER_TOKEN_INPUTS = ("mm_token_type_ids", "token_type_ids")


#: the batched prefill's attention (:func:`rows_attention`), for these base backends of the model; under any other
#: (eager, flash-attn) the model's own attention runs with the padding mask
ROWS_IMPL = "avkv_rows"
ROW_ATTENTION_IMPLS = ("sdpa",)


def rows_attention(module, query, key, value, attention_mask, **kwargs):
    """The batched prefill's attention on an SDPA model: each row's real queries against its own real keys, causal,
    through the model's SDPA function exactly as batch 1 calls it (``is_causal``, no mask: SDPA's causal kernel does
    half the work of a masked one, and a pad neither attends nor is attended; its output is 0). A row of an all-query
    method attends through the statistics route batch 1 takes (:func:`avkv.lse_attention.sink_attention` into the
    row's own sink), on the same unpadded slice: no pad key enters its column sums or its rows' normalisers. The rows'
    padding and sinks: module attributes ``_avkv_row_pads``, ``_avkv_row_sinks``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from avkv.lse_attention import sink_attention
    B, H, S, _ = query.shape
    out = query.new_zeros(B, S, H, value.shape[-1])
    for b, (pad, sink) in enumerate(zip(module._avkv_row_pads, module._avkv_row_sinks)):
        q, k, v = query[b:b + 1, :, pad:], key[b:b + 1, :, pad:], value[b:b + 1, :, pad:]
        if sink is None:
            o, _ = sdpa_attention_forward(module, q, k, v, None, **kwargs)
        else:
            o, _ = sink_attention(sink, module, q, k, v, None, **kwargs)
        out[b, pad:] = o[0]
    return out, None


@contextlib.contextmanager
def _rows_backend(config: Any, modules: list, pads: list[int], sinks: list):
    """The decoder attends through :func:`rows_attention` inside (when the model's backend is one it serves);
    ``sinks``: each row's statistics sink (None: plain SDPA)."""
    with AttentionBackend(config, modules) as be:
        if be.base_impl not in ROW_ATTENTION_IMPLS:
            yield
            return
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        from avkv.attention import no_model_mask
        AttentionInterface.register(ROWS_IMPL, rows_attention)
        AttentionMaskInterface.register(ROWS_IMPL, no_model_mask)
        for m in modules:
            m._avkv_row_pads, m._avkv_row_sinks = pads, sinks
        try:
            be.route_base(ROWS_IMPL)
            yield
        finally:
            for m in modules:
                del m._avkv_row_pads, m._avkv_row_sinks


class NotBatched(Exception):
    """This batch cannot take the one batched prefill; the message is the record's ``prefill_path``."""


def refusal(method) -> str | None:
    """Why ``method`` cannot run in the batched prefill (None: it can)."""
    asks = [f for f in ROW_UNSUPPORTED if any(getattr(m, f, False) for m in method_parts(method))]
    if asks:
        return (f"per_sample: method {method.name!r} declares {', '.join(asks)}, which one forward shared by the "
                "rows cannot give each row")
    return None


def pad_token(adapter: Any) -> int:
    """The id left padding is written with: the tokenizer's pad id, else an end-of-sequence id, never one of the
    adapter's media placeholder ids (a placeholder would be filled with media features)."""
    ids = getattr(adapter, "placeholder_ids", dict)()
    media = {int(v) for v in ids.values() if v is not None}
    tok = adapter.tokenizer
    for cand in (getattr(tok, "pad_token_id", None), getattr(tok, "eos_token_id", None), *adapter.eos_token_ids):
        if cand is not None and int(cand) not in media:
            return int(cand)
    raise NotBatched(f"per_sample: the {adapter.family} tokenizer has no pad or end-of-sequence id that is not a "
                     "media placeholder")


def media_batch(adapter: Any, encs: list, splits: list[int], S: int) -> dict:
    """The rows' media inputs as one forward's: per-token inputs left-padded to ``S``, per-item tensors concatenated
    in row order (the model fills the placeholders of the flattened batch in that order; along the dimension
    ``adapter.batch_pad_dims`` names, zero-padded to the longest first), flags equal in every row. Raises
    :class:`NotBatched` naming the input that cannot be batched."""
    mms = [adapter.media_inputs(e) for e in encs]
    out: dict = {}
    for k in sorted(set().union(*mms) - set(ROPE_INDEX_ONLY)):
        vals = [m.get(k) for m in mms]
        if k in PER_TOKEN_INPUTS:
            if any(v is None for v in vals):
                raise NotBatched(f"per_sample: {k!r} is missing in some rows")
            out[k] = torch.cat([F.pad(v[..., :s], (S - s, 0)) for v, s in zip(vals, splits)])
            continue
        present = [v for v in vals if v is not None]
        if not all(torch.is_tensor(v) for v in present):
            if any(v != vals[0] for v in vals):
                raise NotBatched(f"per_sample: the rows' {k!r} differ ({vals}); one forward takes one value")
            out[k] = vals[0]
            continue
        d = getattr(adapter, "batch_pad_dims", {}).get(k)
        if d is not None and len({v.shape[d] for v in present}) > 1:       # the model reads each item's own length
            n = max(v.shape[d] for v in present)
            present = [F.pad(v, (0, 0) * (v.dim() - 1 - d) + (0, n - v.shape[d])) for v in present]
        if len({tuple(v.shape[1:]) for v in present}) > 1:
            raise NotBatched(f"per_sample: the rows' {k!r} have shapes {[tuple(v.shape) for v in present]}, which "
                             "cannot be concatenated into one forward's input")
        out[k] = torch.cat(present)
    return out


@dataclass
class _Row:
    enc: Any
    method: Any
    n: int
    s: int
    target: int
    pos: torch.Tensor
    position_ids_s: float
    cache: Any
    cm: Compressor | None


def _row(t: torch.Tensor, b: int, pad: int) -> torch.Tensor:
    """Row ``b``'s unpadded positions of a batched ``[..., B, S, D]`` tensor (hidden states, rotary cos/sin)."""
    return t.narrow(t.dim() - 3, b, 1)[..., pad:, :]


def _layer_hook(i: int, rows: list[_Row], S: int):
    """The hook of attention layer ``i``: each row's unpadded keys/values into its own cache, then its compressor
    on that slice; the batch layer's entries are released."""
    @torch.no_grad()
    def hook(module, args, kwargs, output):
        layer = kwargs["past_key_values"].layers[i]
        K, V = layer.keys, layer.values
        h = kwargs["hidden_states"]
        cos, sin = kwargs["position_embeddings"]
        w = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        for b, r in enumerate(rows):
            pad = S - r.s
            r.cache.layers[i].update(K[b:b + 1, :, pad:], V[b:b + 1, :, pad:])   # a leak shows in the logits check
            if r.cm is not None:
                view = {"hidden_states": h[b:b + 1, pad:],
                        "position_embeddings": (_row(cos, b, pad), _row(sin, b, pad))}
                r.cm.layer_done(module, r.cache, view, None if w is None else w[b, :, pad:, pad:])
        layer.keys, layer.values = K.new_empty(K.shape[:2] + (0, K.shape[-1])), V.new_empty(V.shape[:2] + (0, V.shape[-1]))
        out = output[0] if isinstance(output, tuple) else output
        for b, r in enumerate(rows):      # a pad query attends to nothing: whatever the kernel made of it (0 or NaN
            out[b, :S - r.s] = 0          # by backend), it is 0, so no NaN reaches a real row through a pad value
    return hook


@contextlib.contextmanager
def _row_attention(config: Any, modules: list, r: _Row):
    """The decoder's attention for row ``r``'s own suffix: its ragged layers on their modules, and the masked
    attention when its compression asked for it (as the row's hooks would have switched at batch 1)."""
    for i, m in enumerate(modules):
        layer = r.cache.layers[i]
        if isinstance(layer, RaggedLayer):
            m._avkv_ragged = layer
        elif hasattr(m, "_avkv_ragged"):
            delattr(m, "_avkv_ragged")
    try:
        with AttentionBackend(config, modules) as be:
            if r.cm is not None and r.cm.backend.wants_masked:
                be.masked()
            yield
    finally:
        for m in modules:
            if hasattr(m, "_avkv_ragged"):
                delattr(m, "_avkv_ragged")


@torch.no_grad()
def prefill_batch(engine: Engine, encs: list, seeds: list[int], methods: list, stack: contextlib.ExitStack
                  ) -> tuple[list[Prefilled], float]:
    """The B samples after one batched prefill (module docstring) and the batch's prefill time (the batched
    forward, the rows' deferred compressions and every row's suffix, on the engine's clock). A row's own
    ``prefill_s`` is the batched forward plus its own suffix. The rows' compressors are entered into ``stack``.
    Raises :class:`NotBatched` (before anything is entered) when the batch cannot take it."""
    from transformers import DynamicCache
    adapter, dev, clock = engine.adapter, engine.adapter.device, engine.clock
    tc = adapter.text_config()
    rows = []
    for enc, sd, m in zip(encs, seeds, methods):
        n, s, target, compress = engine.plan(enc, m)
        tp = clock.now()
        pos = adapter.prompt_position_ids(enc).to(dev)
        pos_s = clock.elapsed(tp, clock.now())
        cm = Compressor(adapter, m, engine.request(enc, pos), engine.mask_only, sd, row=True) if compress else None
        rows.append(_Row(enc, m, n, s, target, pos, pos_s, DynamicCache(config=tc), cm))
    S = max(r.s for r in rows)
    pad_id = pad_token(adapter)
    mm = media_batch(adapter, encs, [r.s for r in rows], S)
    ids = torch.full((len(rows), S), pad_id, dtype=torch.long, device=dev)
    mask = torch.zeros(len(rows), S, dtype=torch.long, device=dev)
    for b, r in enumerate(rows):
        ids[b, S - r.s:] = r.enc.input_ids[0, :r.s].to(dev)
        mask[b, S - r.s:] = 1
    pos = torch.cat([F.pad(r.pos[..., :r.s], (S - r.s, 0)) for r in rows], dim=-2)
    modules = [layer.self_attn for layer in adapter.decoder_layers()]
    for r in rows:
        if r.cm is not None:
            stack.enter_context(r.cm)
    handles = [m.register_forward_hook(_layer_hook(i, rows, S), with_kwargs=True) for i, m in enumerate(modules)]
    stack.callback(lambda: [h.remove() for h in handles])
    t0 = clock.now()
    with contextlib.ExitStack() as stages:
        stages.enter_context(_rows_backend(tc, modules, [S - r.s for r in rows],
                                           [r.cm.row_sink if r.cm is not None else None for r in rows]))
        for r in rows:
            if r.cm is not None:
                stages.enter_context(r.cm.stage("prefill"))
        logits = adapter.forward(ids, DynamicCache(config=tc), pos, mm, attention_mask=mask)
    for h in handles:
        h.remove()
    for r in rows:
        if r.cm is not None:
            r.cm.end_prefill(r.cache)
    t = clock.now()
    forward_s = clock.elapsed(t0, t)
    done = []
    for b, r in enumerate(rows):
        shift = r.cm.ledger.rope_shift() if r.cm else 0
        lg = logits[b:b + 1]
        if r.s < r.n:
            with _row_attention(tc, modules, r):
                lg = adapter.forward(r.enc.input_ids[:, r.s:].to(dev), r.cache, shift_positions(r.pos[..., r.s:], shift))
        t_row = clock.now()
        done.append((r, shift, lg, clock.elapsed(t, t_row)))
        t = t_row
    batch_s = clock.elapsed(t0, t)
    out = []
    for r, shift, lg, suffix_s in done:
        if not bool(torch.isfinite(lg).all()):
            raise CompressionError("the batched prefill produced non-finite logits (padding leaked into a row)")
        out.append(Prefilled(enc=r.enc, method=r.method, n=r.n, s=r.s, target=r.target, pos=r.pos, shift=shift,
                             cache=r.cache, cm=r.cm, mem=None,
                             held=measure_cache(r.cache, r.cm.attn_modules if r.cm else None), logits=lg,
                             prefill_s=forward_s + suffix_s, position_ids_s=r.position_ids_s))
    return out, batch_s


__all__ = ["prefill_batch", "refusal", "pad_token", "media_batch", "rows_attention", "NotBatched", "BATCHED",
           "PER_TOKEN_INPUTS", "ROWS_IMPL", "ROW_ATTENTION_IMPLS"]
