"""CUR (leverage-score) selection, kvpress 0.5.5 ``CURPress`` (after "CurDKV", Sengupta et al., 2025,
arXiv 2509.15038): keep the entries whose key and value rows carry the most energy, measured locally."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import math

import torch
import torch.nn.functional as F

from avkv.methods.base import LayerView, ScoreMethod, check_choice

LEVERAGE = ("key", "value", "kv_avg", "kv_product")


@dataclass
class CUR(ScoreMethod):
    """Approximate leverage scores of keys and values (squared row norms), normalised in local windows.

    Parameters
    ----------
    sink : int
        Initial entries always kept (``num_sinks``, 4).
    leverage : str
        ``key``, ``value``, ``kv_avg`` or ``kv_product`` (default) of the key and value scores.
    random_projection : bool
        Project keys and values on a random Gaussian sketch of 20 columns first (``use_random_leverage``); the
        sketch is drawn from the per-sample generator (kvpress draws it from the global RNG, so that variant is
        random in the reference and is not compared).
    local : bool
        Normalise the squared norms within consecutive windows of ``local_window`` entries
        (``use_local_approximation``, default true; the last window is zero-padded).
    local_window : int
        16.

    Needs only keys and values, so it runs on every backend and on M-RoPE models alike.
    """

    name = "cur"
    kvpress: ClassVar[str | None] = "CURPress"
    sink: int = 4
    leverage: str = "kv_product"
    random_projection: bool = False
    local: bool = True
    local_window: int = 16

    def __post_init__(self) -> None:
        check_choice("leverage", self.leverage, LEVERAGE)
        if self.local_window < 1:
            raise ValueError(f"local_window must be >= 1, got {self.local_window}")

    def _local(self, x: torch.Tensor) -> torch.Tensor:
        R, n = x.shape
        w = self.local_window
        pad = (w - n % w) % w
        blocks = F.pad(x, (0, pad)).reshape(R, -1, w)
        return (blocks / blocks.sum(-1, keepdim=True)).reshape(R, -1)[:, :n]

    def score(self, view: LayerView) -> torch.Tensor:
        K, V = view.keys.float(), view.values.float()
        if self.random_projection:
            r = 20
            G = torch.randn(K.shape[-1], r, generator=view.generator).to(K.device) / math.sqrt(r)
            K, V = K @ G, V @ G
        k2, v2 = K.pow(2).sum(-1), V.pow(2).sum(-1)                                  # [kvH, S]
        if self.local:
            k2, v2 = self._local(k2), self._local(v2)
        s = {"key": k2, "value": v2, "kv_avg": (k2 + v2) / 2, "kv_product": k2 * v2}[self.leverage]
        s = s / s.sum(-1, keepdim=True)
        s[:, : self.sink] = 1.0
        return s
