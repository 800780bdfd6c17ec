"""KV storage and what it holds: per-head ragged layers, physical application of a selection, byte counting.

A layer whose KV heads keep the same count stays a plain ``[1, kvH, S, D]`` tensor; a layer whose heads keep
different counts (per-head budgets: AdaKV, MadaKV, AudioKV, ...) becomes a :class:`RaggedLayer`, every head's
entries flattened one after the other with no padding, so the bytes held are the entries kept. ``mask_only`` (the
equivalence tests' reference) keeps every entry and masks what the method dropped.
"""
from __future__ import annotations

from typing import Any

import torch

BUDGET_TOLERANCE = 0.01          # relative: a method holds its budget within ±1 % (plus rounding, see within_budget)


class CompressionError(RuntimeError):
    pass


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
    from transformers.cache_utils import DynamicLayer
except ImportError:  # pragma: no cover - transformers < 4.54 has no cache layers
    DynamicLayer = object


class RaggedLayer(DynamicLayer):
    """One decoder layer's cache whose KV heads hold different numbers of entries, stored without padding.

    ``keys``/``values`` are ``[1, 1, T, D]`` with T = Σ_h ``lengths[h]``: head h's entries are rows
    ``offsets[h]:offsets[h+1]``, in cache order (bytes held = entries kept × entry size). :meth:`update` appends each
    head's new entries (decode tokens, the uncompressed suffix) to the end of its own segment, and
    :func:`avkv.attention.masked_attention` attends head by head over the segments (the layout of AdaKV's varlen FlashAttention path).
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


# ----------------------------------------------------------------------------------- preallocated decode storage
def apply_selection(cache: Any, i: int, module: Any, sel: Any, name: str, mask_only: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    """Replace layer ``i``'s cache by what ``sel`` (a :class:`~avkv.methods.base.Selection`) keeps: a plain tensor
    when every head keeps as many entries, a :class:`RaggedLayer` (no padding) when they differ, or — ``mask_only``
    — the full cache with the dropped entries masked. Returns the kept indices [kvH, k], their validity (None when
    every head keeps k) and the storage (``dense``, ``ragged`` or ``masked``)."""
    layer = cache.layers[i]
    K, V = layer.keys[0], layer.values[0]
    kvH, S, D = K.shape
    idx = sel.indices.to(K.device).long()
    if idx.dim() != 2 or idx.shape[0] != kvH:
        raise CompressionError(f"{name}: Selection.indices must be [kv_heads={kvH}, k], got {tuple(idx.shape)}")
    if (idx < 0).any() or (idx >= S).any():
        raise CompressionError(f"{name}: Selection.indices out of range [0, {S})")
    valid = sel.valid.to(K.device) if sel.valid is not None else None
    if valid is not None and bool(valid.all()):
        valid = None
    g = idx.unsqueeze(-1).expand(-1, -1, D)
    newK = sel.keys.to(K.dtype) if sel.keys is not None else K.gather(1, g)
    newV = sel.values.to(V.dtype) if sel.values is not None else V.gather(1, g)
    if mask_only:                       # keep every entry, mask what the method dropped (equivalence tests)
        keep = torch.zeros(kvH, S, dtype=torch.bool, device=K.device)
        rows = torch.arange(kvH, device=K.device)[:, None].expand_as(idx)
        real = torch.ones_like(idx, dtype=torch.bool) if valid is None else valid
        keep[rows[real], idx[real]] = True         # padding repeats an index: it must not unset a real one
        K2, V2 = K.clone(), V.clone()
        K2[rows[real], idx[real]] = newK[real]
        V2[rows[real], idx[real]] = newV[real]
        layer.keys, layer.values = K2[None], V2[None]
        module._avkv_valid = keep
        return idx, valid, "masked"
    if valid is None:
        layer.keys, layer.values = newK[None].contiguous(), newV[None].contiguous()
        return idx, valid, "dense"
    ragged = RaggedLayer([newK[h][valid[h]] for h in range(kvH)], [newV[h][valid[h]] for h in range(kvH)])
    cache.layers[i] = ragged                       # heads keep different counts: per-head segments, no padding
    module._avkv_ragged = ragged
    return idx, valid, "ragged"


def measure_cache(cache: Any, modules: list | None = None) -> tuple[list[list[int]], list[int]]:
    """Entries each KV head of each layer really attends to, and the bytes each layer holds (None and 0 for a layer
    that owns no cache: keys None).

    A :class:`RaggedLayer` counts its segments; a plain layer counts its length for every head, less the entries a
    masked reference (``mask_only``, module attribute ``_avkv_valid``) hides — those still count in the bytes.
    """
    entries, nbytes = [], []
    for i, layer in enumerate(cache.layers):
        nbytes.append(sum(t.numel() * t.element_size() for t in (layer.keys, layer.values) if t is not None))
        if layer.keys is None:                     # owns no cache (a KV-shared layer reads another layer's)
            entries.append(None)
            continue
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


def layer_capacity(layer: Any, n: int) -> int:
    """Entries per KV head a cache layer holds uncompressed after an n-token prompt: n, or min(n, W − 1) for a
    sliding-window layer (transformers keeps the last W − 1)."""
    window = getattr(layer, "sliding_window", None)
    return n if window is None else min(n, int(window) - 1)


def within_budget(ratio: float, target: float, n: int, tol: float = BUDGET_TOLERANCE) -> bool:
    """The budget rule: ``ratio`` is within ±``tol`` of ``target`` relative to it, plus one entry (1/n) of rounding
    (each layer and head keeps whole entries)."""
    return abs(ratio - target) <= tol * target + 1.0 / max(n, 1) + 1e-12


__all__ = ["RaggedLayer", "CompressionError", "apply_selection",
           "measure_cache", "layer_capacity", "within_budget", "kv_cache_bytes",
           "kv_bytes_by_device", "BUDGET_TOLERANCE"]
