"""What a decoder layer takes, narrowed: the chunk positions a hidden-state-pruning method keeps
(:func:`slice_inputs`, for :class:`~avkv.compressor.Compressor`'s pruning hooks) and the last row of the prefill
chunk in the last decoder layer, the only one whose output anyone reads (:func:`last_row_hooks`)."""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch

#: what makes the last layer's rows before the last one matter to the method: an attention pattern of its own,
#: hidden states pruned or captured for a reconstruction (no restriction at all)
LAST_ROW_UNSUPPORTED = ("prefill_attention", "prunes_hidden_states", "needs_reconstruction")
#: what the method reads from the last layer's attention of every row (eager weights, the all-query statistics):
#: that attention runs over every row, and only the output projection and the MLP take the last row
EVERY_ROW_ATTENTION = ("requires_attentions", "all_query_stats")


def irregular_cache(adapter: Any) -> bool:
    """A cache that is not one full-attention K/V per layer (sliding windows, KV-shared layers: Gemma-3n)."""
    return any(w is not None for w in adapter.layer_windows()) or \
        any(j != i for i, j in enumerate(adapter.cache_sources()))


@contextlib.contextmanager
def last_row_only(adapter: Any) -> Iterator[None]:
    """:func:`last_row_hooks` on the last decoder layer of an uncompressed prefill chunk (no method, the full cache),
    so that its prefill takes the same path as a compressed chunk's and the two times compare; nothing on an
    irregular cache (as :class:`~avkv.compressor.Compressor`)."""
    if irregular_cache(adapter):
        yield
        return
    from avkv.attention import AttentionBackend
    layers = adapter.decoder_layers()
    attn = layers[-1].self_attn
    backend = AttentionBackend(adapter.text_config(), [layer.self_attn for layer in layers])
    handles = last_row_hooks(layers[-1], attn, backend, lambda: True)
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        backend.end_last_row(attn)


def last_row_hooks(layer: torch.nn.Module, attn: torch.nn.Module, backend: Any,
                   in_prefill: Callable[[], bool], attention: bool = True) -> list:
    """Hooks that restrict ``layer`` (the last decoder layer) to the chunk's last row where the rest is read by no
    one: the model reads the logits of the last position only, and the method sees the layer's keys, values and
    input hidden states (every row, computed as before), not its attention output. While ``in_prefill()`` and the
    layer takes one sequence of more than one row, its attention switches to
    :func:`~avkv.attention.last_row_attention` through ``backend.last_row`` (its keys/values and cache write are
    unchanged) and the output projection and MLP take the last row only (both act per position; the residual
    broadcasts it). ``attention=False`` (a method in :data:`EVERY_ROW_ATTENTION`): the attention runs over every
    row as before and only the output projection and the MLP take the last row. Returns the handles; the caller
    removes them and calls ``backend.end_last_row(attn)``."""
    on = {"rows": False}

    def switch(module, args, kwargs):
        h = kwargs.get("hidden_states", args[0] if args else None)
        on["rows"] = in_prefill() and isinstance(h, torch.Tensor) and h.dim() == 3 and h.shape[0] == 1 and \
            h.shape[1] > 1
        if on["rows"] and attention:
            backend.last_row(module)

    def restore(module, args, kwargs, output):
        backend.end_last_row(module)

    def last_row_input(module, args, kwargs):
        if not on["rows"]:
            return None
        if args and isinstance(args[0], torch.Tensor) and args[0].dim() == 3:
            return (args[0][:, -1:],) + tuple(args[1:]), kwargs
        h = kwargs.get("hidden_states")
        if isinstance(h, torch.Tensor) and h.dim() == 3:
            return args, dict(kwargs, hidden_states=h[:, -1:])
        return None

    def layer_done(module, args, output):
        on["rows"] = False

    handles = [attn.register_forward_pre_hook(switch, with_kwargs=True),
               attn.register_forward_hook(restore, with_kwargs=True, prepend=True),   # before the method's hook
               layer.register_forward_hook(layer_done)]
    for sub in (getattr(attn, "o_proj", None), getattr(layer, "mlp", None)):
        if isinstance(sub, torch.nn.Module):
            handles.append(sub.register_forward_pre_hook(last_row_input, with_kwargs=True))
    return handles


def slice_inputs(args: tuple, kwargs: dict, h: torch.Tensor, keep: torch.Tensor, S: int) -> tuple[tuple, dict]:
    """The decoder-layer inputs of the chunk restricted to ``keep``: hidden states ``h`` (already restricted),
    rotary cos/sin, position ids (1-D or M-RoPE) and a 4-D mask, each only where it is sized for the full chunk
    of ``S`` positions."""
    kwargs = dict(kwargs)
    if args:
        args = (h,) + tuple(args[1:])
    else:
        kwargs["hidden_states"] = h
    pe = kwargs.get("position_embeddings")
    if pe is not None:
        kwargs["position_embeddings"] = tuple(_take(t, keep, -2, S) for t in pe)
    pid = kwargs.get("position_ids")
    if pid is not None:
        kwargs["position_ids"] = _take(pid, keep, -1, S)
    mask: Any = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 4:
        kwargs["attention_mask"] = _take(_take(mask, keep, -1, S), keep, -2, S)
    return args, kwargs


def _take(t: torch.Tensor, keep: torch.Tensor, dim: int, S: int) -> torch.Tensor:
    return t.index_select(dim, keep.to(t.device)) if t.shape[dim] == S else t


__all__ = ["EVERY_ROW_ATTENTION", "LAST_ROW_UNSUPPORTED", "irregular_cache", "last_row_only", "last_row_hooks",
           "slice_inputs"]
