"""Key re-rotation (kvpress 0.5.5 ``KeyRerotationPress``; FINCH, Corallo & Papotti, TACL 2024): after selection,
rotate the kept keys onto contiguous positions 0..k-1, so the pruned cache reads as a shorter prompt."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from avkv.methods.allocation import Wrapper
from avkv.methods.base import LayerView, ScoreMethod, Selection, check_choice, rotate, unrotate
from avkv.methods.snapkv import SnapKV


CONTINUE_AT = ("compressed", "original")


def rerotate(view: LayerView, indices: torch.Tensor, keys: torch.Tensor | None = None,
             continue_at: str = "compressed") -> tuple[torch.Tensor, int | None]:
    """Keys of the kept entries ``indices`` [kvH, k] (each row sorted), rotated from their own positions to the
    positions 0..k-1 (every rotary row: on M-RoPE the kept entries become text-like positions), and — with
    ``continue_at=compressed`` — how far the suffix and the decoded tokens must move back to follow them (to
    position k; the selection's ``position_shift``); ``original`` leaves them at their logical positions (None).

    ``keys`` [kvH, k, D] are the kept keys when a method rewrote them (merging), else they are gathered."""
    kvH, k = indices.shape
    D = view.keys.shape[-1]
    if keys is None:
        keys = view.keys.gather(1, indices[..., None].expand(-1, -1, D))
    pos = view.entry_positions()                                                   # [R, S]
    cos, sin = view.rope(pos)                                                      # [S, D]
    g = indices.to(cos.device)
    old_c, old_s = cos[g], sin[g]                                                  # [kvH, k, D]
    new = torch.arange(k, device=pos.device, dtype=pos.dtype).expand(pos.shape[0], k)
    new_c, new_s = view.rope(new)
    out = rotate(unrotate(keys.float(), old_c, old_s), new_c, new_s).to(view.keys.dtype)
    shift = int(view.future_positions(1)[0, 0]) - k if continue_at == "compressed" else None
    return out, shift


@dataclass
class KeyRerotation(Wrapper):
    """Select with any scorer, then re-rotate the kept keys to positions 0..k-1; the rest of the prompt and the
    decoded tokens continue at position k (the engine moves them by the shift every layer records), as kvpress's
    pipeline continues at the compressed length.

    Parameters
    ----------
    scorer : ScoreMethod
        SnapKV by default. Every layer must keep the same count (one shift for the whole model): no per-layer or
        per-head budgets underneath.
    continue_at : str
        ``compressed`` (default, kvpress's pipeline): the suffix and the decoded tokens continue at position k;
        ``original``: they keep their logical positions (a gap after the re-rotated keys; kvpress's bare press
        followed by a forward at the original position, as the parity reference runs it).

    On M-RoPE the kept media entries lose their (t, h, w) layout and become a text-like run 0..k-1 (avkv's
    choice: kvpress cannot run M-RoPE models).
    """

    name = "key_rerotation"
    kvpress: ClassVar[str | None] = "KeyRerotationPress"
    needs_rope: ClassVar[bool] = True                 # rerotate() reads view.rope
    scorer: ScoreMethod = field(default_factory=SnapKV)
    continue_at: str = "compressed"

    def __post_init__(self) -> None:
        check_choice("continue_at", self.continue_at, CONTINUE_AT)

    def compress(self, view: LayerView) -> Selection:
        sel = self.scorer.compress(view)
        if sel.valid is not None:
            raise TypeError("KeyRerotation needs the same kept count on every KV head")
        idx = sel.indices.sort(dim=-1)
        keys = None if sel.keys is None else sel.keys.gather(1, idx.indices[..., None].expand_as(sel.keys))
        values = None if sel.values is None else sel.values.gather(1, idx.indices[..., None].expand_as(sel.values))
        sel.keys, sel.position_shift = rerotate(view, idx.values, keys, self.continue_at)
        sel.indices = idx.values
        if values is not None:
            sel.values = values
        return sel
