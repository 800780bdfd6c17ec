"""All-query attention statistics: column sums (and weighted block sums) of the causal softmax over every prompt query.

H2O, LOOK-M, D2O, KVMerger, ObservedAttention and PureKV's ``clie_scope=all`` need the column sums
c_j = Σ_{i≥j} A[i, j] of the prompt's causal attention; AccKV and FlowMM need row/column-weighted sums of A and its
sums over modality blocks. A = softmax(q·kᵀ·s) is never materialised: query rows are processed in chunks and every
chunk holds complete rows, so each result is exact.

Two routes, one kernel (:func:`column_pass`):

* ``lse`` (the prefill captured the rows' log-sum-exps, :mod:`avkv.lse_attention`): A[i, j] = exp(q_i·k_j·s − lse_i),
  one ``baddbmm`` (the −lse folded in) and one ``exp`` per element, no max/normalise passes, no P·V product;
* ``softmax`` (no captured statistics: eager or another backend, a masked prefill, a deferred pass): the same chunks
  with an exact causal softmax (one matmul per element as well, plus the max and the normalisation).

Row reductions (plain sums, row weights, modality blocks) are one matrix product of the chunk with a small matrix of
row weights, so the chunk is read once whatever the number of statistics. Query heads are grouped onto their KV head by
a reshape (transformers' ``repeat_kv`` head order), so the keys are never repeated per query head. The routes are
chosen by the rule in ``results/bench/README.md`` (measured with ``scripts/bench_allquery.py``): with captured
log-sum-exps the ``lse`` route, otherwise ``softmax`` (computing the log-sum-exps first costs one more attention pass).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PrefillStats:
    """What the prefill's attention captured for one layer: post-RoPE queries [H, S, D] (the model's dtype) and the
    rows' natural log-sum-exps of the scaled, causal logits [H, S] (fp32)."""

    queries: torch.Tensor
    lse: torch.Tensor

    @property
    def seq_len(self) -> int:
        return int(self.queries.shape[1])


#: rows per chunk (memory O(H·chunk·S)); chosen by measurement, see ``results/bench/README.md``
DEFAULT_CHUNK = 128
#: key columns per tile of the ``lse`` route (a tile's exp and row sum run while it is in cache)
TILE = 1024


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
        bias = None if lse is None else lse[:, a:e].to(dev, torch.float32).reshape(kvH, g * r, 1).neg()
        for b in range(0, e, TILE if lse is not None else e):             # rows [a, e) see keys [0, e) at most
            b2 = min(e, b + TILE) if lse is not None else e
            kt = k[:, b:b2].transpose(1, 2)
            if lse is not None:                                           # column tiles stay in cache: exp + sum
                p = torch.baddbmm(bias, qg, kt, alpha=scale).view(H, r, b2 - b).exp_()
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
        return column_pass(st.queries, view.keys, view.scaling, view.num_heads, st.lse, chunk=chunk, max_elements=max_elements)[:, 0]
    return column_pass(view.query_fn, view.keys, view.scaling, view.num_heads, None, chunk=chunk, max_elements=max_elements)[:, 0]


def weighted_sums(view, chunk: int = DEFAULT_CHUNK, row_weight: torch.Tensor | None = None,
                  col_weight: torch.Tensor | None = None, blocks: dict | None = None,
                  max_elements: int = 1 << 26) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``cols`` [H, S] = Σ_i Ã[i, j] and ``block[name]`` [H] = Σ_{i∈rows, j∈cols} Ã[i, j] with
    Ã[i, j] = row_weight[i] · A[i, j] · col_weight[j], in one pass (see :func:`avkv.methods.base.attention_sums`)."""
    S, dev = view.seq_len, view.keys.device
    blocks = blocks or {}
    w = torch.ones(S, dtype=torch.float32, device=dev) if row_weight is None else row_weight.to(dev, torch.float32)
    rows = [w] + [w * r.to(dev, torch.float32) for r, _ in blocks.values()]
    st = usable(view)
    q, lse = (st.queries, st.lse) if st is not None else (view.query_fn, None)
    sums = column_pass(q, view.keys, view.scaling, view.num_heads, lse, torch.stack(rows), chunk=chunk, max_elements=max_elements)
    cw = torch.ones(S, dtype=torch.float32, device=dev) if col_weight is None else col_weight.to(dev, torch.float32)
    cols = sums[:, 0] * cw
    out = {name: (sums[:, 1 + b] * (cw * cm.to(dev, torch.float32))).sum(-1)
           for b, (name, (_, cm)) in enumerate(blocks.items())}
    return cols, out


__all__ = ["PrefillStats", "column_pass", "accumulated", "weighted_sums", "usable", "DEFAULT_CHUNK"]
