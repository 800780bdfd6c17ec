"""All-query attention statistics: column sums (and weighted block sums) of the causal softmax over every prompt query.

H2O, LOOK-M, D2O, KVMerger, ObservedAttention and PureKV's ``clie_scope=all`` need the column sums
c_j = Σ_{i≥j} A[i, j] of the prompt's causal attention; AccKV and FlowMM need row/column-weighted sums of A and its
sums over modality blocks. A = softmax(q·kᵀ·s) is never materialised: query rows are processed in chunks and every
chunk holds complete rows, so each result is exact.

Three routes:

* ``fused`` (:func:`attention_with_sums`, run by the prefill itself, :mod:`avkv.lse_attention`): the layer's
  attention computed chunk by chunk (q·kᵀ, softmax, P·V) and, from the same probabilities, the sums Σ_i w_r[i]·A[i, j]
  for every row-weight vector r the method declared (:meth:`avkv.methods.base.Method.all_query_rows`; plain column
  sums always): q·kᵀ is computed once for the output and the statistics. On CPU the loop is one compiled call
  (:mod:`avkv.methods.fused_kernel`: per KV head, tiles that stay in L2, products through torch's BLAS, the
  probabilities written once into the chunk buffer the sums read, with streaming stores when it exceeds 8 MB) when
  that kernel builds, else torch ops;
* ``lse`` (the prefill captured the rows' log-sum-exps): A[i, j] = exp(q_i·k_j·s − lse_i) recomputed, one ``baddbmm``
  (the −lse folded in) and one ``exp2`` per element, no max/normalise passes, no P·V product (:func:`column_pass`);
* ``softmax`` (no captured statistics: eager or another backend, a masked prefill, a deferred pass): the same chunks
  with an exact causal softmax (one matmul per element as well, plus the max and the normalisation).

Row reductions (plain sums, row weights, modality blocks) are one matrix product of the chunk with a small matrix of
row weights (:func:`row_matrix`), so the chunk is read once whatever the number of statistics. Query heads are grouped
onto their KV head by a reshape (transformers' ``repeat_kv`` head order), so the keys are never repeated per query
head. Which prefill route runs is :func:`prefill_route`, a rule measured with ``scripts/bench_allquery.py``
(``results/bench/README.md``); sums the fused prefill did not accumulate (rows no method declared) come from the
``lse`` route over its log-sum-exps.
"""
from __future__ import annotations

from dataclasses import dataclass

import math

import torch


@dataclass
class PrefillStats:
    """What the prefill's attention captured for one layer: post-RoPE queries [H, S, D] (the model's dtype), the
    rows' natural log-sum-exps of the scaled, causal logits [H, S] (fp32), and on the ``fused`` route the row-weight
    vectors [R, S] it accumulated and their sums Σ_i w_r[i]·A[h, i, j] [H, R, S] (fp32). ``route``: how they
    were computed, ``"fused/c"`` (the compiled kernel), ``"fused/torch"`` or ``"lse"``."""

    queries: torch.Tensor
    lse: torch.Tensor
    row_weights: torch.Tensor | None = None
    sums: torch.Tensor | None = None
    route: str = "lse"

    @property
    def seq_len(self) -> int:
        return int(self.queries.shape[1])


#: rows per chunk (memory O(H·chunk·S)); chosen by measurement, see ``results/bench/README.md``
DEFAULT_CHUNK = 128
#: key columns per tile of the ``lse`` route (a tile's exp and row sum run while it is in cache)
TILE = 1024
#: rows per chunk and key columns per tile of the ``fused`` route (measured, ``results/bench/README.md``)
FUSED_CHUNK, FUSED_TILE = 32, 2048
#: key columns per tile of the compiled fused kernel: one KV head's 7·32 rows × 1024 keys (917 KB) stay in L2
KERNEL_TILE = 1024
LOG2E = 1.4426950408889634


def column_pass(queries, keys: torch.Tensor, scale: float, num_heads: int, lse: torch.Tensor | None = None,
                row_weights: torch.Tensor | None = None, chunk: int = DEFAULT_CHUNK,
                max_elements: int = 1 << 26) -> torch.Tensor:
    """Σ_i w_r[i] · A[h, i, j] for every row-weight vector r: ``[H, R, S]`` (R = 1 with plain sums).

    ``queries``: [H, S, D] or a callable (start, end) -> [H, end-start, D]; ``keys``: [kvH, S, D] (query head h uses
    KV head h // (H/kvH)); ``lse``: [H, S] captured row log-sum-exps (``lse`` route) or None (``softmax`` route);
    ``row_weights``: [R, S] or None. A chunk of c rows needs H·c·S floats at most; ``chunk`` shrinks so that this
    stays under ``max_elements``.
    """
    qf = queries if callable(queries) else (lambda a, b: queries[:, a:b])
    kvH, S, D = keys.shape
    H, g = num_heads, num_heads // kvH
    dev = keys.device
    k = keys.float()
    R = 1 if row_weights is None else int(row_weights.shape[0])
    rw = None if row_weights is None else row_weights.to(dev, torch.float32)
    out = torch.zeros(H, R, S, dtype=torch.float32, device=dev)
    c = max(1, min(chunk, max_elements // max(1, H * S)))
    for a in range(0, S, c):
        e = min(S, a + c)
        r = e - a
        qg = qf(a, e).float().reshape(kvH, g * r, D)                      # query heads grouped on their KV head
        bias = None if lse is None else lse[:, a:e].to(dev, torch.float32).reshape(kvH, g * r, 1).mul(-LOG2E)
        for b in range(0, e, TILE if lse is not None else e):             # rows [a, e) see keys [0, e) at most
            b2 = min(e, b + TILE) if lse is not None else e
            kt = k[:, b:b2].transpose(1, 2)
            if lse is not None:                                           # column tiles stay in cache: exp + sum
                p = torch.baddbmm(bias, qg, kt, alpha=scale * LOG2E).view(H, r, b2 - b).exp2_()   # exp2: ~3× exp
                if b2 > a:
                    p[:, :, max(a, b) - b:].masked_fill_(_upper(r, dev)[:, max(a, b) - a:b2 - a], 0.0)
            else:                                                         # softmax needs whole rows
                p = torch.bmm(qg, kt).mul_(scale).view(H, r, e)
                p[:, :, a:].masked_fill_(_upper(r, dev), float("-inf"))
                p = p.softmax(-1)
            if rw is None:
                out[:, 0, b:b2] += p.sum(1)
            else:
                out[:, :, b:b2] += torch.matmul(rw[:, a:e], p)
    return out


def _upper(r: int, dev) -> torch.Tensor:
    """[r, r] mask of the keys a row cannot see in the diagonal block (row i sees keys ≤ i)."""
    return torch.ones(r, r, dtype=torch.bool, device=dev).triu(1)


def attention_with_sums(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                        row_weights: torch.Tensor | None = None, chunk: int = FUSED_CHUNK, tile: int | None = None,
                        max_elements: int = 1 << 26, kernel: bool | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Causal attention of queries [H, S, D] over keys/values [kvH, S, D] (query head h reads KV head h // (H/kvH)),
    and from the same probabilities the row-weighted column sums: returns ``out`` [S, H, Dv] (q's dtype),
    ``lse`` [H, S] (natural log-sum-exps of the scaled logits, fp32) and ``sums`` [H, R, S] =
    Σ_i row_weights[r, i]·A[h, i, j] (fp32; R = 1, plain column sums, without ``row_weights``).

    Rows go in chunks of ``chunk``; each chunk's keys go in tiles of ``tile`` columns with an online softmax (the
    tile's logits, max, exp2, row sum and P·V while it is in cache; the output rescaled when the row max grows).
    The tiles' probabilities stay in one chunk buffer (H·chunk·S floats at most, ``chunk`` shrinks to keep it under
    ``max_elements``) until the chunk's rows are complete; then the sums are one product per tile with
    w_r[i]·2^(m_tile,i − m_i)/l_i. Nothing of size S×S exists. fp32 throughout; exact up to fp32 rounding (not
    bit-identical to SDPA's kernel).

    ``kernel``: the whole loop as one compiled call (:mod:`avkv.methods.fused_kernel`: per KV head, tiles that
    stay in cache, the products through torch's BLAS; None: when it is available on this CPU; False: torch ops
    only; True: required). Which ran is :func:`fused_impl`'s answer for the same argument. ``tile`` defaults to
    ``KERNEL_TILE`` for the kernel and ``FUSED_TILE`` for the torch ops."""
    so = _kernel_lib(kernel) if q.device.type == "cpu" else None
    if kernel and so is None:
        raise RuntimeError("attention_with_sums(kernel=True): the fused kernel is not available (see the warning "
                           "of avkv.methods.fused_kernel, or AVKV_FUSED_KERNEL=0)")
    if so is not None:
        return _with_sums_kernel(so, q, k, v, scale, row_weights, chunk, tile or KERNEL_TILE, max_elements)
    tile = tile or FUSED_TILE
    H, S, D = q.shape
    kvH, Dv = k.shape[0], v.shape[-1]
    g, dev = H // kvH, q.device
    rw = torch.ones(1, S, device=dev) if row_weights is None else row_weights.to(dev, torch.float32)
    out = torch.empty(S, H, Dv, dtype=q.dtype, device=dev)
    lse = torch.empty(H, S, dtype=torch.float32, device=dev)
    sums = torch.zeros(H, rw.shape[0], S, dtype=torch.float32, device=dev)
    kT, vf = k.float().transpose(1, 2).contiguous(), v.float()                     # [kvH, D, S], [kvH, S, Dv]
    c = max(1, min(chunk, max_elements // max(1, H * S)))
    buf = torch.empty(H * c * S, dtype=torch.float32, device=dev)
    up, a2 = _upper(c, dev), scale * LOG2E                                          # logits in log2 units
    for a in range(0, S, c):
        e = min(S, a + c)
        r = e - a
        M = g * r                                                                   # rows of one KV head's group
        qg = q[:, a:e].float().reshape(kvH, M, D).mul(a2)                          # never in place: q is the caller's
        m = l = acc = None
        tiles = []
        for b in range(0, e, tile):                                                 # rows [a, e) see keys [0, e)
            b2 = min(e, b + tile)
            st = buf[b * kvH * M: b2 * kvH * M].view(kvH, M, b2 - b)                # contiguous per tile
            torch.bmm(qg, kT[:, :, b:b2], out=st)
            if b2 > a:                                                              # the diagonal block
                st.view(H, r, b2 - b)[:, :, max(a, b) - b:].masked_fill_(up[:r, max(a, b) - a:b2 - a], -math.inf)
            mt = st.amax(-1, keepdim=True)
            if m is not None:
                mt = torch.maximum(mt, m)
            torch.exp2(st.sub_(mt), out=st)
            lt, ot = st.sum(-1, keepdim=True), torch.bmm(st, vf[:, b:b2])
            if m is None:
                acc, l = ot, lt
            else:                                                                   # the row max grew: rescale
                f = torch.exp2(m - mt)
                acc, l = acc.mul_(f).add_(ot), l.mul_(f).add_(lt)
            m = mt
            tiles.append((b, b2, mt, st))
        out[a:e] = acc.div_(l).view(H, r, Dv).transpose(0, 1)
        lse[:, a:e] = (m + l.log2()).div_(LOG2E).view(H, r)
        wl = rw[None, :, a:e] / l.view(H, 1, r)                                     # [H, R, r]
        for b, b2, mt, st in tiles:
            sums[:, :, b:b2] += torch.bmm(wl * torch.exp2(mt - m).view(H, 1, r), st.view(H, r, b2 - b))
    return out, lse, sums


def _kernel_lib(kernel: bool | None):
    if kernel is False:
        return None
    from avkv.methods import fused_kernel
    return fused_kernel.lib()


def fused_impl(device, kernel: bool | None = None) -> str:
    """What :func:`attention_with_sums` runs its element-wise work with: ``"c"`` (the compiled tile pass) or
    ``"torch"``."""
    return "c" if torch.device(device).type == "cpu" and _kernel_lib(kernel) is not None else "torch"


def _with_sums_kernel(so, q, k, v, scale, row_weights, chunk, tile, max_elements):
    """:func:`attention_with_sums` as one compiled call (:func:`avkv.methods.fused_kernel.fused_attention`): the
    same chunks and tiles, per KV head, the products through torch's BLAS; the output cast to q's dtype."""
    from avkv.methods.fused_kernel import fused_attention
    H, S = q.shape[:2]
    g = H // k.shape[0]
    rw = torch.ones(1, S) if row_weights is None else row_weights
    c = max(1, min(chunk, max_elements // max(1, g * S)))       # the probabilities buffer: g·c·S floats
    out, lse, sums = fused_attention(so, q, k, v, scale, rw, c, tile)
    return out.to(q.dtype), lse, sums


def prefill_route(device: torch.device, num_heads: int, kv_heads: int, head_dim: int, seq_len: int) -> str:
    """Which prefill computes a layer's all-query statistics: ``fused`` (:func:`attention_with_sums` in place of
    SDPA's kernel) or ``lse`` (SDPA's kernel with its log-sum-exps, then :func:`column_pass`).

    The rule is the measurement (``scripts/bench_allquery.py``, ``results/bench/README.md``): on CPU the fused
    route's extra time over SDPA's kernel was below the ``lse`` pass at every measured shape and length (Qwen2.5-0.5B
    and -7B layers, 4k and 16k); on other devices nothing was measured and the ``lse`` route (the device's flash
    kernel, bit-identical output) is kept. Short prompts (< 2 chunks) take ``lse`` as well (no gain to measure)."""
    if device.type == "cpu" and seq_len >= 2 * FUSED_CHUNK:
        return "fused"
    return "lse"


def row_matrix(S: int, device, row_weight: torch.Tensor | None = None, blocks: dict | None = None) -> torch.Tensor:
    """The row-weight vectors [1 + len(blocks), S] of :func:`weighted_sums`: ``row_weight`` (ones by default),
    then ``row_weight`` · rows of every block, in order."""
    w = torch.ones(S, dtype=torch.float32, device=device) if row_weight is None else row_weight.to(device, torch.float32)
    return torch.stack([w] + [w * r.to(device, torch.float32) for r, _ in (blocks or {}).values()])


def captured_sums(st: PrefillStats | None, rows: torch.Tensor) -> torch.Tensor | None:
    """The fused prefill's sums [H, R, S] for the requested row vectors [R, S] (each found, equal, among those it
    accumulated), or None when any is missing."""
    if st is None or st.sums is None:
        return None
    have = st.row_weights.to(rows.device)
    idx = []
    for w in rows:
        hit = [i for i in range(have.shape[0]) if torch.equal(have[i], w)]
        if not hit:
            return None
        idx.append(hit[0])
    return st.sums[:, idx]


def usable(view) -> PrefillStats | None:
    """The view's captured statistics when they describe exactly its cache (same length), else None."""
    st = getattr(view, "stats", None)
    if st is None or st.seq_len != view.seq_len or st.queries.shape[0] != view.num_heads:
        return None
    return st


def accumulated(view, chunk: int = DEFAULT_CHUNK, max_elements: int = 1 << 26) -> torch.Tensor:
    """Column sums of the view's causal attention over all its prompt queries: [H, S]."""
    st = usable(view)
    if st is not None:
        got = captured_sums(st, torch.ones(1, view.seq_len, device=view.keys.device))
        if got is not None:
            return got[:, 0]
        return column_pass(st.queries, view.keys, view.scaling, view.num_heads, st.lse, chunk=chunk, max_elements=max_elements)[:, 0]
    return column_pass(view.query_fn, view.keys, view.scaling, view.num_heads, None, chunk=chunk, max_elements=max_elements)[:, 0]


def weighted_sums(view, chunk: int = DEFAULT_CHUNK, row_weight: torch.Tensor | None = None,
                  col_weight: torch.Tensor | None = None, blocks: dict | None = None,
                  max_elements: int = 1 << 26) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``cols`` [H, S] = Σ_i Ã[i, j] and ``block[name]`` [H] = Σ_{i∈rows, j∈cols} Ã[i, j] with
    Ã[i, j] = row_weight[i] · A[i, j] · col_weight[j], in one pass (see :func:`avkv.methods.base.attention_sums`)."""
    S, dev = view.seq_len, view.keys.device
    blocks = blocks or {}
    rows = row_matrix(S, dev, row_weight, blocks)
    st = usable(view)
    sums = captured_sums(st, rows)
    if sums is None:
        q, lse = (st.queries, st.lse) if st is not None else (view.query_fn, None)
        sums = column_pass(q, view.keys, view.scaling, view.num_heads, lse, rows, chunk=chunk, max_elements=max_elements)
    cw = torch.ones(S, dtype=torch.float32, device=dev) if col_weight is None else col_weight.to(dev, torch.float32)
    cols = sums[:, 0] * cw
    out = {name: (sums[:, 1 + b] * (cw * cm.to(dev, torch.float32))).sum(-1)
           for b, (name, (_, cm)) in enumerate(blocks.items())}
    return cols, out


__all__ = ["PrefillStats", "column_pass", "attention_with_sums", "fused_impl", "prefill_route", "row_matrix", "captured_sums",
           "accumulated", "weighted_sums", "usable", "DEFAULT_CHUNK"]
