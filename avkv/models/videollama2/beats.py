"""BEATs audio encoder (Microsoft, MIT licence) as VideoLLaMA2.1-AV uses it, in plain torch.

Input: a 128-bin Kaldi fbank ``[B, frames, 128]`` (see :func:`avkv.models.videollama2.processing.kaldi_fbank`).
The encoder normalises it with the AudioSet statistics, cuts it into 16×16 patches with a conv, and runs a
post-norm ("deep norm") transformer whose attention has a gated, bucketed relative-position bias shared by all
layers. Output: one feature per patch, ``[B, (frames // 16) * (128 // 16), encoder_embed_dim]``, patches ordered
time-major (8 frequency patches per time step).

Module and parameter names follow the official ``videollama2/model/beats`` tree (``patch_embedding``,
``post_extract_proj``, ``encoder.pos_conv.0.weight_g`` / ``weight_v`` of its weight-normalised conv,
``encoder.layers.{i}.self_attn.relative_attention_bias`` shared by every layer, ``predictor`` …).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

#: AudioSet fbank statistics BEATs normalises with (``BEATs.preprocess`` defaults)
FBANK_MEAN, FBANK_STD = 15.41663, 6.55582


@dataclass
class BEATsConfig:
    """The fields of the official ``BEATsConfig`` that shape the module tree, with its defaults.

    The official model builds its audio tower with ``BEATsConfig()`` (defaults) when it loads a VideoLLaMA2-AV
    checkpoint, so these defaults are the architecture of the released model.
    """

    input_patch_size: int = 16
    embed_dim: int = 512
    conv_bias: bool = False
    encoder_layers: int = 12
    encoder_embed_dim: int = 768
    encoder_ffn_embed_dim: int = 3072
    encoder_attention_heads: int = 12
    activation_fn: str = "gelu"
    layer_norm_first: bool = False
    deep_norm: bool = True
    conv_pos: int = 128
    conv_pos_groups: int = 16
    relative_position_embedding: bool = True
    num_buckets: int = 320
    max_distance: int = 800
    gru_rel_pos: bool = True
    finetuned_model: bool = True
    predictor_class: int = 527

    @classmethod
    def from_dict(cls, d: dict | None) -> "BEATsConfig":
        d = dict(d or {})
        known = {k: d.pop(k) for k in list(d) if k in cls.__dataclass_fields__}
        # the official config carries training-only fields too (dropouts, layerdrop, ...): they do not shape
        # the module tree and inference ignores them
        return cls(**known)

    def to_dict(self) -> dict:
        return asdict(self)


class WeightNormConv1d(nn.Conv1d):
    """Conv1d whose weight is ``g * v / ||v||`` with the norm over every dim but ``dim`` (official
    ``weight_norm_fix``: rsqrt(sum v² + 1e-6), computed in fp32). Parameters: ``weight_g``, ``weight_v``, ``bias``."""

    def __init__(self, *args, wn_dim: int = 2, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.wn_dim = wn_dim
        w = self.weight.detach()
        del self.weight
        reduce = [i for i in range(w.dim()) if i != wn_dim]
        self.weight_g = nn.Parameter(w.norm(dim=reduce, keepdim=True))
        self.weight_v = nn.Parameter(w.clone())

    def normalized_weight(self) -> torch.Tensor:
        v = self.weight_v.float()
        reduce = [i for i in range(v.dim()) if i != self.wn_dim]
        v = v * torch.rsqrt(v.pow(2).sum(reduce, keepdim=True) + 1e-6)
        return self.weight_g * v.to(self.weight_v.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.normalized_weight(), self.bias)


class SamePad(nn.Module):
    def __init__(self, kernel_size: int) -> None:
        super().__init__()
        self.remove = 1 if kernel_size % 2 == 0 else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, : -self.remove] if self.remove else x


def _gelu_fp32(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x.float()).type_as(x)


class MultiheadAttention(nn.Module):
    """BEATs self-attention with the gated relative-position bias (``gru_rel_pos``)."""

    ALPHA = 32.0

    def __init__(self, embed_dim: int, num_heads: int, has_relative_attention_bias: bool, num_buckets: int,
                 max_distance: int, gru_rel_pos: bool) -> None:
        super().__init__()
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.scaling = self.head_dim ** -0.5
        self.num_buckets, self.max_distance = num_buckets, max_distance
        self.has_relative_attention_bias = has_relative_attention_bias
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(num_buckets, num_heads)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self.gru_rel_pos = gru_rel_pos
        if gru_rel_pos:
            self.grep_linear = nn.Linear(self.head_dim, 8)
            self.grep_a = nn.Parameter(torch.ones(1, num_heads, 1, 1))

    def _bucket(self, rel: torch.Tensor) -> torch.Tensor:
        """Bidirectional log-spaced buckets (T5 style) of relative positions ``key - query``."""
        nb = self.num_buckets // 2
        buckets = (rel > 0).long() * nb
        rel = rel.abs()
        max_exact = nb // 2
        is_small = rel < max_exact
        large = max_exact + (torch.log(rel.clamp(min=1).float() / max_exact)
                             / math.log(self.max_distance / max_exact) * (nb - max_exact)).long()
        large = large.clamp(max=nb - 1)
        return buckets + torch.where(is_small, rel, large)

    def compute_bias(self, q_len: int, k_len: int) -> torch.Tensor:
        """[H, q_len, k_len] relative-position bias."""
        dev = self.relative_attention_bias.weight.device
        rel = torch.arange(k_len, device=dev)[None, :] - torch.arange(q_len, device=dev)[:, None]
        return self.relative_attention_bias(self._bucket(rel)).permute(2, 0, 1)

    def forward(self, x: torch.Tensor, position_bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: [T, B, C] (time first, as fairseq) → ([T, B, C], position_bias [B*H, T, T])."""
        T, B, C = x.shape
        H, hd = self.num_heads, self.head_dim
        if self.has_relative_attention_bias and position_bias is None:
            position_bias = self.compute_bias(T, T).unsqueeze(0).expand(B, -1, -1, -1).reshape(B * H, T, T)
        q = self.q_proj(x) * self.scaling / self.ALPHA
        k, v = self.k_proj(x), self.v_proj(x)
        q = q.reshape(T, B * H, hd).transpose(0, 1)
        k = k.reshape(T, B * H, hd).transpose(0, 1)
        v = v.reshape(T, B * H, hd).transpose(0, 1)
        attn = torch.bmm(q, k.transpose(1, 2))
        attn = (attn - attn.max(dim=-1, keepdim=True)[0]) * self.ALPHA
        if position_bias is not None:
            bias = position_bias
            if self.gru_rel_pos:
                ql = q.view(B, H, T, hd) * self.ALPHA / self.scaling          # = q_proj(x) per head
                gate_a, gate_b = torch.sigmoid(self.grep_linear(ql).view(B, H, T, 2, 4).sum(-1)).chunk(2, dim=-1)
                gate = gate_a * (gate_b * self.grep_a - 1.0) + 2.0
                bias = gate.view(B * H, T, 1) * position_bias
            attn = attn + bias.view(attn.shape)
        attn = F.softmax(attn, dim=-1).type_as(attn)
        out = torch.bmm(attn, v).transpose(0, 1).reshape(T, B, C)
        return self.out_proj(out), position_bias


class EncoderLayer(nn.Module):
    """fairseq ``TransformerSentenceEncoderLayer`` (post-norm with deep-norm residual scaling by default)."""

    def __init__(self, cfg: BEATsConfig, has_relative_attention_bias: bool) -> None:
        super().__init__()
        if cfg.activation_fn != "gelu":
            raise ValueError(f"BEATs activation_fn {cfg.activation_fn!r} is not supported (only 'gelu')")
        C = cfg.encoder_embed_dim
        self.self_attn = MultiheadAttention(C, cfg.encoder_attention_heads, has_relative_attention_bias,
                                            cfg.num_buckets, cfg.max_distance, cfg.gru_rel_pos)
        self.self_attn_layer_norm = nn.LayerNorm(C)
        self.fc1 = nn.Linear(C, cfg.encoder_ffn_embed_dim)
        self.fc2 = nn.Linear(cfg.encoder_ffn_embed_dim, C)
        self.final_layer_norm = nn.LayerNorm(C)
        self.layer_norm_first = cfg.layer_norm_first
        self.alpha = math.pow(2 * cfg.encoder_layers, 0.25) if cfg.deep_norm else 1.0

    def forward(self, x: torch.Tensor, pos_bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.layer_norm_first:
            h, pos_bias = self.self_attn(self.self_attn_layer_norm(x), pos_bias)
            x = x + h
            x = x + self.fc2(_gelu_fp32(self.fc1(self.final_layer_norm(x))))
            return x, pos_bias
        h, pos_bias = self.self_attn(x, pos_bias)
        x = self.self_attn_layer_norm(x * self.alpha + h)
        x = self.final_layer_norm(x * self.alpha + self.fc2(_gelu_fp32(self.fc1(x))))
        return x, pos_bias


class TransformerEncoder(nn.Module):
    def __init__(self, cfg: BEATsConfig) -> None:
        super().__init__()
        C = cfg.encoder_embed_dim
        conv = WeightNormConv1d(C, C, kernel_size=cfg.conv_pos, padding=cfg.conv_pos // 2,
                                groups=cfg.conv_pos_groups, wn_dim=2)
        self.pos_conv = nn.Sequential(conv, SamePad(cfg.conv_pos), nn.GELU())
        self.layers = nn.ModuleList([EncoderLayer(cfg, cfg.relative_position_embedding)
                                     for _ in range(cfg.encoder_layers)])
        if cfg.relative_position_embedding:
            # one bias table for the whole stack: later layers reference layer 0's module (official tree)
            for layer in self.layers[1:]:
                layer.self_attn.relative_attention_bias = self.layers[0].self_attn.relative_attention_bias
        self.layer_norm_first = cfg.layer_norm_first
        self.layer_norm = nn.LayerNorm(C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos_conv(x.transpose(1, 2)).transpose(1, 2)
        if not self.layer_norm_first:
            x = self.layer_norm(x)
        x = x.transpose(0, 1)
        pos_bias = None
        for layer in self.layers:
            x, pos_bias = layer(x, pos_bias)
        x = x.transpose(0, 1)
        if self.layer_norm_first:
            x = self.layer_norm(x)
        return x


class BEATs(nn.Module):
    def __init__(self, cfg: BEATsConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.post_extract_proj = (nn.Linear(cfg.embed_dim, cfg.encoder_embed_dim)
                                  if cfg.embed_dim != cfg.encoder_embed_dim else None)
        self.patch_embedding = nn.Conv2d(1, cfg.embed_dim, kernel_size=cfg.input_patch_size,
                                         stride=cfg.input_patch_size, bias=cfg.conv_bias)
        self.encoder = TransformerEncoder(cfg)
        self.layer_norm = nn.LayerNorm(cfg.embed_dim)
        # the fine-tuned checkpoint carries its AudioSet classifier; VideoLLaMA2 never calls it
        self.predictor = nn.Linear(cfg.encoder_embed_dim, cfg.predictor_class) if cfg.finetuned_model else None

    def num_patches(self, frames: int, mel_bins: int = 128) -> int:
        p = self.cfg.input_patch_size
        return (frames // p) * (mel_bins // p)

    def extract_features(self, fbank: torch.Tensor) -> torch.Tensor:
        """fbank [B, frames, bins] (raw Kaldi log-mel) → features [B, patches, encoder_embed_dim]."""
        x = (fbank - FBANK_MEAN) / (2 * FBANK_STD)
        x = self.patch_embedding(x.unsqueeze(1))                 # [B, embed, T', F']
        x = x.reshape(x.shape[0], x.shape[1], -1).transpose(1, 2)
        x = self.layer_norm(x)
        if self.post_extract_proj is not None:
            x = self.post_extract_proj(x)
        return self.encoder(x)
