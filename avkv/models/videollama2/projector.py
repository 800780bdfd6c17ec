"""Vision and audio projectors of VideoLLaMA2, written without timm.

The STC connector (``mm_projector_type`` ``stc_connector`` / ``stc_connector_v35``) is

    RegStage(depth 4)  →  Conv3d(kernel = stride = (2, 2, 2), padding 1 | 0) + SiLU  →  RegStage(depth 4)  →  MLP(2)

applied to per-frame patch features ``[b, t, h*w, d]``. RegStage is timm's RegNet stage (``timm.models.regnet``):
``depth`` bottleneck blocks named ``b1 … b{depth}``; each block is conv1x1 → depthwise conv3x3 (group size 1)
→ squeeze-excite → conv1x1, every conv followed by a channels-first LayerNorm (eps 1e-5, timm's
``LayerNormAct2d``) with SiLU except the last, a residual shortcut (a conv1x1 + norm when the channel count
changes, identity otherwise) and a final SiLU. Parameter names follow timm's module tree exactly
(``conv1.conv.weight``, ``conv1.bn.weight``, ``se.fc1.weight``, ``downsample.conv.weight`` …) so that the
official checkpoints load as they are.
"""
from __future__ import annotations

import re

import torch
import torch.nn as nn
import torch.nn.functional as F


class LayerNormAct2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor, then an activation (timm ``LayerNormAct2d``)."""

    def __init__(self, num_channels: int, apply_act: bool = True, eps: float = 1e-5) -> None:
        super().__init__(num_channels, eps=eps)
        self.act = nn.SiLU() if apply_act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return self.act(x.permute(0, 3, 1, 2))


class ConvNormAct(nn.Module):
    """Conv2d (no bias, symmetric padding) + LayerNormAct2d, named ``conv`` / ``bn`` as in timm."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 1, groups: int = 1,
                 apply_act: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, padding=(kernel_size - 1) // 2, groups=groups,
                              bias=False)
        self.bn = LayerNormAct2d(out_chs, apply_act=apply_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class SEModule(nn.Module):
    """Squeeze-excite with 1x1 convs (timm ``SEModule`` with an explicit reduced width and SiLU)."""

    def __init__(self, channels: int, rd_channels: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, rd_channels, kernel_size=1, bias=True)
        self.act = nn.SiLU()
        self.fc2 = nn.Conv2d(rd_channels, channels, kernel_size=1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True))))
        return x * s.sigmoid()


class Bottleneck(nn.Module):
    """timm RegNet ``Bottleneck`` with bottle_ratio 1, group_size 1, se_ratio 0.25, stride 1, dilation 1."""

    def __init__(self, in_chs: int, out_chs: int, se_ratio: float = 0.25) -> None:
        super().__init__()
        mid = out_chs                                   # bottle_ratio = 1
        self.conv1 = ConvNormAct(in_chs, mid, 1)
        self.conv2 = ConvNormAct(mid, mid, 3, groups=mid)   # group_size = 1 → depthwise
        self.se = SEModule(mid, int(round(in_chs * se_ratio)))   # reduced width from the block's *input* width
        self.conv3 = ConvNormAct(mid, out_chs, 1, apply_act=False)
        self.act3 = nn.SiLU()
        # shortcut: conv1x1 + norm (no act) when the width changes, identity otherwise
        self.downsample = ConvNormAct(in_chs, out_chs, 1, apply_act=False) if in_chs != out_chs else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv3(self.se(self.conv2(self.conv1(x))))
        return self.act3(y + self.downsample(x))


class RegStage(nn.Module):
    """``depth`` bottleneck blocks ``b1 … b{depth}``; the first maps ``in_chs`` → ``out_chs``."""

    def __init__(self, depth: int, in_chs: int, out_chs: int) -> None:
        super().__init__()
        for i in range(depth):
            self.add_module(f"b{i + 1}", Bottleneck(in_chs if i == 0 else out_chs, out_chs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.children():
            x = block(x)
        return x


def build_mlp(depth: int, in_size: int, out_size: int) -> nn.Sequential:
    """``mlp{depth}x_gelu``: Linear, then (GELU, Linear) × (depth-1); indices 0, 2, 4 … hold the Linears."""
    mods: list[nn.Module] = [nn.Linear(in_size, out_size)]
    for _ in range(1, depth):
        mods += [nn.GELU(), nn.Linear(out_size, out_size)]
    return nn.Sequential(*mods)


class STCConnector(nn.Module):
    """Spatial-temporal convolution connector: ``[b, t, h*w, d]`` (or ``[b, t, h, w, d]``) → ``[b, t'h'w', D]``.

    ``padding`` is 1 for ``stc_connector`` (v1) and 0 for ``stc_connector_v35``. Output sizes follow Conv3d:
    ``t' = (t + 2p - 2) // 2 + 1`` and the same for h and w (RegStages keep the spatial size).
    """

    def __init__(self, encoder_hidden_size: int, hidden_size: int, padding: int = 1,
                 downsample: tuple[int, int, int] = (2, 2, 2), depth: int = 4, mlp_depth: int = 2) -> None:
        super().__init__()
        self.downsample, self.padding = tuple(downsample), padding
        self.s1 = RegStage(depth, encoder_hidden_size, hidden_size) if depth else nn.Identity()
        self.sampler = nn.Sequential(
            nn.Conv3d(hidden_size, hidden_size, kernel_size=self.downsample, stride=self.downsample,
                      padding=padding, bias=True),
            nn.SiLU())
        self.s2 = RegStage(depth, hidden_size, hidden_size) if depth else nn.Identity()
        self.readout = build_mlp(mlp_depth, hidden_size, hidden_size)

    def output_grid(self, t: int, h: int, w: int) -> tuple[int, int, int]:
        """(t', h', w') the connector produces from a t×h×w patch grid."""
        return tuple((n + 2 * self.padding - k) // k + 1 for n, k in zip((t, h, w), self.downsample))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t = x.shape[:2]
        if x.ndim == 4:
            hw = int(round(x.shape[2] ** 0.5))
            if hw * hw != x.shape[2]:
                raise ValueError(f"STC connector needs a square patch grid, got {x.shape[2]} patches per frame")
            x = x.reshape(b, t, hw, hw, x.shape[-1])
        _, _, h, w, d = x.shape
        x = x.permute(0, 1, 4, 2, 3).reshape(b * t, d, h, w)            # (b t) d h w
        x = self.s1(x)
        x = x.reshape(b, t, -1, h, w).permute(0, 2, 1, 3, 4)            # b d t h w
        x = self.sampler(x)
        d2, t2, h2, w2 = x.shape[1:]
        x = x.permute(0, 2, 1, 3, 4).reshape(b * t2, d2, h2, w2)        # (b t') d h w
        x = self.s2(x)
        x = x.reshape(b, t2, d2, h2, w2).permute(0, 1, 3, 4, 2).reshape(b, t2 * h2 * w2, d2)   # b (t h w) d
        return self.readout(x)


#: projector types of the official ``build_vision_projector`` this port implements
STC_PADDING = {"stc_connector": 1, "stc_connector_v35": 0}


def build_vision_projector(projector_type: str, mm_hidden_size: int, hidden_size: int) -> nn.Module:
    if projector_type in STC_PADDING:
        return STCConnector(mm_hidden_size, hidden_size, padding=STC_PADDING[projector_type])
    m = re.fullmatch(r"mlp(\d+)x_gelu", projector_type)
    if m:
        return build_mlp(int(m.group(1)), mm_hidden_size, hidden_size)
    if projector_type == "linear":
        return nn.Linear(mm_hidden_size, hidden_size)
    raise ValueError(f"unsupported mm_projector_type {projector_type!r} (supported: stc_connector, "
                     f"stc_connector_v35, linear, mlpNx_gelu)")


def build_audio_projector(projector_type: str, mm_hidden_size_a: int, hidden_size_a: int) -> nn.Module:
    m = re.fullmatch(r"mlp(\d+)x_gelu", projector_type)
    if m:
        return build_mlp(int(m.group(1)), mm_hidden_size_a, hidden_size_a)
    if projector_type == "linear":
        return nn.Linear(mm_hidden_size_a, hidden_size_a)
    raise ValueError(f"unsupported mm_projector_a_type {projector_type!r} (supported: linear, mlpNx_gelu)")
