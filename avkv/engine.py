"""Prefill → compress → decode, with timing, memory and KV accounting per sample.

Flow for one prompt of n tokens (batch size 1):

1. position ids of the whole prompt come from the model itself (exactly what ``generate`` would use);
2. the prefix ``[0, s)`` is prefilled with the method hooked on every decoder attention layer
   (:class:`~avkv.compressor.Compressor`): at the end of each layer's prefill the method sees that layer's cache
   (:class:`~avkv.methods.base.LayerView`) and the layer's cache tensors are replaced by what it keeps — the cache
   physically shrinks (:mod:`avkv.kvstore`);
3. the rest of the prompt ``[s, n)`` (the assistant preamble, or the question) is fed on the compressed cache with
   its original positions, so even the first answer token sees only the kept entries;
4. greedy decoding continues at logical positions n, n+1, … (never at the pruned cache length), through one path
   whatever the storage (:func:`avkv.attention.decoding`): every layer is converted once into a preallocated
   :class:`~avkv.prealloc.PreallocLayer` (capacity kept + ``max_new_tokens``, new tokens written in place) and
   attends through :func:`avkv.attention.decode_attention`; ``decode_policy=fixed`` methods (which evict per step)
   keep transformers' growing cache.

``compress_at`` picks s: ``question`` (default; s = start of the assistant preamble: query-aware),
``context`` (s = start of the question: query-agnostic, kvpress's protocol) or ``prompt`` (s = n: the first token
comes from the uncompressed prefill, as ``generate``-based implementations do).

The engine's other jobs live next to it: :mod:`avkv.measure` (clock, peak memory), :mod:`avkv.kvstore` (ragged
storage, applying a selection, byte counting), :mod:`avkv.attention` (the one owner of the decoder's attention
backend switch), :mod:`avkv.ledger` (what each layer kept, and the sample record written from it, with the budget
conformance check) and :mod:`avkv.methods.request` (the typed messages of the method lifecycle).
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from avkv.attention import MASKED_IMPL, decoding
from avkv.compressor import Compressor
from avkv.layer_inputs import last_row_only
from avkv.kvstore import (BUDGET_TOLERANCE, CompressionError, RaggedLayer, kv_bytes_by_device, kv_cache_bytes,
                          measure_cache, within_budget)
from avkv.prealloc import prealloc_bytes
from avkv.ledger import write_record
from avkv.measure import Clock, MemoryTracker
from avkv.methods.base import Method
from avkv.methods.request import Request
from avkv.models.base import Encoded, ModelAdapter

COMPRESS_AT = ("question", "context", "prompt")

log = logging.getLogger("avkv")


def rotary_rows(pos: torch.Tensor) -> torch.Tensor:
    """The rotary rows of a prompt's position ids: [1, n] (1-D RoPE) or M-RoPE's t/h/w rows [3, n] (Qwen's
    4-row layout drops its first, text-position row)."""
    if pos.dim() == 2:
        return pos
    return (pos[1:] if pos.shape[0] == 4 else pos)[:, 0]


def shift_positions(pos: torch.Tensor, shift: int) -> torch.Tensor:
    """Position ids with their rotary rows moved by ``-shift`` (methods that re-rotate the kept keys onto
    contiguous positions: the suffix and the decoded tokens follow them)."""
    if not shift:
        return pos
    if pos.dim() == 3 and pos.shape[0] == 4:
        return torch.cat([pos[:1], pos[1:] - shift])
    return pos - shift


# ----------------------------------------------------------------------------------------------- engine
@dataclass
class Generation:
    token_ids: list[int]
    text: str
    first_logits: torch.Tensor
    record: dict


@dataclass
class Prefilled:
    """One sample after :meth:`Engine.prefill`: its (compressed) cache, the logits of its last prompt position, the
    compressor (None: nothing compressed) and what the record needs."""
    enc: Encoded
    method: Method
    n: int
    s: int
    target: int
    pos: torch.Tensor
    shift: int
    cache: object
    cm: Compressor | None
    mem: MemoryTracker | None
    held: tuple
    logits: torch.Tensor
    prefill_s: float
    position_ids_s: float


class Engine:
    """Runs one method at one budget over encoded prompts. See the module docstring for the flow."""

    #: ``prealloc``: decode through the one path (:func:`avkv.attention.decoding`); ``dynamic``: transformers'
    #: growing cache and the storage's own attention (the path before it; kept for the before/after benchmark and
    #: for ``decode_policy=fixed``, which evicts per step)
    decode_cache = "prealloc"
    #: the compressed chunk's last decoder layer computes its attention output and MLP for the last row only, the
    #: one whose logits are read (:meth:`avkv.compressor.Compressor.stage`, ``last_logits_only``; its cache and what
    #: the method sees are unchanged); False: every row (the before/after check and benchmark)
    last_row_prefill = True

    def __init__(self, adapter: ModelAdapter, method: Method, budget: float = 0.2, budget_tokens: int | None = None,
                 compress_at: str = "question", max_new_tokens: int = 16, mask_only: bool = False):
        if compress_at not in COMPRESS_AT:
            raise ValueError(f"compress_at must be one of {COMPRESS_AT}, got {compress_at!r}")
        if budget_tokens is None and not (0 < budget <= 1):
            raise ValueError(f"budget must be in (0, 1], got {budget}")
        self.adapter, self.method = adapter, method
        self.budget, self.budget_tokens = budget, budget_tokens
        self.compress_at, self.max_new_tokens, self.mask_only = compress_at, max_new_tokens, mask_only
        self.clock = Clock(adapter.device, getattr(adapter, "devices", None))

    def split_point(self, enc: Encoded) -> int:
        n = enc.input_ids.shape[1]
        return {"question": enc.assistant_start, "context": enc.question_start, "prompt": n}[self.compress_at]

    def target_kept(self, n: int) -> int:
        """Prompt KV entries per head and layer the budget allows (the uncompressed suffix counts toward it)."""
        if self.budget_tokens is not None:
            return max(1, min(int(self.budget_tokens), n))
        return max(1, min(n, int(round(self.budget * n))))

    def request(self, enc: Encoded, pos: torch.Tensor | None = None) -> Request:
        """The model-free description of ``enc`` a method receives (``Method.begin``); ``pos``: the prompt's position
        ids when already computed."""
        adapter = self.adapter
        n = int(enc.input_ids.shape[1])
        s = self.split_point(enc)
        tc = adapter.text_config()
        if pos is None:
            pos = adapter.prompt_position_ids(enc).to(adapter.device)
        path = getattr(adapter, "path", None)
        return Request(n_prompt=n, split=s, n_keep=max(self.target_kept(n) - (n - s), 1),
                       num_layers=len(adapter.decoder_layers()), num_heads=int(tc.num_attention_heads),
                       num_kv_heads=int(getattr(tc, "num_key_value_heads", None) or tc.num_attention_heads),
                       modality=enc.modality, layout=enc.layout, question_start=enc.question_start,
                       positions=rotary_rows(pos), family=getattr(adapter, "family", None),
                       model_path=None if path is None else str(path))

    def plan(self, enc: Encoded, method: Method) -> tuple[int, int, int, bool]:
        """(n, s, target, compress) of one sample: its length, split, kept-entry target and whether the method
        compresses it at all (a no-op, or a budget that keeps the whole prefix, does not)."""
        n = int(enc.input_ids.shape[1])
        s = self.split_point(enc)
        target = self.target_kept(n)
        n_keep = target - (n - s)
        compress = not method.is_noop() and n_keep < s
        if n_keep < 1 and compress:
            raise CompressionError(f"budget keeps {target} of {n} prompt entries, fewer than the {n - s} "
                                   f"uncompressed entries after the split (compress_at={self.compress_at})")
        return n, s, target, compress

    @torch.no_grad()
    def prefill(self, enc: Encoded, stack: contextlib.ExitStack, seed: int = 0, method: Method | None = None,
                track_memory: bool = True) -> "Prefilled":
        """Steps 1–3 of the module docstring for one sample: position ids, the compressed prefill of ``[0, s)`` and
        the suffix ``[s, n)`` on the compressed cache. The method's hooks (and the memory tracker, unless
        ``track_memory`` is off) are entered into ``stack``: they stay live for decoding until it closes
        (:mod:`avkv.batching` closes it after the prefill and decodes the batch itself)."""
        method = method or self.method
        adapter, dev = self.adapter, self.adapter.device
        input_ids = enc.input_ids.to(dev)
        n, s, target, compress = self.plan(enc, method)
        mm = adapter.media_inputs(enc)
        tp = self.clock.now()
        pos = adapter.prompt_position_ids(enc).to(dev)   # M-RoPE: the model's own rope index (timed on its own)
        position_ids_s = self.clock.elapsed(tp, self.clock.now())
        from transformers import DynamicCache
        cache = DynamicCache(config=adapter.text_config())
        cm = Compressor(adapter, method, self.request(enc, pos), self.mask_only, seed) if compress else None
        mem = MemoryTracker(dev, getattr(adapter, "devices", None)) if track_memory else None
        if mem is not None:
            stack.enter_context(mem)
        if cm is not None:
            stack.enter_context(cm)
        t0 = self.clock.now()
        # the chunk's logits are read at its last position only (logits_to_keep=1; none at all when a suffix follows)
        # (the uncompressed chunk takes the same path, so full-cache and compressed prefill times compare)
        with cm.stage("prefill", last_logits_only=self.last_row_prefill) if cm else \
                last_row_only(adapter) if self.last_row_prefill else contextlib.nullcontext():
            logits = adapter.forward(input_ids[:, :s], cache, pos[..., :s], mm)
        if cm:
            cm.end_prefill(cache)
        shift = cm.ledger.rope_shift() if cm else 0
        if s < n:
            logits = adapter.forward(input_ids[:, s:], cache, shift_positions(pos[..., s:], shift))
        t1 = self.clock.now()
        held = measure_cache(cache, cm.attn_modules if cm else None)
        return Prefilled(enc=enc, method=method, n=n, s=s, target=target, pos=pos, shift=shift, cache=cache, cm=cm,
                         mem=mem, held=held, logits=logits, prefill_s=self.clock.elapsed(t0, t1),
                         position_ids_s=position_ids_s)

    def sample_record(self, p: "Prefilled") -> dict:
        """The sample's record (:func:`avkv.ledger.write_record`) with its prefill timings; decode fields are the
        caller's."""
        record = write_record(p.cm.ledger if p.cm else None, p.enc, p.cache, p.held, n=p.n, s=p.s, method=p.method,
                              compress_at=self.compress_at, target_kept=p.target,
                              num_heads=self.adapter.text_config().num_attention_heads, mask_only=self.mask_only)
        record.update(prefill_s=p.prefill_s, position_ids_s=p.position_ids_s,
                      compress_s=p.cm.ledger.compress_s if p.cm else 0.0, media_s=p.enc.media_s)
        return record

    @torch.no_grad()
    def generate(self, enc: Encoded, seed: int = 0, method: Method | None = None,
                 max_new_tokens: int | None = None) -> Generation:
        max_new = max_new_tokens or self.max_new_tokens
        adapter, dev = self.adapter, self.adapter.device
        eos = set(adapter.eos_token_ids)
        with contextlib.ExitStack() as stack:
            p = self.prefill(enc, stack, seed, method)
            cm, cache, pos, shift, n = p.cm, p.cache, p.pos, p.shift, p.n
            first_logits = p.logits[0, -1].float().cpu()
            tok = int(p.logits[0, -1].argmax())
            tokens = [tok]
            modules = cm.attn_modules if cm else [layer.self_attn for layer in adapter.decoder_layers()]
            one_path = self.decode_cache == "prealloc" and p.method.decode_policy != "fixed"   # fixed: evicts per step
            tc = self.clock.now()
            dec = decoding(adapter.text_config(), cache, modules, max_new, adapter.cache_sources()) if one_path \
                else contextlib.nullcontext()
            with dec, cm.stage("decode") if cm else contextlib.nullcontext():
                convert_s = self.clock.elapsed(tc, self.clock.now())
                allocated = prealloc_bytes(cache) if one_path else (sum(p.held[1]),) * 2
                p.mem.mark()                              # between the clock's sections: prefill done, decode next
                t2 = self.clock.now()
                steps = 0
                while tok not in eos and len(tokens) < max_new:
                    q = shift_positions(adapter.continue_position_ids(pos, n + steps, 1), shift)
                    logits = adapter.forward(torch.tensor([[tok]], device=dev), cache, q)
                    tok = int(logits[0, -1].argmax())
                    tokens.append(tok)
                    steps += 1
                t3 = self.clock.now()
        decode_s = self.clock.elapsed(t2, t3)
        out_ids = [t for t in tokens if t not in eos]
        record = self.sample_record(p)
        record.update(decode_s_per_token=(decode_s / steps) if steps else None, decode_s=decode_s,
                      new_tokens=len(tokens), peak_mem_bytes=p.mem.peak, peak_mem_kind=p.mem.kind,
                      decode_cache="prealloc" if one_path else "dynamic",
                      decode_convert_s=convert_s, kv_bytes_allocated=allocated[0],
                      kv_bytes_decode_buffer=allocated[1])
        if len(getattr(adapter, "devices", ())) > 1:      # layers spread over devices: where the bytes are
            record.update(devices=[str(d) for d in adapter.devices], peak_mem_by_device=p.mem.by_device,
                          kv_bytes_by_device=kv_bytes_by_device(cache))
        return Generation(token_ids=out_ids, text=adapter.decode(out_ids), first_logits=first_logits, record=record)

    def fidelity(self, enc: Encoded, compressed: Generation, seed: int = 0, max_new_tokens: int | None = None) -> dict:
        """Run the same input with the full cache: token agreement and KL(full ‖ compressed) of the first step."""
        from avkv.methods.full import Full
        ref = self.generate(enc, seed=seed, method=Full(), max_new_tokens=max_new_tokens)
        a, b = compressed.token_ids, ref.token_ids
        m = max(len(a), len(b), 1)
        agree = sum(1 for x, y in zip(a, b) if x == y) / m
        lp, lq = F.log_softmax(ref.first_logits, -1), F.log_softmax(compressed.first_logits, -1)
        kl = float((lp.exp() * (lp - lq)).sum())
        return {"fidelity_token_agreement": agree, "fidelity_first_kl": max(kl, 0.0),
                "fidelity_full_prediction": ref.text}


__all__ = ["Engine", "Generation", "Prefilled", "Compressor", "CompressionError", "RaggedLayer", "Request", "kv_cache_bytes",
           "measure_cache", "kv_bytes_by_device", "within_budget", "rotary_rows", "shift_positions", "COMPRESS_AT",
           "BUDGET_TOLERANCE", "MASKED_IMPL", "Clock", "MemoryTracker"]
