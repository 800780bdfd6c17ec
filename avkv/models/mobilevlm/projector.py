"""MobileVLM's vision projectors.

LDPv2 (``mm_projector_type`` ``ldpnetv2``, MobileVLM V2, arXiv 2402.03766 §3.2) maps CLIP patch features
``[b, N, d]`` (N = s×s, a square grid) to ``[b, 144, D]`` in three steps, as the official ``LDPNetV2Projector``:

1. ``mlp`` — feature transformation, per token: Linear(d → D), GELU (exact, erf), Linear(D → D);
2. ``dwn`` — token reduction: the s×s grid average-pooled to a fixed 12×12 grid (``AdaptiveAvgPool2d((12, 12))``;
   for CLIP-336/14, s = 24, so each output token is the mean of a 2×2 cell);
3. ``peg`` — positional information (a PEG, Chu et al. 2021): a depthwise 3×3 convolution (stride 1, padding 1,
   bias) over the 12×12 grid, added to its input.

Tokens are laid out row-major (the flattening of a ``[D, h, w]`` map). Parameter names follow the official module
tree: ``mlp.mlp.{0,2}``, ``peg.peg.0``; the pooling has none. ``linear`` and ``mlp{N}x_gelu`` are the LLaVA
projectors the official ``build_vision_projector`` also builds (Linear 0, GELU 1, Linear 2 …).
"""
from __future__ import annotations

import math
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

#: the LDPv2 output grid, fixed in the official projector
LDPV2_GRID = (12, 12)


def _grid(x: torch.Tensor) -> int:
    side = int(math.isqrt(x.shape[1]))
    if side * side != x.shape[1]:
        raise ValueError(f"LDPv2 needs a square patch grid, got {x.shape[1]} tokens")
    return side


def _to_map(x: torch.Tensor, side: int) -> torch.Tensor:
    """[b, side*side, c] → [b, c, side, side] (row-major tokens)."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], side, side)


class FeatureMLP(nn.Module):
    """``mlp``: Linear → GELU → Linear, its Sequential under the name ``mlp`` (official ``FeatureIRLayer``)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class TokenPool(nn.Module):
    """``dwn``: adaptive average pooling of the token grid to ``shape`` (no parameters)."""

    def __init__(self, shape: tuple[int, int] = LDPV2_GRID) -> None:
        super().__init__()
        self.shape = tuple(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.adaptive_avg_pool2d(_to_map(x, _grid(x)), self.shape)
        return y.flatten(2).transpose(1, 2)


class PositionalConv(nn.Module):
    """``peg``: x + depthwise 3×3 conv(x) over the token grid, the conv under ``peg.0``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.peg = nn.Sequential(nn.Conv2d(dim, dim, 3, 1, 1, bias=True, groups=dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = _to_map(x, _grid(x))
        return (self.peg(m) + m).flatten(2).transpose(1, 2)


class LDPv2(nn.Module):
    def __init__(self, mm_hidden_size: int, hidden_size: int) -> None:
        super().__init__()
        self.mlp = FeatureMLP(mm_hidden_size, hidden_size)
        self.dwn = TokenPool(LDPV2_GRID)
        self.peg = PositionalConv(hidden_size)

    def num_tokens(self, patches: int) -> int:
        return LDPV2_GRID[0] * LDPV2_GRID[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.peg(self.dwn(self.mlp(x)))


class TokenwiseProjector(nn.Sequential):
    """``mlp{N}x_gelu``: one output token per patch."""

    def num_tokens(self, patches: int) -> int:
        return patches


class TokenwiseLinear(nn.Linear):
    """``linear``: a bare Linear in the official tree (``mm_projector.weight``), one output token per patch."""

    def num_tokens(self, patches: int) -> int:
        return patches


def build_vision_projector(projector_type: str, mm_hidden_size: int, hidden_size: int) -> nn.Module:
    if projector_type.startswith("ldpnetv2"):
        return LDPv2(mm_hidden_size, hidden_size)
    if projector_type == "linear":
        return TokenwiseLinear(mm_hidden_size, hidden_size)
    m = re.fullmatch(r"mlp(\d+)x_gelu", projector_type)
    if m:
        mods: list[nn.Module] = [nn.Linear(mm_hidden_size, hidden_size)]
        for _ in range(1, int(m.group(1))):
            mods += [nn.GELU(), nn.Linear(hidden_size, hidden_size)]
        return TokenwiseProjector(*mods)
    raise ValueError(f"unsupported mm_projector_type {projector_type!r}")
