"""SimLayerKV (Zhang et al., ICLR 2025, arXiv 2410.13846; kvpress 0.5.5 ``SimLayerKVPress``): layers whose last query
attends mostly to the initial and recent entries ("lazy" layers) keep only those; the others keep everything."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from avkv.methods.base import LayerView, Method, Selection, attention_rows


@dataclass
class SimLayerKV(Method):
    """Per-layer laziness test on the attention of the last ``n_last`` queries.

    A layer is lazy when the attention mass (averaged over query heads and the ``n_last`` rows, the rows' own
    window columns left out) on the first ``n_initial`` and the last ``n_recent`` entries exceeds
    ``lazy_threshold``; a lazy layer keeps its first ``n_initial`` and last ``n_recent − n_last`` entries (kvpress's
    slice), every other layer keeps its whole cache. Prompts of at most ``n_initial + n_recent + n_last`` entries
    are not compressed.

    Parameters
    ----------
    lazy_threshold : float
        In [0, 1]; 1 never compresses (kvpress's default). 0.9 here, the paper's setting for Llama-3.
    n_last, n_recent, n_initial : int
        1, 1024, 4 (kvpress defaults).

    The kept fraction follows the prompt and the layers' laziness, not the run's budget: the method declares
    ``budget_mode=achieved``; records say which layers were lazy (``method_info``). With ``n_recent == n_last``
    kvpress's slice keeps every entry (``-0``); here a lazy layer then keeps the initial entries only.
    """

    name = "simlayerkv"
    kvpress: ClassVar[str | None] = "SimLayerKVPress"
    lazy_threshold: float = 0.9
    n_last: int = 1
    n_recent: int = 1024
    n_initial: int = 4

    budget_mode = "achieved"
    budget_reason = "lazy layers keep their initial and recent entries, other layers everything (SimLayerKV)"

    def __post_init__(self) -> None:
        if not 0 <= self.lazy_threshold <= 1:
            raise ValueError(f"lazy_threshold must be in [0, 1], got {self.lazy_threshold}")
        if self.n_last < 1:
            raise ValueError(f"n_last must be >= 1, got {self.n_last}")

    def lazy_score(self, view: LayerView) -> float:
        S = view.seq_len
        a = attention_rows(view, S - self.n_last, S)[:, :, : S - self.n_last].mean((0, 1))     # [S - n_last]
        return float(a[: self.n_initial].sum() + a[-self.n_recent:].sum())

    def compress(self, view: LayerView) -> Selection:
        S, kvH = view.seq_len, view.num_kv_heads
        dev = view.keys.device
        lazy, score = False, None
        if self.lazy_threshold < 1 and S > self.n_initial + self.n_recent + self.n_last:
            score = self.lazy_score(view)
            lazy = score > self.lazy_threshold
        if lazy:
            recent = max(0, self.n_recent - self.n_last)
            keep = torch.cat([torch.arange(self.n_initial, device=dev), torch.arange(S - recent, S, device=dev)])
        else:
            keep = torch.arange(S, device=dev)
        info = {"lazy": lazy} if score is None else {"lazy": lazy, "lazy_score": score}
        return Selection(indices=keep[None].expand(kvH, -1).contiguous(), info=info)
