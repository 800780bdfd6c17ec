"""Batch size > 1: each sample prefilled and compressed on its own, then one greedy decode for the whole batch.

:func:`generate_batch` runs B encoded prompts through one :class:`~avkv.engine.Engine`:

1. **per-sample prefill and compression** — every sample goes through :meth:`Engine.prefill` exactly as at batch 1
   (its own position ids — M-RoPE's rope index included —, its own :class:`~avkv.methods.request.Request`, its own
   copy of the method, so per-request state never leaks between samples), and its first answer token comes from its
   own logits. Prompts of different lengths therefore need no padding in the prefill, and a sample's full
   (uncompressed) cache exists only while that sample is prefilled: the batch holds B *compressed* caches, which is
   where compression buys capacity (``scripts/bench_capacity.py``);
2. **one left-padded batched cache** (:class:`BatchLayer`, preallocated for the decode steps): per layer, every
   sample's kept entries, per KV head (a ragged per-head layer keeps its own count per head), right-aligned in a
   ``[B, kvH, L, D]`` tensor with a ``[B, kvH, L]`` validity mask; the rows' left padding is masked out by
   :func:`batch_attention` (the one decode attention for every storage: dense, per-layer lengths, ragged heads);
3. **batched greedy decode** at each sample's own logical positions (``n_b``, ``n_b + 1``, …, moved by the sample's
   rope shift), each sample stopping at its own end-of-sequence token (finished rows are fed their last token and
   their outputs discarded until every row is done or ``max_new_tokens`` is reached).

Records: one per sample (:meth:`Engine.sample_record`: what that sample kept, its own prefill time) plus the
batch's shared figures — ``batch_size``, ``batch_prefill_s`` (sum of the samples' prefills, run one after the
other), ``decode_s`` / ``decode_s_per_token`` (one batched step, shared by all rows), ``batch_decode_tokens_per_s``
(answer tokens of all rows per second of the batched decode) and the batch's peak memory.

Not batchable (refused, never silently run at batch 1): a ``decode_policy=fixed`` method (decode-time eviction of
a ragged batch is not implemented), the masked reference (``mask_only``) and the native ports (their decoder does
not take transformers' attention interface).
"""
from __future__ import annotations

import contextlib
import copy
from typing import Any, Callable

import torch

from avkv.engine import Engine, Generation, shift_positions
from avkv.kvstore import CompressionError, RaggedLayer
from avkv.measure import MemoryTracker

BATCH_IMPL = "avkv_batch"

try:
    from transformers.cache_utils import DynamicLayer as _DynamicLayer
except ImportError:  # pragma: no cover - transformers < 4.54 has no cache layers
    _DynamicLayer = object


def _heads(layer: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A single sample's cache layer as per-KV-head (keys, values), each ``[S_h, D]``."""
    if isinstance(layer, RaggedLayer):
        return [layer.head(h) for h in range(layer.num_heads)]
    if layer.keys.shape[0] != 1:
        raise CompressionError(f"expected a batch-1 cache layer, got keys {tuple(layer.keys.shape)}")
    return [(layer.keys[0, h], layer.values[0, h]) for h in range(layer.keys.shape[1])]


class BatchLayer(_DynamicLayer):
    """One decoder layer's cache for a batch: ``[B, kvH, capacity, D]`` keys/values allocated once, the first
    :attr:`length` columns filled, and ``valid [B, kvH, capacity]`` saying which filled entries are real (each
    (sample, head) row's prompt entries are right-aligned at ``length``, its left padding invalid). :meth:`update`
    writes new entries in place at ``length`` (no copy of the cache per step)."""

    def __init__(self, samples: list[list[tuple[torch.Tensor, torch.Tensor]]], extra: int):
        super().__init__()
        B, kvH = len(samples), len(samples[0])
        k0 = samples[0][0][0]
        D, dtype, device = k0.shape[-1], k0.dtype, k0.device
        self.length = max(int(k.shape[0]) for heads in samples for k, _ in heads)
        cap = self.length + max(int(extra), 0)
        self.keys_buf = torch.zeros(B, kvH, cap, D, dtype=dtype, device=device)
        self.values_buf = torch.zeros(B, kvH, cap, samples[0][0][1].shape[-1], dtype=dtype, device=device)
        self.valid = torch.zeros(B, kvH, cap, dtype=torch.bool, device=device)
        self.lengths = torch.zeros(B, kvH, dtype=torch.long)        # real entries per (sample, head)
        for b, heads in enumerate(samples):
            if len(heads) != kvH:
                raise CompressionError("every sample of a batch must have the same KV heads")
            for h, (k, v) in enumerate(heads):
                S = int(k.shape[0])
                self.keys_buf[b, h, self.length - S:self.length] = k
                self.values_buf[b, h, self.length - S:self.length] = v
                self.valid[b, h, self.length - S:self.length] = True
                self.lengths[b, h] = S
        self.dtype, self.device = dtype, device
        self.is_initialized = True

    @property
    def keys(self) -> torch.Tensor:
        return self.keys_buf[:, :, :self.length]

    @keys.setter
    def keys(self, value) -> None:   # DynamicLayer.__init__ assigns None; the buffers are the storage
        if value is not None:
            raise CompressionError("a batch cache layer's keys are written through update()")

    @property
    def values(self) -> torch.Tensor:
        return self.values_buf[:, :, :self.length]

    @values.setter
    def values(self, value) -> None:
        if value is not None:
            raise CompressionError("a batch cache layer's values are written through update()")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        B, kvH, q, _ = key_states.shape
        if B != self.keys_buf.shape[0] or kvH != self.keys_buf.shape[1]:
            raise CompressionError(f"batch cache layer holds {tuple(self.keys_buf.shape[:2])} (batch, kv heads), "
                                   f"got {tuple(key_states.shape)}")
        a, b = self.length, self.length + q
        if b > self.keys_buf.shape[2]:
            raise CompressionError(f"batch cache layer capacity {self.keys_buf.shape[2]} exceeded")
        self.keys_buf[:, :, a:b] = key_states.to(self.dtype)
        self.values_buf[:, :, a:b] = value_states.to(self.dtype)
        self.valid[:, :, a:b] = True
        self.lengths += q
        self.length = b
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a batch cache layer cannot be cropped")

    def nbytes(self) -> int:
        """Bytes allocated (buffers at full capacity, padding included)."""
        return sum(t.numel() * t.element_size() for t in (self.keys_buf, self.values_buf))


def batch_attention(module, query, key, value, attention_mask, **kwargs):
    """Decoder attention over a :class:`BatchLayer`: the model's base backend with an additive bias built from the
    layer's per-(sample, KV head) validity (expanded to the query heads) and, for more than one query, the causal
    mask bottom-right aligned. The model passes no mask of its own (its mask function returns None)."""
    from avkv.attention import base_attention
    layer: BatchLayer = module._avkv_batch_layer
    fn = base_attention(getattr(module, "_avkv_base_impl", "sdpa"))
    q_len, k_len = query.shape[2], key.shape[2]
    groups = query.shape[1] // layer.valid.shape[1]
    allowed = layer.valid[:, :, :k_len].repeat_interleave(groups, 1)[:, :, None, :]       # [B, H, 1, k]
    if q_len > 1:
        causal = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(k_len - q_len)
        allowed = allowed & causal[None, None]
    bias = torch.zeros(allowed.shape, dtype=query.dtype, device=query.device).masked_fill(
        ~allowed, torch.finfo(query.dtype).min)
    return fn(module, query, key, value, bias, **kwargs)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    from avkv.attention import _no_model_mask
    AttentionInterface.register(BATCH_IMPL, batch_attention)
    AttentionMaskInterface.register(BATCH_IMPL, _no_model_mask)


def check_batchable(engine: Engine, method) -> None:
    """Raise a :class:`CompressionError` naming the reason when ``method`` cannot run batched on ``engine``."""
    from avkv.models.native_adapter import NativeAdapter
    if isinstance(engine.adapter, NativeAdapter):
        raise CompressionError(f"batch_size > 1 is not supported for the native port {engine.adapter.family!r} "
                               "(its decoder does not use transformers' attention interface); use batch_size=1")
    if engine.mask_only:
        raise CompressionError("batch_size > 1 does not run the masked reference (mask_only); use batch_size=1")
    if getattr(method, "decode_policy", "grow") == "fixed" and not method.is_noop():
        raise CompressionError(f"method {method.name!r} evicts during decoding (decode_policy=fixed), which is not "
                               "implemented for a batch; use batch_size=1")


@torch.no_grad()
def generate_batch(engine: Engine, encs: list, seed: int = 0, method=None,
                   max_new_tokens: int | None = None, seeds: list[int] | None = None,
                   on_cache: Callable[[Any], None] | None = None) -> list[Generation]:
    """Greedy generations of ``encs`` as one batch (see the module docstring); one :class:`Generation` per sample,
    in order. ``seeds``: a seed per sample (default ``seed`` for all); ``on_cache``: called with the merged batch
    cache before the first decode step (the tests inspect it)."""
    method = method or engine.method
    check_batchable(engine, method)
    if not encs:
        return []
    adapter, dev = engine.adapter, engine.adapter.device
    max_new = max_new_tokens or engine.max_new_tokens
    eos = set(adapter.eos_token_ids)
    seeds = list(seeds) if seeds is not None else [seed] * len(encs)
    B = len(encs)
    mem = MemoryTracker(dev, getattr(adapter, "devices", None))
    with mem:
        pre, records, tokens, first = [], [], [], []
        for enc, sd in zip(encs, seeds):
            with contextlib.ExitStack() as stack:       # the sample's hooks end with its prefill
                p = engine.prefill(enc, stack, sd, copy.deepcopy(method), track_memory=False)
            pre.append(p)
            first.append(p.logits[0, -1].float().cpu())
            tokens.append([int(p.logits[0, -1].argmax())])
            records.append(engine.sample_record(p))
        layers = [[_heads(p.cache.layers[i]) for p in pre] for i in range(len(pre[0].cache.layers))]
        for p in pre:
            p.cache = None                                  # the samples' own caches are released once merged
        mem.mark()
        done = [t[0] in eos for t in tokens]
        steps = 0
        decode_s = 0.0
        if not all(done) and max_new > 1:
            from transformers import DynamicCache
            cache = DynamicCache(config=adapter.text_config())
            cache.layers = [BatchLayer(layer, max_new) for layer in layers]
            del layers
            if on_cache is not None:
                on_cache(cache)
            modules = [layer.self_attn for layer in adapter.decoder_layers()]
            for m, layer in zip(modules, cache.layers):
                m._avkv_batch_layer = layer
            cfg = adapter.text_config()
            prev = cfg._attn_implementation
            _register()
            for m in modules:
                m._avkv_base_impl = prev or "sdpa"
            cfg._attn_implementation = BATCH_IMPL
            try:
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
                            done[b] = nxt[b] in eos
                    steps += 1
                t3 = engine.clock.now()
                decode_s = engine.clock.elapsed(t2, t3)
            finally:
                cfg._attn_implementation = prev
                for m in modules:
                    for attr in ("_avkv_batch_layer", "_avkv_base_impl"):
                        if hasattr(m, attr):
                            delattr(m, attr)
            batch_kv_bytes = sum(layer.nbytes() for layer in cache.layers)
            del cache
        else:
            batch_kv_bytes = 0
    answer_tokens = sum(len(t) for t in tokens)
    gens = []
    for p, rec, toks, fl in zip(pre, records, tokens, first):
        out_ids = [t for t in toks if t not in eos]
        rec.update(batch_size=B, batch_prefill_s=sum(q.prefill_s for q in pre), decode_s=decode_s,
                   decode_s_per_token=(decode_s / steps) if steps else None, batch_decode_steps=steps,
                   batch_decode_tokens_per_s=((answer_tokens - B) / decode_s) if decode_s > 0 else None,
                   batch_kv_bytes_allocated=batch_kv_bytes, new_tokens=len(toks), peak_mem_bytes=mem.peak,
                   peak_mem_kind=mem.kind)
        gens.append(Generation(token_ids=out_ids, text=adapter.decode(out_ids), first_logits=fl, record=rec))
    return gens


__all__ = ["generate_batch", "check_batchable", "BatchLayer", "batch_attention", "BATCH_IMPL"]
