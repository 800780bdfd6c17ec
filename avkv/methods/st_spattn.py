"""ST-SpAttn, PureKV's spatial-temporal sparse prefill attention (:mod:`avkv.methods.purekv`, which re-exports it):
the pattern as a dense mask (:func:`st_allowed_mask`, for references), the sparse kernel (:func:`st_sparse_attention`)
and the ``avkv_st_spattn`` attention function registered with transformers, live while a PureKV sample's
:class:`STContext` is active.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

ST_ATTENTION_NAME = "avkv_st_spattn"


# ---------------------------------------------------------------------------------------- ST-SpAttn kernel
def st_allowed_mask(frame: torch.Tensor, spatial: torch.Tensor, radius: int = 0,
                    max_prev: int | None = None) -> torch.Tensor:
    """The ST-SpAttn pattern as a dense boolean [n, n] mask (True = may attend). For references and small inputs."""
    n = frame.numel()
    pos = torch.arange(n)
    causal = pos[None, :] <= pos[:, None]
    isv = frame >= 0
    fq, fk = frame[:, None], frame[None, :]
    same_frame = (fq == fk) & isv[:, None] & isv[None, :]
    dt = fq - fk
    temporal = isv[:, None] & isv[None, :] & (dt > 0) & ((spatial[:, None] - spatial[None, :]).abs() <= radius)
    if max_prev is not None:
        temporal &= dt <= max_prev
    video_row = (~isv[None, :]) | same_frame | temporal
    allowed = torch.where(isv[:, None], video_row, torch.ones_like(causal))
    return allowed & causal


def _attend_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float,
                fused: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention with an additive bias that also returns the row log-sum-exp: q [B, H, L, D], k/v [B, H, S, D],
    bias [B, 1, L, S] → (out [B, H, L, D], lse [B, H, L] fp32).

    On CPU the fused flash kernel behind SDPA returns the log-sum-exp itself
    (``aten._scaled_dot_product_flash_attention_for_cpu``); elsewhere, or when ``fused=False``, it is computed
    explicitly (fp32 logits). Both paths are tested equal.
    """
    if fused and q.device.type == "cpu":
        op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
        if op is not None:
            out, lse = op(q, k, v, 0.0, False, attn_mask=bias.to(q.dtype), scale=scale)
            return out, lse.float()
    logits = torch.matmul(q, k.transpose(-1, -2)).float().mul_(scale).add_(bias.float())
    lse = logits.logsumexp(-1)
    out = torch.matmul((logits - lse[..., None]).exp_().to(v.dtype), v)
    return out, lse


def st_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, frame: torch.Tensor,
                        spatial: torch.Tensor, scaling: float, radius: int = 0, max_prev: int | None = None,
                        max_elems: int = 1 << 27, fused: bool = True) -> torch.Tensor:
    """Prefill attention with the ST-SpAttn pattern, computed sparsely: [H, n, D] queries, [kvH, n, D] keys.

    * non-video query rows: dense causal SDPA;
    * video query rows, block A (batched over frames): the non-video keys before them and their own frame's keys
      (causal) — one SDPA call per chunk of frames, which also yields each row's log-sum-exp;
    * video query rows, block B: the keys at the same spatial index (± radius) in earlier frames, gathered per
      query (T·(2r+1) keys each) and computed explicitly;
    * A and B are merged exactly through their log-sum-exps (one softmax over the union of the two key sets).

    Cost for T frames of P tokens and M other tokens: O(T·P·(M+P) + T²·P·(2r+1)) instead of O((T·P + M)²).
    Equals dense SDPA with :func:`st_allowed_mask` (tested).
    """
    H, n, D = q.shape
    G = H // k.shape[0]
    dev = q.device
    frame, spatial = frame[:n].to(dev), spatial[:n].to(dev)
    isv = frame >= 0
    if not bool(isv.any()):
        return F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True, scale=scaling,
                                              enable_gqa=G > 1)[0]
    out = torch.empty_like(q)
    pos = torch.arange(n, device=dev)
    nv = (~isv).nonzero().flatten()                                       # non-video positions (M)
    if nv.numel():
        mask = pos[None, :] <= nv[:, None]
        out[:, nv] = F.scaled_dot_product_attention(q[None, :, nv], k[None], v[None], attn_mask=mask[None, None],
                                                    scale=scaling, enable_gqa=G > 1)[0]

    # grid of video positions: [T, P] (frame × spatial index), -1 where a (frame, spatial) pair is absent
    frames = torch.unique(frame[isv])                                     # sorted frame ids
    T = frames.numel()
    vpos = isv.nonzero().flatten()
    t_of, sp = torch.searchsorted(frames, frame[vpos]), spatial[vpos]
    if bool((sp < 0).any()):
        raise ValueError("ST-SpAttn: video positions need a spatial index >= 0")
    P = int(sp.max()) + 1
    grid = torch.full((T, P), -1, dtype=torch.long, device=dev)
    grid[t_of, sp] = vpos
    if int((grid >= 0).sum()) != vpos.numel():
        raise ValueError("ST-SpAttn: two video positions share one (frame, spatial) index")
    valid = grid >= 0
    gpos = grid.clamp_min(0)
    last_q = torch.where(valid, grid, torch.full_like(grid, -1)).amax(1)  # last video position of each frame

    kvH = k.shape[0]
    qg = q.view(kvH, G, n, D)                                             # query heads grouped by KV head (GQA)
    offsets = torch.arange(-radius, radius + 1, device=dev)
    O = offsets.numel()
    cols = torch.arange(P, device=dev)[:, None] + offsets[None, :]       # [P, O] spatial neighbours
    col_ok = (cols >= 0) & (cols < P)
    cols = cols.clamp(0, P - 1)
    kpB = gpos[:, cols].permute(1, 2, 0).reshape(P, O * T)                # [P, O*T] key positions per spatial p
    okB = (valid[:, cols] & col_ok[None]).permute(1, 2, 0).reshape(P, O * T)
    tsB = torch.arange(T, device=dev).repeat(O)                           # frame of each temporal key slot
    kB_all, vB_all = k[:, kpB], v[:, kpB]                                 # [kvH, P, O*T, D]
    per_frame = H * P * (nv.numel() + P + O * T)
    fpc = max(1, int(max_elems // max(1, per_frame)))                     # frames per chunk (memory bound)
    for t0 in range(0, T, fpc):
        t1 = min(T, t0 + fpc)
        tt = t1 - t0
        qpos = gpos[t0:t1]                                                # [tt, P]
        vq = valid[t0:t1]
        nvc = nv[nv < int(last_q[t0:t1].max())]                            # non-video keys some query here can see
        M = nvc.numel()
        qv = qg[:, :, qpos]                                               # [kvH, G, tt, P, D]
        # block A: per frame, the G·P queries of a KV group over [M non-video + P own-frame] keys, causal bias
        kidx = torch.cat([nvc[None].expand(tt, -1), qpos], 1)             # [tt, M+P]
        qa = qv.permute(2, 0, 1, 3, 4).reshape(tt, kvH, G * P, D)
        ka, va = k[:, kidx].transpose(0, 1), v[:, kidx].transpose(0, 1)   # [tt, kvH, M+P, D]
        allowA = (kidx[:, None, :] <= qpos[:, :, None]) & torch.cat(
            [torch.ones(tt, 1, M, dtype=torch.bool, device=dev), vq[:, None, :]], 2)
        allowA |= ~vq[:, :, None]                                         # padded query rows: anything (discarded)
        biasA = torch.zeros(allowA.shape, dtype=torch.float32, device=dev).masked_fill_(~allowA, float("-inf"))
        biasA = biasA[:, None].expand(tt, G, P, M + P).reshape(tt, 1, G * P, M + P)
        oA, lseA = _attend_lse(qa, ka, va, biasA, scaling, fused)         # [tt, kvH, G*P, D], [tt, kvH, G*P]
        oA = oA.view(tt, kvH, G, P, D).permute(1, 2, 0, 3, 4)             # [kvH, G, tt, P, D]
        lseA = lseA.view(tt, kvH, G, P).permute(1, 2, 0, 3)               # [kvH, G, tt, P]
        # block B: same spatial index (± radius) in earlier frames
        tq = torch.arange(t0, t1, device=dev)[:, None, None]
        okb = okB[None] & (tsB[None, None, :] < tq) & vq[:, :, None]      # [tt, P, O*T]
        if max_prev is not None:
            okb &= (tq - tsB[None, None, :]) <= max_prev
        lB = torch.einsum("kgtpd,kpsd->kgtps", qv, kB_all).float().mul_(scaling)      # [kvH, G, tt, P, O*T]
        lB = lB.masked_fill_(~okb, float("-inf"))
        lseB = lB.logsumexp(-1)                                           # -inf where no temporal key
        # merge exactly: out = (e^{lseA}·oA + Σ_B e^{l}·v) / (e^{lseA} + e^{lseB})
        lse = torch.logaddexp(lseA, lseB)
        wA = (lseA - lse).exp_()[..., None].to(q.dtype)
        pB = (lB - lse[..., None]).exp_().to(q.dtype)                     # normalised by the joint lse
        o = (wA * oA + torch.einsum("kgtps,kpsd->kgtpd", pB, vB_all)).reshape(H, tt, P, D)
        out[:, qpos[vq]] = o[:, vq]
    return out


# ---------------------------------------------------------------------------------- registered attention
@dataclass
class STContext:
    frame: torch.Tensor
    spatial: torch.Tensor
    dense_layers: int
    radius: int
    max_prev: int | None
    expected: bool = True          # a prompt with video and at least one sparse layer: the function must be reached
    base: Callable | None = None   # the model's own attention function, while active
    calls: int = 0
    used_layers: set = field(default_factory=set)

    @contextlib.contextmanager
    def activate(self, base: Callable) -> Iterator[None]:
        """The pattern is live inside (the engine holds the decoder on ``avkv_st_spattn`` meanwhile)."""
        if _ACTIVE.ctx is not None:
            raise RuntimeError("PureKV: ST-SpAttn is already active (nested prefill)")
        self.base, _ACTIVE.ctx = base, self
        try:
            yield
        finally:
            _ACTIVE.ctx, self.base = None, None
        if self.expected and self.calls == 0:
            raise RuntimeError("PureKV: ST-SpAttn was on for a prompt with video but the model never called the "
                               f"'{ST_ATTENTION_NAME}' attention function during prefill")


class _Active(threading.local):
    ctx: STContext | None = None


_ACTIVE = _Active()


def st_spattn_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention function registered as ``avkv_st_spattn`` (transformers ``AttentionInterface`` signature).

    Applies ST-SpAttn to the first prefill chunk of causal decoder layers ≥ ``st_dense_layers`` while a PureKV
    sample is active; everything else goes to the implementation the model used before.
    """
    ctx = _ACTIVE.ctx
    if ctx is None:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, scaling=scaling,
                                               dropout=dropout, **kwargs)
    layer = getattr(module, "layer_idx", None)
    q_len, k_len = query.shape[2], key.shape[2]
    if (not getattr(module, "is_causal", False) or layer is None or layer < ctx.dense_layers or query.shape[0] != 1
            or q_len != k_len or q_len <= 1 or q_len > ctx.frame.numel() or not bool((ctx.frame[:q_len] >= 0).any())):
        return ctx.base(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    sc = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = st_sparse_attention(query[0], key[0], value[0], ctx.frame[:q_len], ctx.spatial[:q_len], sc,
                              ctx.radius, ctx.max_prev)
    ctx.calls += 1
    ctx.used_layers.add(int(layer))
    return out.transpose(0, 1).unsqueeze(0).contiguous(), None


def register_st_attention(base_impl: str = "sdpa") -> str:
    """Register ``avkv_st_spattn`` (attention + the mask function of ``base_impl``) with transformers."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    AttentionInterface.register(ST_ATTENTION_NAME, st_spattn_attention)
    mask_impl = base_impl if base_impl in ALL_MASK_ATTENTION_FUNCTIONS else "sdpa"
    AttentionMaskInterface.register(ST_ATTENTION_NAME, ALL_MASK_ATTENTION_FUNCTIONS[mask_impl])
    return ST_ATTENTION_NAME
