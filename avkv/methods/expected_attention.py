"""Expected Attention (Devoto et al., 2025, arXiv 2510.00636; kvpress 0.5.5 ``ExpectedAttentionPress``): score each
entry by the attention that *future* queries are expected to pay it, from a Gaussian model of the queries."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from avkv.methods.base import LayerView, ScoreMethod, unrotate


def mean_rotation(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The average over positions of the rotate-half RoPE matrices, ``[D, D]``: R̄ with R̄·x = mean_t rope_t(x),
    from (cos, sin) ``[T, D]``."""
    c, s = cos.mean(0), sin.mean(0)
    D = c.shape[0]
    h = D // 2
    R = torch.diag(c)
    idx = torch.arange(h, device=c.device)
    R[idx, idx + h] = -s[:h]                     # rotate_half: first half takes -x2, second half takes x1
    R[idx + h, idx] = s[h:]
    return R


@dataclass
class ExpectedAttention(ScoreMethod):
    """Expected attention of the next ``future`` queries, modelled as a Gaussian fitted to the prompt's queries.

    The pre-RoPE queries of the chunk (sinks excluded) give a mean μ and covariance Σ per query head; both are
    moved to the future by the average RoPE rotation R̄ of the next ``future`` positions (μ ← R̄μ, Σ ← R̄ΣR̄ᵀ).
    Entry j then scores softmax_j(μ·k_j/√d + k_jᵀΣk_j/(2d)) (the log-normal expectation of exp(q·k/√d)),
    averaged over the query heads of its KV head and weighted by ‖v_j‖.

    Parameters
    ----------
    future : int
        Number of future positions averaged (``n_future_positions``, 512).
    sink : int
        Initial entries always kept and left out of the statistics (``n_sink``, 4).
    covariance : bool
        Use the second-order term (``use_covariance``, true).
    vnorm : bool
        Weight by value norms (``use_vnorm``, true).
    epsilon : float
        Added to the attention before the value weighting (0).

    avkv's own ground: the future positions are the next text positions after the chunk (on M-RoPE every t/h/w
    row continues at the largest position + 1, the rule for text after media), not the 1-D positions
    ``S..S+future`` kvpress uses, which are wrong on M-RoPE. Pre-RoPE queries are the engine's recomputed queries
    rotated back (exact for the rotate-half RoPE of every supported family). As kvpress, the scale is 1/√d and
    the softmax runs over the non-sink entries only.
    """

    name = "expected_attention"
    kvpress: ClassVar[str | None] = "ExpectedAttentionPress"
    needs_rope: ClassVar[bool] = True                 # reads view.rope
    future: int = 512
    sink: int = 4
    covariance: bool = True
    vnorm: bool = True
    epsilon: float = 0.0

    def __post_init__(self) -> None:
        if self.future < 1:
            raise ValueError(f"future must be >= 1, got {self.future}")

    def statistics(self, view: LayerView) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Future-rotated query mean [H, D] and covariance [H, D, D] (None without ``covariance``)."""
        S = view.seq_len
        a = min(self.sink, S - 1)
        q = view.queries(a, S).float()                                                  # [H, T, D] post-RoPE
        cos, sin = view.rope(view.entry_positions()[:, a:S])
        q = unrotate(q, cos, sin)
        mu = q.mean(1)                                                                   # [H, D]
        cov = None
        if self.covariance:
            c = q - mu[:, None]
            cov = c.transpose(1, 2) @ c / q.shape[1]
        R = mean_rotation(*view.rope(view.future_positions(self.future)))
        mu = mu @ R.T
        if cov is not None:
            cov = R @ cov @ R.T
        return mu, cov

    def score(self, view: LayerView) -> torch.Tensor:
        S, D = view.seq_len, view.keys.shape[-1]
        kvH, H = view.num_kv_heads, view.num_heads
        a = min(self.sink, S - 1)
        mu, cov = self.statistics(view)
        K = view.keys[:, a:].float().repeat_interleave(H // kvH, dim=0)                # [H, n, D]
        logits = (K @ mu[:, :, None])[..., 0] / math.sqrt(D)
        if cov is not None:
            logits = logits + torch.einsum("hnd,hde,hne->hn", K, cov, K) / D / 2
        s = logits.softmax(-1).view(kvH, H // kvH, -1).mean(1)                          # [kvH, n]
        if self.vnorm:
            s = (s + self.epsilon) * view.values[:, a:].float().norm(dim=-1)
        out = torch.empty(kvH, S, dtype=torch.float32, device=s.device)
        out[:, a:] = s
        out[:, :a] = s.max() + 1                                                         # sinks beat everything
        return out
