"""The decoder's attention backend during one sample: the one owner of the text config's ``_attn_implementation``.

:class:`AttentionBackend` (a context manager per sample) remembers the model's own backend (sdpa/eager), switches
the decoder to a prefill attention pattern a method installs (:meth:`AttentionBackend.pattern`, PureKV's
ST-SpAttn) or to the masked function once layers hold different lengths (:meth:`AttentionBackend.masked`), and
always restores the model's backend when the sample ends. :func:`base_attention` resolves an implementation name
to its function (also for the patterns, which hand every call they do not handle to the model's backend).

:func:`masked_attention` (registered as ``avkv_masked``) is the decoder attention once layers differ: one function
for every storage (uniform, per-layer lengths, ragged per head, and the masked reference of the equivalence tests).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch

from avkv.kvstore import CompressionError
from avkv.methods.request import AttentionPattern

MASKED_IMPL = "avkv_masked"


def base_attention(impl: str) -> Callable:
    """The attention function of implementation ``impl`` (``eager`` is Qwen2's eager function, which every Qwen
    family and the VLM adapters share)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    if impl == "eager":
        from transformers.models.qwen2.modeling_qwen2 import eager_attention_forward as fn
        return fn
    return ALL_ATTENTION_FUNCTIONS.get(impl, sdpa_attention_forward)


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


def masked_attention(module, query, key, value, attention_mask, **kwargs):
    """The decoder attention once layers differ, on the model's base backend (module attribute
    ``_avkv_base_impl``, set by :meth:`AttentionBackend.masked`).

    * a ragged layer (module attribute ``_avkv_ragged``, :class:`~avkv.kvstore.RaggedLayer`): head by head over its
      segments, each head's query group against its own keys (causal, bottom-right aligned);
    * a plain layer: one call with a causal mask sized for this layer's key length, and the per-KV-head validity
      mask of the masked reference (``mask_only``, module attribute ``_avkv_valid``) when there is one.

    The model's own mask is sized for one layer's cache, so it is not used (the model passes None).
    """
    fn = base_attention(getattr(module, "_avkv_base_impl", "sdpa"))
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


def no_model_mask(*args, **kwargs):
    """Mask function of the avkv backend: none from the model; :func:`masked_attention` builds it per layer."""
    return None


def register_masked_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    AttentionInterface.register(MASKED_IMPL, masked_attention)
    AttentionMaskInterface.register(MASKED_IMPL, no_model_mask)


# ------------------------------------------------------------------------------- the last row of a prefill chunk
LAST_ROW_IMPL = "avkv_last_row"


def last_row_attention(module, query, key, value, attention_mask, **kwargs):
    """The attention of a layer whose output is read only at the chunk's last position (the last decoder layer of a
    prefill chunk whose logits are read at its last position only, :meth:`AttentionBackend.last_row`): the last
    query row against every key, on the function the layer would have used (module attribute ``_avkv_row_impl``),
    i.e. the causal attention's last row, which sees every key; returned broadcast over the chunk's rows (a view:
    the rows before it are never read). The cache the layer wrote is untouched (its keys/values come from every
    row, before this call)."""
    fn = base_attention(module._avkv_row_impl)
    q = query.shape[2]
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4 and attention_mask.shape[-2] == q:
        attention_mask = attention_mask[..., -1:, :]
    out, _ = fn(module, query[:, :, -1:], key, value, attention_mask, **kwargs)
    return out.expand(out.shape[0], q, *out.shape[2:]), None


def register_last_row_attention() -> None:
    from transformers import AttentionInterface
    AttentionInterface.register(LAST_ROW_IMPL, last_row_attention)


# ------------------------------------------------------------------------------------- the one decode path
DECODE_IMPL = "avkv_decode"


def decode_attention(module, query, key, value, attention_mask, **kwargs):
    """The decoder attention over a :class:`~avkv.prealloc.PreallocLayer` (module attribute ``_avkv_decode_layer``),
    the same for every storage: one SDPA call per layer with the layer's boolean validity mask.

    GQA without copying keys: the ``g`` query heads of each KV head (and, for ``q > 1`` new tokens, their rows) are
    packed into the query rows of that KV head, ``[B, kvH, g·q, D]`` against ``[B, kvH, T, D]``. Query row j of
    (b, h) sits at slot ``lengths[b, h] - q + j`` (the layer has already written it) and attends to the valid slots
    up to it. Returns ``[B, q, H, D]`` and no weights. The model's own mask is not used (the model passes None)."""
    layer = module._avkv_decode_layer
    B, H, q, D = query.shape
    kvH, T = key.shape[1], key.shape[2]
    g = H // kvH
    valid = layer.valid[:, :, :T]                                               # [B, kvH, T] (view)
    if q == 1:
        mask = valid[:, :, None, :]                                             # [B, kvH, 1, T]
    else:
        at = layer.lengths[:, :, None] - q + torch.arange(q, device=query.device)          # [B, kvH, q]
        causal = torch.arange(T, device=query.device)[None, None, None, :] <= at[..., None]
        mask = (valid[:, :, None, :] & causal)[:, :, None].expand(B, kvH, g, q, T).reshape(B, kvH, g * q, T)
    qg = query.reshape(B, kvH, g * q, D)
    scale = kwargs.get("scaling")
    if scale is None:
        scale = getattr(module, "scaling", None)
    out = torch.nn.functional.scaled_dot_product_attention(qg, key, value, attn_mask=mask, scale=scale)
    return out.reshape(B, H, q, value.shape[-1]).transpose(1, 2).contiguous(), None


def register_decode_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    AttentionInterface.register(DECODE_IMPL, decode_attention)
    AttentionMaskInterface.register(DECODE_IMPL, no_model_mask)


@contextlib.contextmanager
def decoding(text_config: Any, cache: Any, modules: list, extra: int, sources: list[int] | None = None
             ) -> Iterator[list]:
    """Decode through the one path inside: every layer of ``cache`` converted to a preallocated layer with
    ``extra`` free slots (:func:`~avkv.prealloc.to_prealloc`, one copy; ``sources``: the layer whose cache each
    layer reads, for layers that own none) and the decoder switched to :func:`decode_attention`; the previous
    backend is restored and the modules' layer references dropped on exit (the cache keeps its converted layers).
    Yields the converted layers."""
    from avkv.prealloc import to_prealloc
    layers = to_prealloc(cache, modules, extra, sources)
    register_decode_attention()
    prev = text_config._attn_implementation
    text_config._attn_implementation = DECODE_IMPL
    try:
        yield layers
    finally:
        text_config._attn_implementation = prev
        for m in modules:
            if hasattr(m, "_avkv_decode_layer"):
                delattr(m, "_avkv_decode_layer")


class AttentionBackend:
    """The decoder's ``_attn_implementation`` for one sample (context manager): the model's own backend on entry
    and again on exit, whatever was switched in between."""

    def __init__(self, text_config: Any, modules: list | None = None):
        self.config, self.modules = text_config, list(modules or [])
        self.model_impl = text_config._attn_implementation or "eager"
        self.base_impl = self.model_impl             # what every switch falls back to (route_base may change it)
        if self.base_impl.startswith("avkv_"):
            raise CompressionError(f"the decoder is already switched to {self.base_impl!r} (nested samples?)")

    @property
    def current(self) -> str:
        return self.config._attn_implementation

    def __enter__(self) -> "AttentionBackend":
        return self

    def __exit__(self, *exc) -> bool:
        self.config._attn_implementation = self.base_impl = self.model_impl
        for m in self.modules:
            if hasattr(m, "_avkv_base_impl"):
                delattr(m, "_avkv_base_impl")
        return False

    @contextlib.contextmanager
    def pattern(self, pattern: AttentionPattern) -> Iterator[None]:
        """The decoder attends through ``pattern`` inside (a method's prefill attention), the base backend after."""
        pattern.register(self.base_impl)
        prev = self.current
        self.config._attn_implementation = pattern.name
        try:
            with pattern.activate(base_attention(self.base_impl)):
                yield
        finally:
            self.config._attn_implementation = prev

    def route_base(self, impl: str) -> None:
        """For the whole sample the decoder's base attention is the registered ``impl`` (a drop-in for the model's
        own, e.g. :mod:`avkv.lse_attention`'s SDPA that keeps the prefill's statistics); later switches fall back to
        it."""
        self.base_impl = impl
        self.config._attn_implementation = impl

    def last_row(self, module) -> None:
        """``module`` (the last decoder layer's attention, in its prefill chunk) attends through
        :func:`last_row_attention` on the current function until :meth:`end_last_row`."""
        if self.current == LAST_ROW_IMPL:
            return
        register_last_row_attention()
        module._avkv_row_impl = self.current
        self.config._attn_implementation = LAST_ROW_IMPL

    def end_last_row(self, module) -> None:
        """Back to the function :meth:`last_row` switched from."""
        impl = getattr(module, "_avkv_row_impl", None)
        if impl is not None:
            if self.current == LAST_ROW_IMPL:
                self.config._attn_implementation = impl
            del module._avkv_row_impl

    def masked(self) -> None:
        """From now on every layer attends through :func:`masked_attention` (layers differ in length or per head)."""
        if self.current != MASKED_IMPL:
            register_masked_attention()
            for m in self.modules:
                m._avkv_base_impl = self.base_impl
            self.config._attn_implementation = MASKED_IMPL


class RowBackend(AttentionBackend):
    """The backend of one row of a batched prefill: the decoder's attention is the batch's, so a switch to the
    masked attention is only noted (``wants_masked``); the row's own suffix runs it (:mod:`avkv.batch_prefill`)."""

    wants_masked = False

    def masked(self) -> None:
        self.wants_masked = True

    def route_base(self, impl: str) -> None:
        raise CompressionError("a row of a batched prefill does not switch the decoder's attention")

    def pattern(self, pattern):
        raise CompressionError("a row of a batched prefill has no prefill attention pattern of its own")

    def last_row(self, module) -> None:
        raise CompressionError("a row of a batched prefill does not switch the decoder's attention")

    def __exit__(self, *exc) -> bool:
        return False                       # it switched nothing


__all__ = ["AttentionBackend", "RowBackend", "MASKED_IMPL", "DECODE_IMPL", "LAST_ROW_IMPL", "decode_attention",
           "decoding", "register_decode_attention", "masked_attention", "register_masked_attention", "base_attention",
           "last_row_attention", "register_last_row_attention"]
