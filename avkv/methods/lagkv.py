"""LagKV (Liang et al., 2025, arXiv 2504.04704): attention-free scores from how much an entry's key/value stands
out of the statistics of the *next* block of entries (the "lag" reference)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from avkv.methods.base import LayerView, ScoreMethod


@dataclass
class LagKV(ScoreMethod):
    """Score entries block by block against the block after them; keep the sinks and the last blocks.

    Parameters
    ----------
    sink : int
        Initial entries always kept (score 1; 4 as kvpress ``LagKVPress.n_sink``).
    lag : int
        Block length (``lag_size``, 128). The prefix after the sinks is cut into whole blocks; the last whole block
        and the remainder have no following block and score 1 (kept first).
    cross_scoring : bool
        False (default): a block's entries are ranked within the block (score = rank / lag), so every block
        competes with the same score values; True: the softmax scores are compared across blocks directly.

    Key and value scores are averaged. Prompts shorter than ``sink + 2·lag`` get recency scores instead
    (position / length after the sinks), as kvpress does.

    Arbitrary in the reference (kvpress 0.5.5 ``LagKVPress``), defined here: with ``cross_scoring`` false every
    block contributes the same rank values, so the cut falls inside a tie across blocks; kvpress's ``topk`` then
    keeps an unspecified subset, avkv keeps the later positions (:func:`~avkv.methods.base.rank_positions`).
    Ties inside a block (equal softmax scores) are ranked by ``argsort`` order in kvpress, by position here (the
    later ranked higher). A block whose reference range is zero in some channel gives NaN in kvpress; here that
    channel is ignored (its normalised value is set to 0.5). Needs only keys and values, so it runs on every
    backend and on M-RoPE models alike.
    """

    name = "lagkv"
    kvpress: ClassVar[str | None] = "LagKVPress"
    sink: int = 4
    lag: int = 128
    cross_scoring: bool = False

    def __post_init__(self) -> None:
        if self.lag < 1:
            raise ValueError(f"lag must be >= 1, got {self.lag}")

    def score(self, view: LayerView) -> torch.Tensor:
        K, V = view.keys.float(), view.values.float()
        kvH, S, D = K.shape
        sink, lag = min(self.sink, S), self.lag
        out = torch.ones(kvH, S, dtype=torch.float32, device=K.device)
        if S < self.sink + 2 * lag:
            if S > sink:
                out[:, sink:] = torch.arange(S - sink, device=K.device, dtype=torch.float32) / (S - sink)
            return out
        end = sink + (S - sink) // lag * lag
        nb = (end - sink) // lag

        def blocks(x: torch.Tensor) -> torch.Tensor:
            return x[:, sink:end].reshape(kvH, nb, lag, D)

        s = (self._safe_score(blocks(K)) + self._safe_score(blocks(V))) / 2            # [kvH, nb-1, lag]
        if not self.cross_scoring:
            # rank within the block (0 = lowest); equal scores: the later position ranks higher
            order = torch.sort(s, dim=-1, stable=True).indices                       # ascending, ties by position
            ranks = torch.empty_like(order)
            ranks.scatter_(-1, order, torch.arange(lag, device=K.device).expand_as(order))
            s = ranks.float() / lag
        out[:, sink:end - lag] = s.reshape(kvH, -1)
        return out

    @staticmethod
    def _safe_score(x: torch.Tensor) -> torch.Tensor:
        """x [kvH, nb, lag, D] → scores of blocks 0..nb-2 [kvH, nb-1, lag]: each entry min-max normalised per
        channel by the range of the following block; the spread (sample std) of its normalised channels,
        softmaxed within its block."""
        ref = x[:, 1:]
        lo = ref.amin(dim=2, keepdim=True)
        rng = ref.amax(dim=2, keepdim=True) - lo
        z = torch.where(rng > 0, (x[:, :-1] - lo) / rng.clamp_min(1e-30), torch.full_like(x[:, :-1], 0.5))
        return z.std(dim=-1).softmax(dim=-1)
