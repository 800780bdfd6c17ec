"""FINCH (Corallo & Papotti, TACL 2024; kvpress 0.5.5 ``FinchPress``): the question is the observation window —
prompt entries are scored by the attention the question's tokens pay them, and the kept keys are re-rotated."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from avkv.methods.counts import chunk_quotas
from avkv.methods.base import (LayerView, ScoreMethod, Selection, attention_rows, check_choice, rank_positions,
                               reduce_gqa)
from avkv.methods.key_rerotation import CONTINUE_AT, rerotate
from avkv.methods.request import Request


@dataclass
class FINCH(ScoreMethod):
    """SnapKV-like scores with the question as the window, position-normalised, optionally per chunk.

    Parameters
    ----------
    window : int
        0 (default): the window is the question (the tokens from the question's start to the end of the
        compressed chunk; needs ``compress_at=question``, where the chunk ends with the question — kvpress marks
        it with a delimiter token instead); > 0: a fixed window of the last prompt entries.
    normalize : bool
        Multiply the attention row of the query at position i by i before averaging (``normalize_scores``, true),
        so late queries, whose attention is spread over more keys, weigh as much as early ones.
    chunk_length : int
        0 (default): one selection over the prompt; > 0: select inside chunks of this length, each keeping its
        share of the budget (kvpress ``chunk_length``; shares rounded with the sum preserved).
    rerotate : bool
        Re-rotate the kept keys onto positions 0..k-1 (``rerotate_keys``, true); the suffix and the decoded tokens
        follow (see :class:`~avkv.methods.key_rerotation.KeyRerotation`).
    continue_at : str
        With ``rerotate``: ``compressed`` (kvpress's pipeline: the rest continues at position k) or ``original``.

    The window scores (highest prefix score) + 1 and is kept whenever the budget allows.
    """

    name = "finch"
    kvpress: ClassVar[str | None] = "FinchPress"
    indexes_prompt_positions: ClassVar[bool] = True # the question window, by prompt position
    window: int = 0
    normalize: bool = True
    chunk_length: int = 0
    rerotate: bool = True
    continue_at: str = "compressed"

    def __post_init__(self) -> None:
        check_choice("continue_at", self.continue_at, CONTINUE_AT)
        self._question_start: int | None = None

    @property
    def needs_rope(self) -> bool:  # type: ignore[override]
        return self.rerotate                          # rerotate() reads view.rope

    def begin(self, request: Request) -> None:
        self._question_start = request.question_start

    def protected(self, view: LayerView) -> int:
        S = view.seq_len
        if self.window > 0:
            return min(self.window, S - 1)
        q = self._question_start
        if q is None or not 0 < q < S:
            raise ValueError("finch: the window is the question, but the compressed chunk does not end with it "
                             "(use compress_at=question, or set window > 0)")
        return S - q

    def score(self, view: LayerView) -> torch.Tensor:
        S = view.seq_len
        w = self.protected(view)
        a = attention_rows(view, S - w, S)[:, :, : S - w]                            # [H, w, S - w]
        if self.normalize:
            a = a * torch.arange(S - w, S, device=a.device, dtype=a.dtype)[None, :, None]
        s = reduce_gqa(a.mean(1), view.num_kv_heads, "mean")                        # [kvH, S - w]
        out = torch.empty(view.num_kv_heads, S, dtype=torch.float32, device=s.device)
        out[:, : S - w] = s
        out[:, S - w:] = s.max() + 1
        return out

    def compress(self, view: LayerView) -> Selection:
        S = view.seq_len
        n = max(1, min(view.n_keep, S))
        scores = self.score(view)
        if self.chunk_length <= 0:
            order = rank_positions(scores)[:, :n]
        else:
            order = torch.cat([a + rank_positions(scores[:, a:b])[:, :c]
                               for a, b, c in chunk_quotas(S, self.chunk_length, n) if c > 0], dim=1)
        idx = order.sort(dim=-1).values
        if self.rerotate:
            keys, shift = rerotate(view, idx, continue_at=self.continue_at)
            return Selection(indices=idx, keys=keys, position_shift=shift)
        return Selection(indices=idx)
