"""Prefill → compress → decode, with timing, memory and KV accounting per sample.

Flow for one prompt of n tokens (batch size 1):

1. position ids of the whole prompt come from the model itself (exactly what ``generate`` would use);
2. the prefix ``[0, s)`` is prefilled with the method hooked on every decoder attention layer: at the end of each
   layer's prefill the method sees that layer's cache (:class:`~avkv.methods.base.LayerView`) and the layer's
   cache tensors are replaced by what it keeps — the cache physically shrinks;
3. the rest of the prompt ``[s, n)`` (the assistant preamble, or the question) is fed on the compressed cache with
   its original positions, so even the first answer token sees only the kept entries;
4. greedy decoding continues at logical positions n, n+1, … (never at the pruned cache length).

``compress_at`` picks s: ``question`` (default; s = start of the assistant preamble: query-aware),
``context`` (s = start of the question: query-agnostic, kvpress's protocol) or ``prompt`` (s = n: the first token
comes from the uncompressed prefill, as ``generate``-based implementations do).

Storage: a layer whose KV heads keep the same count stays a plain ``[1, kvH, S, D]`` tensor; a layer whose heads keep
different counts (per-head budgets: AdaKV, MadaKV, AudioKV, ...) becomes a :class:`RaggedLayer`, every head's entries
flattened one after the other with no padding, so the bytes held are the entries kept. Once layers differ (in length
or per head), every decoder layer attends through one function, :func:`_avkv_attention`, which serves every storage
(uniform, per-layer lengths, ragged per head, and the masked reference of the equivalence tests).

Budget conformance: after the prefill the engine counts the entries and bytes each layer and head really holds
(:func:`measure_cache`), and the record says whether they are within ±1 % of the budget (one entry per layer and head
of rounding aside, :func:`within_budget`): ``budget_target``, ``budget_achieved`` (fraction of the full cache's bytes
held), ``budget_held``, and the method's declaration ``budget_mode`` (``held``, or ``achieved`` with a
``budget_reason`` when the method is known not to hold it); a method that misses the budget it claims to hold is
logged once.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from avkv import lse_attention
from avkv.methods.base import MODALITIES, LayerView, Method, Selection, as_record, warn_once
from avkv.models.base import Encoded, ModelAdapter

COMPRESS_AT = ("question", "context", "prompt")
MASKED_IMPL = "avkv_masked"
BUDGET_TOLERANCE = 0.01          # relative: a method holds its budget within ±1 % (plus rounding, see within_budget)

log = logging.getLogger("avkv")


class CompressionError(RuntimeError):
    pass


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def kv_bytes_by_device(cache: Any) -> dict[str, int]:
    """Bytes of key/value tensors held on each device (layers spread over devices by ``model.device_map``)."""
    out: dict[str, int] = {}
    for layer in cache.layers:
        for t in (layer.keys, layer.values):
            if t is not None:
                out[str(t.device)] = out.get(str(t.device), 0) + t.numel() * t.element_size()
    return out


def kv_cache_bytes(cache: Any) -> int:
    """Bytes actually held by a cache's key/value tensors (everything allocated: a masked entry counts)."""
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
               if t is not None)


# --------------------------------------------------------------------------------------- ragged storage
try:
    from transformers.cache_utils import DynamicLayer as _DynamicLayer
except ImportError:  # pragma: no cover - transformers < 4.54 has no cache layers
    _DynamicLayer = object


class RaggedLayer(_DynamicLayer):
    """One decoder layer's cache whose KV heads hold different numbers of entries, stored without padding.

    ``keys``/``values`` are ``[1, 1, T, D]`` with T = Σ_h ``lengths[h]``: head h's entries are rows
    ``offsets[h]:offsets[h+1]``, in cache order (bytes held = entries kept × entry size). :meth:`update` appends each
    head's new entries (decode tokens, the uncompressed suffix) to the end of its own segment, and
    :func:`_avkv_attention` attends head by head over the segments (the layout of AdaKV's varlen FlashAttention path).
    """

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]):
        super().__init__()
        if any(int(k.shape[0]) == 0 for k in keys):
            raise CompressionError("every KV head must keep at least one entry")
        self.num_heads = len(keys)
        self.lengths = [int(k.shape[0]) for k in keys]
        self.keys = torch.cat(keys)[None, None].contiguous()
        self.values = torch.cat(values)[None, None].contiguous()
        self.dtype, self.device = self.keys.dtype, self.keys.device
        self.is_initialized = True

    def offsets(self) -> list[int]:
        out = [0]
        for n in self.lengths:
            out.append(out[-1] + n)
        return out

    def head(self, h: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Head h's keys and values, ``[S_h, D]`` each (views)."""
        o = self.offsets()
        return self.keys[0, 0, o[h]:o[h + 1]], self.values[0, 0, o[h]:o[h + 1]]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        B, kvH, q, _ = key_states.shape
        if B != 1 or kvH != self.num_heads:
            raise CompressionError(f"ragged cache layer holds {self.num_heads} KV heads of batch 1, got "
                                   f"{tuple(key_states.shape)}")
        ks, vs = [], []
        for h in range(kvH):
            k, v = self.head(h)
            ks += [k, key_states[0, h].to(self.dtype)]
            vs += [v, value_states[0, h].to(self.dtype)]
        self.keys, self.values = torch.cat(ks)[None, None], torch.cat(vs)[None, None]
        self.lengths = [n + q for n in self.lengths]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return max(self.lengths)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a ragged (per-head) cache layer cannot be cropped")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("a ragged (per-head) cache layer holds batch size 1")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("a ragged (per-head) cache layer holds batch size 1")


def measure_cache(cache: Any, modules: list | None = None) -> tuple[list[list[int]], list[int]]:
    """Entries each KV head of each layer really attends to, and the bytes each layer holds.

    A :class:`RaggedLayer` counts its segments; a plain layer counts its length for every head, less the entries a
    masked reference (``mask_only``, module attribute ``_avkv_valid``) hides — those still count in the bytes.
    """
    entries, nbytes = [], []
    for i, layer in enumerate(cache.layers):
        nbytes.append(sum(t.numel() * t.element_size() for t in (layer.keys, layer.values) if t is not None))
        if isinstance(layer, RaggedLayer):
            entries.append(list(layer.lengths))
            continue
        kvH, S = layer.keys.shape[1], layer.keys.shape[2]
        valid = getattr(modules[i], "_avkv_valid", None) if modules is not None else None
        if valid is None:
            entries.append([int(S)] * kvH)
        else:
            entries.append([int(c) + (S - valid.shape[1]) for c in valid.sum(-1).tolist()])
    return entries, nbytes


def within_budget(ratio: float, target: float, n: int, tol: float = BUDGET_TOLERANCE) -> bool:
    """The budget rule: ``ratio`` is within ±``tol`` of ``target`` relative to it, plus one entry (1/n) of rounding
    (each layer and head keeps whole entries)."""
    return abs(ratio - target) <= tol * target + 1.0 / max(n, 1) + 1e-12


# ----------------------------------------------------------------------------------------------- attention
def _base_attention(module):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    base = getattr(module, "_avkv_base_impl", "sdpa")
    if base == "eager":
        from transformers.models.qwen2.modeling_qwen2 import eager_attention_forward as fn
        return fn
    return ALL_ATTENTION_FUNCTIONS.get(base, sdpa_attention_forward)


def _causal_bias(q_len: int, k_len: int, query: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Additive bias [1, h, q, k]: causal, bottom-right aligned (the queries are the newest entries), and
    ``valid`` [h, ≤k] hiding cached entries per head (entries past ``valid`` are the new ones, always visible)."""
    allowed = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(k_len - q_len)[None, None]
    if valid is not None:
        groups = query.shape[1] // valid.shape[0]
        v = torch.cat([valid, valid.new_ones(valid.shape[0], k_len - valid.shape[1])], dim=-1)
        allowed = allowed & v.repeat_interleave(groups, 0)[None, :, None, :]                 # [1, H, q, k]
    return torch.zeros(allowed.shape, dtype=query.dtype, device=query.device).masked_fill(
        ~allowed, torch.finfo(query.dtype).min)


def _avkv_attention(module, query, key, value, attention_mask, **kwargs):
    """The decoder attention once layers differ: one function for every storage, on the model's base backend
    (sdpa/eager).

    * :class:`RaggedLayer` (module attribute ``_avkv_ragged``): head by head over its segments, each head's query
      group against its own keys (causal, bottom-right aligned);
    * a plain layer: one call with a causal mask sized for this layer's key length, and the per-KV-head validity
      mask of the masked reference (``mask_only``) when there is one.

    The model's own mask is sized for one layer's cache, so it is not used (the model passes None, see
    :func:`_register_masked_attention`).
    """
    fn = _base_attention(module)
    q_len = query.shape[2]
    ragged = getattr(module, "_avkv_ragged", None)
    if ragged is not None:
        H, kvH = query.shape[1], ragged.num_heads
        g = H // kvH
        outs, start = [], 0
        for h, n in enumerate(ragged.lengths):
            k, v = key[:, :, start:start + n], value[:, :, start:start + n]
            start += n
            bias = _causal_bias(q_len, n, query[:, :g]) if q_len > 1 else None
            out, _ = fn(module, query[:, h * g:(h + 1) * g], k, v, bias, **kwargs)
            outs.append(out)                                                  # [1, q, g, D]
        return torch.cat(outs, dim=2), None
    valid = getattr(module, "_avkv_valid", None)
    k_len = key.shape[2]
    if valid is None and q_len == 1 and attention_mask is None:
        return fn(module, query, key, value, None, **kwargs)
    bias = _causal_bias(q_len, k_len, query, valid)
    if attention_mask is not None and attention_mask.shape[-1] >= k_len and attention_mask.shape[-2] == q_len:
        am = attention_mask[..., -k_len:]
        allowed = am if am.dtype == torch.bool else am == 0
        bias = bias.masked_fill(~allowed, torch.finfo(query.dtype).min)
    return fn(module, query, key, value, bias, **kwargs)


def _no_model_mask(*args, **kwargs):
    """Mask function of the avkv backend: none from the model; :func:`_avkv_attention` builds it per layer."""
    return None


def _register_masked_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    AttentionInterface.register(MASKED_IMPL, _avkv_attention)
    AttentionMaskInterface.register(MASKED_IMPL, _no_model_mask)


# ------------------------------------------------------------------------------------------- measurement
class PeakRSS:
    """Peak resident memory of this process (bytes), sampled every ``interval`` s in a thread (CPU only).

    It includes weights, activations and allocator slack, not only the KV cache: it is the process peak.
    """

    def __init__(self, interval: float = 0.002):
        import psutil
        self.proc, self.interval, self.peak = psutil.Process(), interval, 0
        self._stop = threading.Event()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self):
        self.peak = self.proc.memory_info().rss
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


class Clock:
    """Wall-clock sections: CUDA events on one GPU, perf_counter on CPU; with layers on several GPUs
    (``model.device_map``) every one of them is synchronized and perf_counter read, since one device's events do
    not see the others' work."""

    def __init__(self, device: torch.device, devices: list | None = None):
        gpus = {torch.device(d) for d in (devices or [device]) if torch.device(d).type == "cuda"}
        self.sync = sorted(gpus, key=str) if len(gpus) > 1 else []
        self.cuda = device.type == "cuda" and not self.sync

    def now(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        for d in self.sync:
            torch.cuda.synchronize(d)
        return time.perf_counter()

    def elapsed(self, a, b) -> float:
        if self.cuda:
            b.synchronize()
            return a.elapsed_time(b) / 1000.0
        return b - a


# ----------------------------------------------------------------------------------------------- hooks
@dataclass
class _Request:
    modality: torch.Tensor                     # [n]
    n_prompt: int
    split: int
    n_keep: int                                # per KV head, for the compressed chunk
    generator: torch.Generator
    layout: dict
    state: dict = field(default_factory=dict)
    kept: dict = field(default_factory=dict)   # layer -> [kvH] kept prompt-chunk entries
    mod_kept: dict = field(default_factory=dict)   # layer -> {modality: count summed over heads}
    info: dict = field(default_factory=dict)
    compress_s: float = 0.0
    ragged: bool = False                       # some layer is stored per head (RaggedLayer)
    positions: torch.Tensor | None = None      # rotary position ids of the prompt [R, n] (R = 1, or 3 for M-RoPE)
    question_start: int | None = None          # first question token (FINCH's window: the question)


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


class Compressor:
    """Installs the method on every decoder attention layer for one request (context manager)."""

    def __init__(self, adapter: ModelAdapter, method: Method, request: _Request, mask_only: bool = False):
        self.adapter, self.method, self.req, self.mask_only = adapter, method, request, mask_only
        self.layers = adapter.decoder_layers()
        self.num_layers = len(self.layers)
        self.phase = "idle"
        self.pending: dict = {}                # deferred methods: layer -> (module, modality, n_keep)
        self.handles: list = []
        self.attn_modules = [layer.self_attn for layer in self.layers]
        self.text_config = adapter.text_config()
        self.base_impl = self.text_config._attn_implementation or "eager"
        self.clock = Clock(adapter.device, getattr(adapter, "devices", None))

    def __enter__(self):
        if self.method.requires_attentions and self.base_impl != "eager":
            raise CompressionError(f"method {self.method.name!r} reads attention weights and needs "
                                   f"model.attn_implementation=eager (got {self.base_impl!r})")
        for i, m in enumerate(self.attn_modules):
            m._avkv_layer = i
            self.handles.append(m.register_forward_hook(self._hook, with_kwargs=True))
        lse_attention.install(self)          # all-query methods: queries and row log-sum-exps from the prefill
        self.method.begin({"model": self.adapter.model, "adapter": self.adapter, "layers": self.layers,
                           "modality": self.req.modality, "n_prompt": self.req.n_prompt, "split": self.req.split,
                           "layout": self.req.layout, "state": self.req.state, "n_keep": self.req.n_keep,
                           "question_start": self.req.question_start})
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []
        for m in self.attn_modules:
            for attr in ("_avkv_valid", "_avkv_ragged", "_avkv_base_impl", "_avkv_layer"):
                if hasattr(m, attr):
                    delattr(m, attr)
        if self.text_config._attn_implementation == MASKED_IMPL:
            self.text_config._attn_implementation = self.base_impl
        lse_attention.uninstall(self)
        self.method.end()

    # ------------------------------------------------------------------------------------------------
    def end_prefill(self, cache) -> None:
        """After the compressed chunk: run deferred compressions (methods that allocate across layers see every
        layer first), then give layers whose caches now differ in length per-layer masks. A method that scores
        from a context reconstruction (``needs_reconstruction``: KVzip) gets it first (``avkv/reconstruct.py``;
        its time is in ``compress_s`` and, on its own, ``reconstruct_s``)."""
        if getattr(self.method, "needs_reconstruction", False) and self.pending:
            from avkv.reconstruct import reconstruct
            self.req.compress_s += reconstruct(self, cache)
        if self.pending:
            t0 = self.clock.now()
            for i in sorted(self.pending):
                module, modality, n_keep = self.pending[i]
                layer = cache.layers[i]
                view = self._view(module, None, layer.keys[0], layer.values[0], modality, n_keep)
                self._apply(module, cache, i, self.method.compress(view), modality, record=True)
            self.pending = {}
            self.req.compress_s += self.clock.elapsed(t0, self.clock.now())
        lengths = {layer.keys.shape[2] for layer in cache.layers if layer.keys is not None and layer.keys.numel()}
        if len(lengths) > 1:
            self._use_masks()

    def _use_masks(self):
        if self.text_config._attn_implementation != MASKED_IMPL:
            _register_masked_attention()
            for m in self.attn_modules:
                m._avkv_base_impl = self.base_impl
            self.text_config._attn_implementation = MASKED_IMPL

    def _view(self, module, kwargs, keys, values, modality, n_keep, attentions=None, decode=False) -> LayerView:
        """``kwargs`` None: a deferred compression after the forward, where no hidden states (queries) remain."""
        h = kwargs["hidden_states"] if kwargs is not None else None
        cos, sin = kwargs["position_embeddings"] if kwargs is not None else (None, None)
        S = keys.shape[1]

        def query_fn(a: int, b: int) -> torch.Tensor:
            if h is None:
                raise CompressionError("deferred compression has no queries: compute scores in observe()")
            if decode:                                  # only the newest positions exist in this forward
                if b != S or b - a > h.shape[1]:
                    raise CompressionError("during decode only the newest queries are available")
                a, b = h.shape[1] - (b - a), h.shape[1]
            return self.adapter.layer_queries(module, h[:, a:b], (cos[:, a:b], sin[:, a:b]))

        idx = module._avkv_layer
        positions = self.req.positions
        if positions is not None and not decode:
            lp = self.req.state.get("layer_positions", {}).get(idx)
            positions = positions[:, :S] if lp is None else positions[:, lp]
        else:
            positions = None
        return LayerView(layer_idx=idx, num_layers=self.num_layers, keys=keys, values=values, modality=modality,
                         n_keep=n_keep, num_heads=module.config.num_attention_heads, scaling=module.scaling,
                         state=self.req.state, generator=self.req.generator, query_fn=query_fn,
                         attentions=attentions, layout=self.req.layout,
                         value_norm_fn=lambda: values.float().norm(dim=-1), positions=positions,
                         rope_fn=self._rope, out_weight_fn=lambda: self.adapter.output_weight(module))

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) [T, D] of rotary position ids [R, T], from the decoder's own rotary embedding."""
        rot = getattr(self, "_rotary", None)
        if rot is None:
            rot = self._rotary = self.adapter.rotary_embedding()
        p = positions.to(self.adapter.device)                   # [R, T]
        pid = p[:, None] if p.shape[0] == 3 else p               # M-RoPE [3, 1, T]; 1-D [1, T]
        x = torch.zeros(1, dtype=self.adapter.dtype, device=self.adapter.device)
        cos, sin = rot(x, pid)
        return cos[0].float(), sin[0].float()

    @torch.no_grad()
    def _hook(self, module, args, kwargs, output):
        if self.phase not in ("prefill", "decode"):
            return
        if self.phase == "decode" and self.method.decode_policy != "fixed":
            return
        cache = kwargs.get("past_key_values")
        if cache is None:
            raise CompressionError("the decoder was called without a cache; the engine always passes one")
        i = module._avkv_layer
        layer = cache.layers[i]
        t0 = self.clock.now()
        attn = output[1][0] if isinstance(output, tuple) and len(output) > 1 and output[1] is not None else None
        if self.phase == "prefill":
            if i in self.req.kept or i in self.pending:   # each layer is compressed once, at the end of its chunk
                return
            positions = self.req.state.get("layer_positions", {}).get(i)
            S = layer.keys.shape[2]
            modality = self.req.modality[: S] if positions is None else self.req.modality[positions]
            modality = modality.to(layer.keys.device)      # layers may sit on different devices (device_map)
            n_keep = min(self.req.n_keep, S)
            view = lse_attention.attach(self._view(module, kwargs, layer.keys[0], layer.values[0], modality, n_keep,
                                                   attn), module)
            if self.method.deferred:          # scores now, selection once every layer has been seen
                self.method.observe(view)
                self.pending[i] = (module, modality, n_keep)
            else:
                sel = self.method.compress(view)
                self._apply(module, cache, i, sel, modality, record=True)
        else:
            if isinstance(layer, RaggedLayer):
                raise CompressionError(f"{self.method.name}: fixed-size decoding over a ragged (per-head) cache "
                                       "layer is not implemented; use decode_policy=grow")
            S = layer.keys.shape[2]
            target = self.req.state.setdefault("decode_size", {}).setdefault(i, S - 1)
            if S > target:
                view = self._view(module, kwargs, layer.keys[0], layer.values[0],
                                  torch.zeros(S, dtype=torch.long, device=layer.keys.device), target, attn, decode=True)
                sel = self.method.decode_step(view)
                if sel is not None:
                    self._apply(module, cache, i, sel, None, record=False)
        self.req.compress_s += self.clock.elapsed(t0, self.clock.now())

    def _apply(self, module, cache, i: int, sel: Selection, modality, record: bool):
        """Replace layer ``i``'s cache by what ``sel`` keeps: a plain tensor when every head keeps as many
        entries, a :class:`RaggedLayer` (no padding) when they differ, or — ``mask_only`` — the full cache with
        the dropped entries masked (the equivalence tests' reference)."""
        layer = cache.layers[i]
        K, V = layer.keys[0], layer.values[0]
        kvH, S, D = K.shape
        idx = sel.indices.to(K.device).long()
        if idx.dim() != 2 or idx.shape[0] != kvH:
            raise CompressionError(f"{self.method.name}: Selection.indices must be [kv_heads={kvH}, k], "
                                   f"got {tuple(idx.shape)}")
        if (idx < 0).any() or (idx >= S).any():
            raise CompressionError(f"{self.method.name}: Selection.indices out of range [0, {S})")
        valid = sel.valid.to(K.device) if sel.valid is not None else None
        if valid is not None and bool(valid.all()):
            valid = None
        g = idx.unsqueeze(-1).expand(-1, -1, D)
        newK = sel.keys.to(K.dtype) if sel.keys is not None else K.gather(1, g)
        newV = sel.values.to(V.dtype) if sel.values is not None else V.gather(1, g)
        if self.mask_only:                  # keep every entry, mask what the method dropped (equivalence tests)
            keep = torch.zeros(kvH, S, dtype=torch.bool, device=K.device)
            rows = torch.arange(kvH, device=K.device)[:, None].expand_as(idx)
            real = torch.ones_like(idx, dtype=torch.bool) if valid is None else valid
            keep[rows[real], idx[real]] = True         # padding repeats an index: it must not unset a real one
            K2, V2 = K.clone(), V.clone()
            K2[rows[real], idx[real]] = newK[real]
            V2[rows[real], idx[real]] = newV[real]
            layer.keys, layer.values = K2[None], V2[None]
            module._avkv_valid = keep
            self._use_masks()
        elif valid is None:
            layer.keys, layer.values = newK[None].contiguous(), newV[None].contiguous()
        else:                               # heads keep different counts: per-head segments, no padding
            ragged = RaggedLayer([newK[h][valid[h]] for h in range(kvH)], [newV[h][valid[h]] for h in range(kvH)])
            cache.layers[i] = ragged
            module._avkv_ragged = ragged
            self.req.ragged = True
            self._use_masks()
        if record:
            counts = valid.sum(-1) if valid is not None else torch.full((kvH,), idx.shape[1])
            self.req.kept[i] = counts.tolist()
            m = modality[idx] if valid is None else modality[idx][valid]
            self.req.mod_kept[i] = {name: int((m == c).sum()) for c, name in enumerate(MODALITIES)}
            if sel.info:
                self.req.info[i] = as_record(sel.info)
            self.req.state.setdefault("decode_size", {})[i] = idx.shape[1] + (self.req.n_prompt - self.req.split)


# ----------------------------------------------------------------------------------------------- engine
@dataclass
class Generation:
    token_ids: list[int]
    text: str
    first_logits: torch.Tensor
    record: dict


class Engine:
    """Runs one method at one budget over encoded prompts. See the module docstring for the flow."""

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

    @torch.no_grad()
    def generate(self, enc: Encoded, seed: int = 0, method: Method | None = None,
                 max_new_tokens: int | None = None) -> Generation:
        method = method or self.method
        max_new = max_new_tokens or self.max_new_tokens
        adapter, dev = self.adapter, self.adapter.device
        input_ids = enc.input_ids.to(dev)
        n = input_ids.shape[1]
        s = self.split_point(enc)
        target = self.target_kept(n)
        n_keep = target - (n - s)
        compress = not method.is_noop() and n_keep < s
        if n_keep < 1 and compress:
            raise CompressionError(f"budget keeps {target} of {n} prompt entries, fewer than the {n - s} "
                                   f"uncompressed entries after the split (compress_at={self.compress_at})")
        mm = adapter.media_inputs(enc)
        pos = adapter.prompt_position_ids(enc).to(dev)
        from transformers import DynamicCache
        cache = DynamicCache(config=adapter.text_config())
        gen = torch.Generator().manual_seed(int(seed))
        req = _Request(modality=enc.modality.to(dev), n_prompt=n, split=s, n_keep=max(n_keep, 1), generator=gen,
                       layout=enc.layout, positions=rotary_rows(pos), question_start=enc.question_start)
        eos = set(adapter.eos_token_ids)
        cm = Compressor(adapter, method, req, self.mask_only) if compress else contextlib.nullcontext()
        mem = _memory_tracker(dev, getattr(adapter, "devices", None))
        with mem, cm:
            t0 = self.clock.now()
            if compress:
                cm.phase = "prefill"
            logits = adapter.forward(input_ids[:, :s], cache, pos[..., :s], mm)
            if compress:
                cm.phase = "idle"
                cm.end_prefill(cache)
            shift = _rope_shift(req) if compress else 0
            if s < n:
                logits = adapter.forward(input_ids[:, s:], cache, shift_positions(pos[..., s:], shift))
            t1 = self.clock.now()
            held = measure_cache(cache, cm.attn_modules if compress else None)
            first_logits = logits[0, -1].float().cpu()
            tok = int(logits[0, -1].argmax())
            tokens = [tok]
            if compress:
                cm.phase = "decode"
            t2 = self.clock.now()
            steps = 0
            while tok not in eos and len(tokens) < max_new:
                p = shift_positions(adapter.continue_position_ids(pos, n + steps, 1), shift)
                logits = adapter.forward(torch.tensor([[tok]], device=dev), cache, p)
                tok = int(logits[0, -1].argmax())
                tokens.append(tok)
                steps += 1
            t3 = self.clock.now()
        prefill_s = self.clock.elapsed(t0, t1)
        decode_s = self.clock.elapsed(t2, t3)
        out_ids = [t for t in tokens if t not in eos]
        record = self._record(enc, cache, req if compress else None, n, s, held, method, compress)
        record.update(prefill_s=prefill_s, compress_s=req.compress_s if compress else 0.0,
                      decode_s_per_token=(decode_s / steps) if steps else None, decode_s=decode_s,
                      new_tokens=len(tokens), peak_mem_bytes=mem.peak, peak_mem_kind=mem.kind,
                      media_s=enc.media_s)
        if len(getattr(adapter, "devices", ())) > 1:      # layers spread over devices: where the bytes are
            record.update(devices=[str(d) for d in adapter.devices], peak_mem_by_device=mem.by_device,
                          kv_bytes_by_device=kv_bytes_by_device(cache))
        return Generation(token_ids=out_ids, text=adapter.decode(out_ids), first_logits=first_logits, record=record)

    def _record(self, enc, cache, req, n, s, held, method, compressed) -> dict:
        """The sample's accounting, from what the cache really holds after the prefill (``held``, see
        :func:`measure_cache`): entries per layer and head, bytes, and the budget check."""
        tc = self.adapter.text_config()
        entries, nbytes = held
        L = len(cache.layers)
        kvH = len(entries[0])
        D = cache.layers[0].keys.shape[-1]
        el = cache.layers[0].keys.element_size()
        kv_full = 2 * L * kvH * n * D * el
        kv_kept = sum(nbytes)
        suffix = n - s
        per_layer = [sum(e) / kvH for e in entries]
        total = {name: int((enc.modality == c).sum()) for c, name in enumerate(MODALITIES)}
        if req is None or not req.kept:
            by_mod = {m: {"kept": float(total[m]), "total": total[m]} for m in MODALITIES if total[m]}
        else:
            for i, counts in req.kept.items():          # what the method selected = what the cache holds
                if [c + suffix for c in counts] != entries[i]:
                    raise CompressionError(f"layer {i}: the method kept {counts} (+{suffix} suffix) entries per "
                                           f"head but the cache holds {entries[i]}")
            by_mod = {}
            suffix_mod = {name: int((enc.modality[s:] == c).sum()) for c, name in enumerate(MODALITIES)}
            for c, m in enumerate(MODALITIES):
                if not total[m]:
                    continue
                kept = [req.mod_kept[i][m] / kvH if i in req.mod_kept else total[m] - suffix_mod[m]
                        for i in range(L)]
                by_mod[m] = {"kept": sum(kept) / L + suffix_mod[m], "total": total[m]}
        for v in by_mod.values():
            v["ratio"] = v["kept"] / v["total"]
        kept_ratio = sum(per_layer) / (L * n)
        target = self.target_kept(n) / n
        rec = {
            "n_prompt": n, "split": s, "compress_at": self.compress_at, "compressed": compressed,
            "kv_bytes_full": kv_full, "kv_bytes_kept": kv_kept, "kv_bytes_ratio": kv_kept / kv_full,
            "kept_ratio": kept_ratio, "kept_by_modality": by_mod,
            "kept_per_layer": per_layer, "decode_policy": method.decode_policy,
            "modalities_used": enc.modalities_used, "input_notes": enc.notes, "layers": L, "kv_heads": kvH,
            "num_heads": tc.num_attention_heads,
            "kv_storage": "masked" if self.mask_only and compressed else
                          "ragged" if req is not None and req.ragged else "dense",
        }
        if enc.preprocessing:
            rec["preprocessing"] = enc.preprocessing          # what the model was fed (frames, sizes, audio s)
        if any(len(set(e)) > 1 for e in entries):
            rec["kept_per_head"] = [[c - suffix for c in e] for e in entries]
        if req is not None and req.info:
            rec["method_info"] = {str(k): v for k, v in sorted(req.info.items())}
        if req is not None and req.state.get("record"):
            rec.update(as_record(req.state["record"]))
        rec.update(self._budget(method, rec, target, n))
        return rec

    def _budget(self, method: Method, rec: dict, target: float, n: int) -> dict:
        """Budget conformance of one sample: the target, the fraction of the full cache's bytes held, whether
        entries and bytes are both within the rule (:func:`within_budget`), and the method's declaration."""
        held = within_budget(rec["kept_ratio"], target, n) and within_budget(rec["kv_bytes_ratio"], target, n)
        if method.is_noop():
            mode, reason = "full", "the full cache: nothing is compressed"
        else:
            mode = getattr(method, "budget_mode", "held")
            reason = getattr(method, "budget_reason", None)
        out = {"budget_target": target, "budget_achieved": rec["kv_bytes_ratio"], "budget_held": held,
               "budget_mode": mode}
        if reason:
            out["budget_reason"] = reason
        if not held and mode == "held" and not rec.get("budget_infeasible") and not self.mask_only:
            warn_once(("budget", method.name, round(target, 4)),
                      "%s holds %.3f of the cache's entries and %.3f of its bytes at budget %.3f; it claims to hold "
                      "the budget (budget_mode=held): the record has budget_held=false", method.name,
                      rec["kept_ratio"], rec["kv_bytes_ratio"], target)
        return out

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


def _rope_shift(req: _Request) -> int:
    """How far a re-rotating method moved the positions (``state['rope_shift']``, one value per layer): the suffix
    and the decoded tokens move by as much, so they follow the re-rotated keys. Every layer must agree."""
    shifts = req.state.get("rope_shift")
    if not shifts:
        return 0
    values = set(shifts.values())
    if len(values) != 1 or len(shifts) != len(req.kept):
        raise CompressionError(f"re-rotated layers moved their positions by different amounts {sorted(values)}: "
                               "key re-rotation needs the same kept count in every layer")
    return int(values.pop())


class _memory_tracker:
    """Peak memory over a sample: CUDA ``max_memory_allocated`` on GPU (summed over every GPU holding layers, each in
    ``by_device``), process peak RSS on CPU."""

    def __init__(self, device: torch.device, devices: list | None = None):
        self.device, self.peak, self.by_device = device, 0, {}
        self.gpus = sorted({torch.device(d) for d in (devices or [device]) if torch.device(d).type == "cuda"}, key=str)
        if device.type == "cuda" and device not in self.gpus:
            self.gpus.append(device)
        self.kind = ("cuda_max_allocated" if len(self.gpus) <= 1 else "cuda_max_allocated_sum") if self.gpus \
            else "cpu_process_peak_rss"

    def __enter__(self):
        if self.gpus:
            for d in self.gpus:
                torch.cuda.synchronize(d)
                torch.cuda.reset_peak_memory_stats(d)
        else:
            self._rss = PeakRSS().__enter__()
        return self

    def __exit__(self, *exc):
        if self.gpus:
            for d in self.gpus:
                torch.cuda.synchronize(d)
                self.by_device[str(d)] = int(torch.cuda.max_memory_allocated(d))
            self.peak = sum(self.by_device.values())
        else:
            self._rss.__exit__(*exc)
            self.peak = int(self._rss.peak)
            self.by_device = {"cpu": self.peak}
        return False


__all__ = ["Engine", "Generation", "Compressor", "CompressionError", "RaggedLayer", "kv_cache_bytes", "measure_cache",
           "kv_bytes_by_device",
           "within_budget", "COMPRESS_AT", "BUDGET_TOLERANCE"]
