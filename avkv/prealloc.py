"""The decode cache: every layer's kept entries copied once, at the end of the prefill, into buffers with room for
the answer (:class:`PreallocLayer`), so a decode step writes its token in place instead of copying the cache, and
every storage (dense, per-layer lengths, per-head ragged, the masked reference, sliding windows, a batch of rows)
decodes through the one attention path (:mod:`avkv.attention`).
"""
from __future__ import annotations

from typing import Any

import torch

from avkv.kvstore import CompressionError, RaggedLayer, DynamicLayer


class PreallocLayer(DynamicLayer):
    """One decoder layer's cache for decoding, whatever the storage it came from: buffers allocated once, new
    tokens written in place (no per-step copy of the cache).

    ``keys``/``values`` are ``[B, kvH, C, D]`` buffers of capacity C; ``valid`` ``[B, kvH, C]`` (bool) says which
    slots hold an entry each (batch row, KV head) attends to, ``lengths`` ``[B, kvH]`` (long) how many slots each
    has filled. A (b, h) whose prompt kept fewer entries than the layer's longest is padded up to it (the padding
    is invalid, never attended, but allocated: :attr:`nbytes` counts it, :attr:`valid_entries` does not); the
    masked reference (``mask_only``) keeps its dropped entries as invalid slots. :meth:`update` writes each
    (b, h)'s new entries at its own ``lengths[b, h]`` and marks them valid; :meth:`view` is what attention reads:
    the buffers and mask up to the longest filled length (views, no copy). Capacity runs out → it doubles (one
    copy); the engine sizes it for ``max_new_tokens`` so that never happens while decoding.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor | None = None,
                 lengths: torch.Tensor | None = None, extra: int = 0, sliding_window: int | None = None,
                 positions: torch.Tensor | None = None, next_position: int | None = None):
        """``keys``/``values`` [B, kvH, S, D]: the prompt's entries, left-aligned per (b, h); ``valid`` [B, kvH, S]
        which of them count (None: all); ``lengths`` [B, kvH] slots filled per (b, h) (None: S, or one past the last
        valid slot); ``extra``: free slots to allocate for the tokens to come.

        A sliding-window layer (``sliding_window`` W) also gets the logical position of every slot (``positions``
        [B, kvH, S]) and of the next token (``next_position``): each :meth:`update` gives the new tokens the next
        positions and invalidates the slots a token at the newest position no longer sees (position ≤ newest − W),
        which is the window transformers' sliding layers keep (the last W − 1 entries and the new one)."""
        super().__init__()
        B, kvH, S, D = keys.shape
        dev = keys.device
        if valid is None:
            valid = torch.ones(B, kvH, S, dtype=torch.bool, device=dev)
        if lengths is None:
            lengths = torch.full((B, kvH), S, dtype=torch.long, device=dev)
        C = S + max(int(extra), 0)
        self.keys = keys.new_zeros(B, kvH, C, D)
        self.values = values.new_zeros(B, kvH, C, values.shape[-1])
        self.keys[:, :, :S] = keys
        self.values[:, :, :S] = values
        self.valid = torch.zeros(B, kvH, C, dtype=torch.bool, device=dev)
        self.valid[:, :, :S] = valid.to(dev)
        self.lengths = lengths.to(device=dev, dtype=torch.long).clone()
        self._filled = int(self.lengths.max()) if self.lengths.numel() else 0
        self.num_heads = kvH
        self.dtype, self.device = self.keys.dtype, dev
        self.is_initialized = True
        self.sliding_window = sliding_window
        self.slot_pos = None
        if sliding_window is not None:
            if positions is None or next_position is None:
                raise CompressionError("a sliding-window decode layer needs the logical position of every slot")
            self.slot_pos = torch.full((B, kvH, C), -1, dtype=torch.long, device=dev)
            self.slot_pos[:, :, :S] = positions.to(dev)
            self.next_position = int(next_position)

    # ---- conversions
    @classmethod
    def from_layer(cls, layer: Any, valid: torch.Tensor | None = None, extra: int = 0,
                   kept_positions: torch.Tensor | None = None) -> "PreallocLayer":
        """The preallocated copy of a cache layer: a plain ``[B, kvH, S, D]`` layer (``valid`` [kvH, ≤S] or
        [B, kvH, ≤S]: the masked reference's validity, entries past it valid) or a :class:`RaggedLayer` (heads
        padded to the longest). A sliding-window layer (transformers' ``sliding_window``/``cumulative_length``)
        keeps its window: its slots are the last ``cumulative_length`` logical positions, except the first k of a
        compressed one, whose positions are ``kept_positions`` [kvH, k] (what the method kept)."""
        window = getattr(layer, "sliding_window", None)
        if window is not None:
            if isinstance(layer, RaggedLayer) or valid is not None:
                raise CompressionError("a sliding-window layer is stored dense (per-head and masked storage are not "
                                       "supported on it)")
            K, V = layer.keys, layer.values
            B, kvH, S = K.shape[0], K.shape[1], K.shape[2]
            total = int(layer.cumulative_length)
            pos = torch.arange(total - S, total, device=K.device).expand(B, kvH, S).clone()
            if kept_positions is not None:
                k = kept_positions.shape[-1]
                pos[:, :, :k] = kept_positions.to(K.device)
                pos[:, :, k:] = torch.arange(total - (S - k), total, device=K.device)
            return cls(K, V, None, None, extra, sliding_window=int(window), positions=pos, next_position=total)
        if isinstance(layer, RaggedLayer):
            o, S = layer.offsets(), max(layer.lengths)
            K = layer.keys.new_zeros(1, layer.num_heads, S, layer.keys.shape[-1])
            V = layer.values.new_zeros(1, layer.num_heads, S, layer.values.shape[-1])
            ok = torch.zeros(1, layer.num_heads, S, dtype=torch.bool, device=layer.keys.device)
            for h, n in enumerate(layer.lengths):
                K[0, h, :n] = layer.keys[0, 0, o[h]:o[h + 1]]
                V[0, h, :n] = layer.values[0, 0, o[h]:o[h + 1]]
                ok[0, h, :n] = True
            lengths = torch.tensor([layer.lengths], dtype=torch.long, device=layer.keys.device)
            return cls(K, V, ok, lengths, extra)
        K, V = layer.keys, layer.values
        ok = None
        if valid is not None:
            B, kvH, S = K.shape[0], K.shape[1], K.shape[2]
            v = valid.to(K.device).bool()
            v = v.expand(B, *v.shape[-2:]) if v.dim() == 3 else v[None].expand(B, -1, -1)
            ok = torch.ones(B, kvH, S, dtype=torch.bool, device=K.device)
            ok[:, :, : v.shape[-1]] = v
        return cls(K, V, ok, None, extra)

    # ---- the cache layer interface
    def _grow(self, need: int) -> None:
        B, kvH, C, D = self.keys.shape
        C2 = max(need, 2 * C)
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = old.new_zeros(B, kvH, C2, old.shape[-1])
            new[:, :, :C] = old
            setattr(self, name, new)
        valid = self.valid.new_zeros(B, kvH, C2)
        valid[:, :, :C] = self.valid
        self.valid = valid
        if self.slot_pos is not None:
            pos = self.slot_pos.new_full((B, kvH, C2), -1)
            pos[:, :, :C] = self.slot_pos
            self.slot_pos = pos

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        B, kvH, q, _ = key_states.shape
        if (B, kvH) != tuple(self.lengths.shape):
            raise CompressionError(f"preallocated cache layer holds batch {tuple(self.lengths.shape)} (B, kv heads), "
                                   f"got {tuple(key_states.shape)}")
        end = self._filled + q if bool((self.lengths == self._filled).all()) else int(self.lengths.max()) + q
        if end > self.keys.shape[2]:
            self._grow(end)
        if bool((self.lengths == self._filled).all()):        # every (b, h) at the same length: one slice write
            a = self._filled
            self.keys[:, :, a:a + q] = key_states.to(self.dtype)
            self.values[:, :, a:a + q] = value_states.to(self.dtype)
            self.valid[:, :, a:a + q] = True
        else:                                                 # per-(b, h) write positions
            idx = self.lengths[:, :, None] + torch.arange(q, device=self.device)          # [B, kvH, q]
            self.keys.scatter_(2, idx[..., None].expand(-1, -1, -1, self.keys.shape[-1]), key_states.to(self.dtype))
            self.values.scatter_(2, idx[..., None].expand(-1, -1, -1, self.values.shape[-1]),
                                 value_states.to(self.dtype))
            self.valid.scatter_(2, idx, True)
        if self.slot_pos is not None:
            self._slide(q)
        self.lengths += q
        self._filled = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def _slide(self, q: int) -> None:
        """Sliding window: the q new tokens (just written at ``lengths``) take the next logical positions, and every
        slot the newest of them does not see (position ≤ newest − W) stops being valid. For q > 1 an earlier new
        token would still see some of those: refused where it matters."""
        first, newest = self.next_position, self.next_position + q - 1
        idx = self.lengths[:, :, None] + torch.arange(q, device=self.device)
        self.slot_pos.scatter_(2, idx, (first + torch.arange(q, device=self.device)).expand_as(idx))
        stale = self.valid & (self.slot_pos >= 0) & (self.slot_pos <= newest - self.sliding_window)
        if q > 1 and bool((stale & (self.slot_pos > first - self.sliding_window)).any()):
            raise CompressionError(f"{q} tokens at once on a sliding-window layer whose window moves within them")
        self.valid &= ~stale
        self.next_position = newest + 1

    def view(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """What attention reads: keys, values ``[B, kvH, T, D]``, validity ``[B, kvH, T]`` up to the longest filled
        length T, and ``lengths`` [B, kvH] (views of the buffers)."""
        T = self._filled
        return self.keys[:, :, :T], self.values[:, :, :T], self.valid[:, :, :T], self.lengths

    @property
    def capacity(self) -> int:
        return int(self.keys.shape[2])

    @property
    def nbytes(self) -> int:
        """Bytes allocated for keys and values (padding and free slots included)."""
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values))

    def valid_entries(self) -> torch.Tensor:
        """Entries each (b, h) attends to, [B, kvH]."""
        return self.valid.sum(-1)

    def get_seq_length(self) -> int:
        return self._filled

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self._filled + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a preallocated decode cache layer cannot be cropped")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("a preallocated decode cache layer is built at its batch size")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("a preallocated decode cache layer is built at its batch size")


def to_prealloc(cache: Any, modules: list | None = None, extra: int = 0, sources: list[int] | None = None
                ) -> list[PreallocLayer | None]:
    """Convert every layer of ``cache`` (plain, per-layer lengths, :class:`RaggedLayer`, the masked reference with
    its module attribute ``_avkv_valid``, a sliding-window layer) into a :class:`PreallocLayer` with ``extra`` free
    slots, in place (one copy of the cache, at the end of the prefill). ``modules``: the decoder's attention modules,
    each given its layer as ``_avkv_decode_layer`` (what :func:`avkv.attention.decode_attention` reads). A layer
    that owns no cache (keys None: a KV-shared layer) stays as it is and its module gets the layer of
    ``sources[i]``, the layer whose keys it attends over (``ModelAdapter.cache_sources``). Returns the new layers
    (None for those)."""
    out = []
    for i, layer in enumerate(cache.layers):
        if layer.keys is None:
            out.append(None)
            continue
        if not isinstance(layer, PreallocLayer):
            m = modules[i] if modules is not None else None
            layer = PreallocLayer.from_layer(layer, getattr(m, "_avkv_valid", None), extra,
                                             getattr(m, "_avkv_positions", None))
            cache.layers[i] = layer
        out.append(layer)
    if modules is not None:
        src = sources or list(range(len(out)))
        for i, m in enumerate(modules):
            layer = out[src[i]]
            if layer is None:
                raise CompressionError(f"layer {i} reads the cache of layer {src[i]}, which holds none")
            m._avkv_decode_layer = layer
    return out


def prealloc_bytes(cache: Any) -> tuple[int, int]:
    """Bytes a converted cache allocates for its keys and values: (the prompt's part, padding included, i.e. up to
    each layer's longest kept length; everything, free decode slots included)."""
    prompt = total = 0
    for layer in cache.layers:
        if isinstance(layer, PreallocLayer):
            per_slot = layer.nbytes // max(layer.capacity, 1)
            prompt += per_slot * layer.get_seq_length()
            total += layer.nbytes
    return prompt, total


__all__ = ["PreallocLayer", "to_prealloc", "prealloc_bytes"]
