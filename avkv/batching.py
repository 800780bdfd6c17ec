"""Batch size > 1: one left-padded batched prefill compressed row by row, then one greedy decode for the batch.

:func:`generate_batch` runs B encoded prompts through one :class:`~avkv.engine.Engine`:

1. **one batched prefill, per-row compression** (:func:`avkv.batch_prefill.prefill_batch`) — the rows' compressed
   parts ``[0, s_b)`` left-padded into one forward with an attention mask, each row at its own position ids (M-RoPE's
   rope index included) and with its media concatenated in row order; per layer each row's unpadded slice goes to
   its own :class:`~avkv.compressor.Compressor` (its own copy of the method, its own
   :class:`~avkv.methods.request.Request`, ledger and generator: per-request state never leaks between samples),
   which runs the code batch 1 runs; each row's suffix ``[s_b, n_b)`` then runs on its own compressed cache and its
   first answer token comes from its own logits. A sample's answer, kept entries and ledger are batch 1's (first
   logits within fp32 rounding: ``tests/test_batched_prefill.py``). Where the batch cannot take it — a method that
   declares a prefill attention pattern, hidden-state pruning or a reconstruction
   (:data:`avkv.compressor.ROW_UNSUPPORTED`: FastV, PureKV, KVzip), media inputs the model cannot take as one batch,
   no usable pad token — every sample is prefilled on its own through :meth:`Engine.prefill`, exactly as at batch 1,
   and the record says why;
2. **one batched cache** (:func:`batch_layer`): per layer, every sample's kept entries, per KV head (a ragged
   per-head layer keeps its own count per head), in one :class:`~avkv.prealloc.PreallocLayer` ``[B, kvH, L, D]``
   allocated once for the decode steps, with its ``[B, kvH]`` lengths and validity: a row shorter than the longest
   is padded (never attended), each row writes its new tokens at its own length, and the batch decodes through the
   engine's one decode attention (:func:`avkv.attention.decoding`), the same for every storage;
3. **batched greedy decode** at each sample's own logical positions (``n_b``, ``n_b + 1``, …, moved by the sample's
   rope shift), each sample stopping at its own end-of-sequence token (finished rows are fed their last token and
   their outputs discarded until every row is done or ``max_new_tokens`` is reached).

Which prefill path ran is in every record: ``prefill_batched`` and ``prefill_path`` (``batched_left_padded``, or
why the per-sample prefill ran: the fallback's reason, or :data:`PER_SAMPLE_REASON` when the caller asked for it).

Records: one per sample (:meth:`Engine.sample_record`: what that sample kept; its ``prefill_s``: the batched
forward plus its own suffix, or its own prefill on the per-sample path) plus the batch's shared figures —
``batch_size``, ``batch_prefill_s`` (the batched forward and every row's suffix, on the engine's clock; per-sample
path: the sum of the samples' prefills, run one after the other), ``decode_s`` / ``decode_s_per_token`` (one
batched step, shared by all rows), ``batch_decode_tokens_per_s`` (answer tokens of all rows per second of the
batched decode), ``batch_kv_bytes_allocated`` / ``batch_kv_bytes_prompt`` (the batch's preallocated buffers: all of
them / the prompt part, padding to the longest row included), ``decode_convert_s`` (building the batch cache) and
the batch's peak memory. A sample's own ``kv_bytes_allocated`` / ``kv_bytes_decode_buffer`` are its row of those
buffers (the batch's figures / B: every row is as long as the longest).

Memory: during the batched prefill each row's uncompressed layer lives until that row compresses it (the same
layer, at once for the B rows), and a deferred method (one that compresses after seeing every layer) holds the B
rows' uncompressed caches until the end of the forward — B times what one sample's prefill holds at batch 1.

Not batchable (refused, never silently run at batch 1): a ``decode_policy=fixed`` method (decode-time eviction of
a ragged batch is not implemented), the masked reference (``mask_only``) and the native ports (their decoder does
not take transformers' attention interface).
"""
from __future__ import annotations

import contextlib
import copy
from typing import Any, Callable

import torch

from avkv.batch_prefill import BATCHED, NotBatched, prefill_batch, refusal
from avkv.engine import Engine, Generation, shift_positions
from avkv.attention import decoding
from avkv.kvstore import CompressionError, RaggedLayer
from avkv.prealloc import PreallocLayer, prealloc_bytes
from avkv.measure import MemoryTracker

#: the record's ``prefill_path`` when the caller asked for the per-sample prefill (``batched_prefill=False``)
PER_SAMPLE_REASON = "per_sample: requested (batched_prefill=False)"


def _heads(layer: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A single sample's cache layer as per-KV-head (keys, values), each ``[S_h, D]``."""
    if isinstance(layer, RaggedLayer):
        return [layer.head(h) for h in range(layer.num_heads)]
    if isinstance(layer, PreallocLayer):
        raise CompressionError("a sample's cache was converted for decoding before it was batched")
    if layer.keys.shape[0] != 1:
        raise CompressionError(f"expected a batch-1 cache layer, got keys {tuple(layer.keys.shape)}")
    return [(layer.keys[0, h], layer.values[0, h]) for h in range(layer.keys.shape[1])]


def batch_layer(samples: list[list[tuple[torch.Tensor, torch.Tensor]]], extra: int) -> PreallocLayer:
    """One decoder layer's batch cache from each sample's per-head entries: a :class:`~avkv.prealloc.PreallocLayer`
    ``[B, kvH, L + extra, D]`` (L: the longest (sample, head) row), each row's entries from slot 0, its validity
    and its own length (the rest of the row is padding, never attended)."""
    B, kvH = len(samples), len(samples[0])
    k0, v0 = samples[0][0]
    L = max(int(k.shape[0]) for heads in samples for k, _ in heads)
    K = k0.new_zeros(B, kvH, L, k0.shape[-1])
    V = v0.new_zeros(B, kvH, L, v0.shape[-1])
    valid = torch.zeros(B, kvH, L, dtype=torch.bool, device=k0.device)
    lengths = torch.zeros(B, kvH, dtype=torch.long, device=k0.device)
    for b, heads in enumerate(samples):
        if len(heads) != kvH:
            raise CompressionError("every sample of a batch must have the same KV heads")
        for h, (k, v) in enumerate(heads):
            S = int(k.shape[0])
            K[b, h, :S], V[b, h, :S] = k, v
            valid[b, h, :S] = True
            lengths[b, h] = S
    return PreallocLayer(K, V, valid, lengths, extra)


def check_batchable(engine: Engine, method) -> None:
    """Raise a :class:`CompressionError` naming the reason when ``method`` cannot run batched on ``engine``."""
    from avkv.models.native_adapter import NativeAdapter
    if isinstance(engine.adapter, NativeAdapter):
        raise CompressionError(f"batch_size > 1 is not supported for the native port {engine.adapter.family!r} "
                               "(its decoder does not use transformers' attention interface); use batch_size=1")
    if engine.mask_only:
        raise CompressionError("batch_size > 1 does not run the masked reference (mask_only); use batch_size=1")
    ad = engine.adapter
    if any(w is not None for w in ad.layer_windows()) or any(j != i for i, j in enumerate(ad.cache_sources())):
        raise CompressionError(f"batch_size > 1 is not supported for the {ad.family} model (sliding-window and "
                               "KV-shared cache layers are decoded one sample at a time); use batch_size=1")
    if getattr(method, "decode_policy", "grow") == "fixed" and not method.is_noop():
        raise CompressionError(f"method {method.name!r} evicts during decoding (decode_policy=fixed), which is not "
                               "implemented for a batch; use batch_size=1")


@torch.no_grad()
def generate_batch(engine: Engine, encs: list, seed: int = 0, method=None,
                   max_new_tokens: int | list[int] | None = None, seeds: list[int] | None = None,
                   on_cache: Callable[[Any], None] | None = None, batched_prefill: bool = True) -> list[Generation]:
    """Greedy generations of ``encs`` as one batch (see the module docstring); one :class:`Generation` per sample,
    in order. ``max_new_tokens``: one for all or one per sample (each row stops at its own, as at batch 1);
    ``seeds``: a seed per sample (default ``seed`` for all); ``on_cache``: called with the merged batch cache before
    the first decode step (the tests inspect it); ``batched_prefill`` False: prefill per sample even where the
    one batched prefill could run (the batch-1 reference of the tests and benchmarks)."""
    method = method or engine.method
    check_batchable(engine, method)
    if not encs:
        return []
    adapter, dev = engine.adapter, engine.adapter.device
    B = len(encs)
    if isinstance(max_new_tokens, (list, tuple)):
        if len(max_new_tokens) != B:
            raise ValueError(f"{len(max_new_tokens)} max_new_tokens for {B} samples")
        limits = [int(m or engine.max_new_tokens) for m in max_new_tokens]
    else:
        limits = [int(max_new_tokens or engine.max_new_tokens)] * B
    max_new = max(limits)
    eos = set(adapter.eos_token_ids)
    seeds = list(seeds) if seeds is not None else [seed] * len(encs)
    mem = MemoryTracker(dev, getattr(adapter, "devices", None))
    path = refusal(method) if batched_prefill else PER_SAMPLE_REASON
    with mem:
        pre: list = []
        if path is None:
            try:
                with contextlib.ExitStack() as stack:      # the rows' compressors end with the batched prefill
                    pre, prefill_s = prefill_batch(engine, encs, seeds, [copy.deepcopy(method) for _ in encs], stack)
                path = BATCHED
            except NotBatched as e:                      # raised before anything ran
                path = str(e)
        if not pre:
            for enc, sd in zip(encs, seeds):
                with contextlib.ExitStack() as stack:       # the sample's hooks end with its prefill
                    pre.append(engine.prefill(enc, stack, sd, copy.deepcopy(method), track_memory=False))
            prefill_s = sum(q.prefill_s for q in pre)      # run one after the other
        first = [p.logits[0, -1].float().cpu() for p in pre]
        tokens = [[int(p.logits[0, -1].argmax())] for p in pre]
        records = [engine.sample_record(p) for p in pre]
        layers = [[_heads(p.cache.layers[i]) for p in pre] for i in range(len(pre[0].cache.layers))]
        for p in pre:
            p.cache = None                                  # the samples' own caches are released once merged
        mem.mark()
        done = [t[0] in eos or limits[b] <= 1 for b, t in enumerate(tokens)]
        steps = 0
        decode_s = convert_s = 0.0
        batch_kv = (0, 0)
        if not all(done):
            from transformers import DynamicCache
            tc = engine.clock.now()
            cache = DynamicCache(config=adapter.text_config())
            cache.layers = [batch_layer(layer, max_new) for layer in layers]
            convert_s = engine.clock.elapsed(tc, engine.clock.now())
            del layers
            if on_cache is not None:
                on_cache(cache)
            modules = [layer.self_attn for layer in adapter.decoder_layers()]
            with decoding(adapter.text_config(), cache, modules, max_new):
                t2 = engine.clock.now()
                while not all(done) and steps + 1 < max_new:
                    ids = torch.tensor([[t[-1]] for t in tokens], device=dev)
                    pos = torch.cat([shift_positions(adapter.continue_position_ids(p.pos, p.n + steps, 1), p.shift)
                                     for p in pre], dim=-2)
                    logits = adapter.forward(ids, cache, pos)
                    nxt = logits[:, -1].argmax(-1).tolist()
                    for b in range(B):
                        if not done[b]:
                            tokens[b].append(int(nxt[b]))
                            done[b] = nxt[b] in eos or len(tokens[b]) >= limits[b]
                    steps += 1
                t3 = engine.clock.now()
            decode_s = engine.clock.elapsed(t2, t3)
            batch_kv = prealloc_bytes(cache)
            del cache
    answer_tokens = sum(len(t) for t in tokens)
    gens = []
    for p, rec, toks, fl in zip(pre, records, tokens, first):
        out_ids = [t for t in toks if t not in eos]
        rec.update(batch_size=B, prefill_batched=path == BATCHED, prefill_path=path,
                   batch_prefill_s=prefill_s, decode_s=decode_s,
                   decode_s_per_token=(decode_s / steps) if steps else None, batch_decode_steps=steps,
                   batch_decode_tokens_per_s=((answer_tokens - B) / decode_s) if decode_s > 0 else None,
                   batch_kv_bytes_allocated=batch_kv[1], batch_kv_bytes_prompt=batch_kv[0], new_tokens=len(toks),
                   peak_mem_bytes=mem.peak, peak_mem_kind=mem.kind, decode_cache="prealloc",
                   decode_convert_s=convert_s, kv_bytes_allocated=batch_kv[0] // B,
                   kv_bytes_decode_buffer=batch_kv[1] // B)
        gens.append(Generation(token_ids=out_ids, text=adapter.decode(out_ids), first_logits=fl, record=rec))
    return gens


__all__ = ["generate_batch", "check_batchable", "batch_layer", "PER_SAMPLE_REASON", "BATCHED"]
