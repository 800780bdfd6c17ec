"""Compactor (kvpress 0.5.5 ``CompactorPress``; Chari & Van Durme, 2025, arXiv 2507.08143): blend approximate
leverage scores of the pre-RoPE keys with a chunked non-causal attention score."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from avkv.methods.base import LayerView, ScoreMethod, repeat_kv, unrotate


def _zscore(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean()) / x.std().clamp_min(1e-6)


def leverage_scores(keys: torch.Tensor, sketch: int, generator: torch.Generator) -> torch.Tensor:
    """Ridge leverage of the centred keys [kvH, T, D] after a Gaussian sketch to ``sketch`` columns: [kvH, T].

    The Gram matrix gets a jitter of 0.01·I (raised tenfold until its Cholesky factorisation succeeds, as
    kvpress's ``LeverageScorePress``)."""
    kvH, T, D = keys.shape
    phi = torch.randn(kvH, D, sketch, generator=generator).to(keys.device) / math.sqrt(sketch)
    X = (keys - keys.mean(1, keepdim=True)).float() @ phi                          # [kvH, T, k]
    G = X.transpose(1, 2) @ X
    G = (G + G.transpose(1, 2)) / 2
    eye = torch.eye(sketch, device=X.device)
    jitter = 0.01
    for _ in range(5):
        L, info = torch.linalg.cholesky_ex(G + jitter * eye)
        if bool((info == 0).all()):
            break
        jitter *= 10
    else:
        raise RuntimeError("compactor: the sketched Gram matrix stayed singular after 5 jitters")
    inv_xt = torch.cholesky_solve(X.transpose(1, 2), L)                              # [kvH, k, T]
    return (X * inv_xt.transpose(1, 2)).sum(-1).clamp_min(0)


def chunked_noncausal_attention(q: torch.Tensor, k: torch.Tensor, chunk: int) -> torch.Tensor:
    """Column sums of softmax(q·kᵀ) inside consecutive chunks of ``chunk`` positions (no causal mask, no 1/√d
    scale), q and k [H, T, D]: [H, T].

    kvpress's padding of the last chunk is reproduced: padded query rows have logits 0 (a uniform row whose mass
    lands on the chunk's columns too), padded key columns have logit −1e−9 (so they are not masked, they take
    their share of every softmax)."""
    H, T, D = k.shape
    n = -(-T // chunk)
    pad = n * chunk - T
    qp = F.pad(q.float(), (0, 0, 0, pad))
    kp = F.pad(k.float(), (0, 0, 0, pad))
    dots = qp.view(H, n, chunk, D) @ kp.view(H, n, chunk, D).transpose(-1, -2)      # [H, n, c, c]
    if pad:
        bad = torch.arange(chunk, device=q.device) >= chunk - pad
        last = dots[:, -1]
        last.masked_fill_(bad[None, :, None], 0.0)
        last.masked_fill_(bad[None, None, :], -1e-9)
    return dots.softmax(-1).sum(-2).reshape(H, n * chunk)[:, :T]


@dataclass
class Compactor(ScoreMethod):
    """score = blending · z(leverage of pre-RoPE keys) + z(pooled non-causal attention · ‖v‖); the first
    ``sink_start`` and last ``sink_end`` entries are always ranked first.

    Parameters
    ----------
    sink_start, sink_end : int
        8 and 4 (``sink_size_start`` / ``sink_size_end``).
    chunk : int
        Chunk of the non-causal attention (``chunk_size``, 256).
    sketch : int
        Columns of the Gaussian sketch (``sketch_dimension``, 48).
    blending : float, optional
        Weight of the leverage term; None (kvpress's default) uses the layer's compression ratio 1 − n_keep/S.

    The z-scores are over the whole layer (all KV heads at once), the attention term is averaged over each KV
    head's query heads, weighted by value norms and average-pooled (kernel 3, zero padding counted). Random: the
    sketch is drawn from the per-sample generator (kvpress draws it from the global RNG, so its selection is
    random and parity is checked where the sketch does not matter: sketch ≥ head_dim, where the leverage only
    depends on the sketch through the 0.01 jitter). Pre-RoPE keys are the cached keys rotated back (kvpress
    recomputes them with ``k_proj``).
    """

    name = "compactor"
    kvpress: ClassVar[str | None] = "CompactorPress"
    needs_rope: ClassVar[bool] = True                 # reads view.rope
    sink_start: int = 8
    sink_end: int = 4
    chunk: int = 256
    sketch: int = 48
    blending: float | None = None

    def __post_init__(self) -> None:
        if self.chunk < 1 or self.sketch < 1:
            raise ValueError(f"chunk and sketch must be >= 1, got {self.chunk}, {self.sketch}")

    def score(self, view: LayerView) -> torch.Tensor:
        S = view.seq_len
        left = min(self.sink_start, S)
        right = min(self.sink_end, max(0, S - left))
        a, b = left, S - right
        kvH = view.num_kv_heads
        out = torch.empty(kvH, S, dtype=torch.float32, device=view.keys.device)
        if b <= a:
            out.fill_(1.0)
            return out
        K = view.keys[:, a:b].float()
        cos, sin = view.rope(view.entry_positions()[:, a:b])
        lev = _zscore(leverage_scores(unrotate(K, cos, sin), self.sketch, view.generator))
        q = view.queries(a, b).float()
        att = chunked_noncausal_attention(q, repeat_kv(K, view.groups), self.chunk)
        att = att.view(kvH, view.groups, -1).mean(1) * view.values[:, a:b].float().norm(dim=-1)
        att = _zscore(F.avg_pool1d(att[:, None], kernel_size=3, stride=1, padding=1)[:, 0])
        blend = self.blending if self.blending is not None else 1.0 - min(view.n_keep, S) / S
        s = blend * lev.to(att.device) + att
        out[:, a:b] = s
        out[:, :a] = s.max()
        out[:, b:] = s.max()
        return out
