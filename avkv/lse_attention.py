"""The prefill attention that also keeps what all-query methods need: its queries, its rows' log-sum-exps and, on
the fused route, the column sums themselves.

Methods that declare ``all_query_stats = True`` (H2O, LOOK-M, D2O, KVMerger, ObservedAttention, AccKV, FlowMM) need
the attention of every prompt query (:mod:`avkv.methods.allquery`). The prefill computes those probabilities anyway,
so while such a method is installed the decoder's attention runs through :func:`stats_attention` (registered with
transformers' ``AttentionInterface`` as ``avkv_stats``, with SDPA's mask function). For the prefill of a layer from
an empty cache (causal, no mask, batch 1) it takes the route :func:`avkv.methods.allquery.prefill_route` picks for
the layer's shape, length and device (a measured rule):

* ``fused``: the layer's attention is :func:`avkv.methods.allquery.attention_with_sums` (chunked q·kᵀ, softmax,
  P·V), which also accumulates, from the same probabilities, the column sums and the row-weighted sums the method
  declared (:meth:`avkv.methods.base.Method.all_query_rows`, evaluated on the prompt's modality ids): q·kᵀ is computed
  once. Its output equals SDPA's up to fp32 rounding (not bit-identical; measured in ``results/bench/README.md``).
  On CPU the loop is one compiled call when :mod:`avkv.methods.fused_kernel` builds (else torch ops; the route
  used, ``fused/c`` or ``fused/torch``, is in ``PrefillStats.route`` and the run record's ``allquery_route``);
* ``lse``: the fused kernel SDPA itself dispatches to, asked for the log-sum-exps as well (output bit-identical to
  ``F.scaled_dot_product_attention`` on CPU, checked once per device and dtype before the route is used); the sums
  are then one pass without P·V (:func:`avkv.methods.allquery.column_pass`).

Either way the statistics are stashed with the post-RoPE queries on the module; the engine hands them to the method
through ``LayerView.stats``. In a batched prefill (:mod:`avkv.batch_prefill`) each row of an all-query method has a
sink of its own (:func:`row_sink`, held by the row's compressor) that the batch's row-by-row attention fills from the
row's unpadded queries, keys and values (:func:`sink_attention`): the call batch 1 makes. Anything else (decode
steps, a suffix on a cache, a mask, another base backend) goes to the base SDPA function unchanged, and the method
then computes its statistics from recomputed queries.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from avkv.methods import allquery
from avkv.methods.allquery import PrefillStats

STATS_IMPL = "avkv_stats"
_SINK = "_avkv_stats_sink"
_CHECKED: dict = {}


def _kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """Causal attention of [1, H, S, D] queries over [1, kvH, S, D] keys/values with the rows' log-sum-exps, through
    the kernel SDPA uses on this device, or None where there is no such kernel."""
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=scale)
        return out, lse
    if q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16):
        g = q.shape[1] // k.shape[1]
        if g > 1:
            k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
        res = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True, False, scale=scale)
        return res[0], res[1]
    return None


def kernel_ok(device: torch.device, dtype: torch.dtype) -> bool:
    """Once per (device type, dtype): the kernel exists and its output and log-sum-exps agree with SDPA and with the
    definition on a small GQA problem (private ATen ops: a wrong result must never pass silently)."""
    key = (device.type, dtype)
    if key not in _CHECKED:
        g = torch.Generator().manual_seed(0)
        q = torch.randn(1, 4, 70, 16, generator=g).to(device, dtype)
        k = torch.randn(1, 2, 70, 16, generator=g).to(device, dtype)
        v = torch.randn(1, 2, 70, 16, generator=g).to(device, dtype)
        try:
            res = _kernel(q, k, v, 0.25)
        except (RuntimeError, AttributeError, NotImplementedError, TypeError):
            res = None
        ok = res is not None
        if ok:
            out, lse = res
            ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.25, enable_gqa=True)
            kr = k.repeat_interleave(2, 1).float()
            logits = (q.float() @ kr.transpose(-1, -2) * 0.25).masked_fill(
                torch.ones(70, 70, dtype=torch.bool, device=device).triu(1), float("-inf"))
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            ok = (tuple(lse.shape[:3]) == (1, 4, 70) and torch.allclose(out.float(), ref.float(), atol=tol, rtol=tol)
                  and torch.allclose(lse.float(), logits.logsumexp(-1), atol=1e-4, rtol=1e-4))
        _CHECKED[key] = bool(ok)
    return _CHECKED[key]


def stats_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                    is_causal: bool | None = None, **kwargs):
    """``AttentionInterface`` function: SDPA, plus the captured statistics for the layers that asked for them."""
    return sink_attention(getattr(module, _SINK, None), module, query, key, value, attention_mask, dropout=dropout,
                          scaling=scaling, is_causal=is_causal, **kwargs)


def sink_attention(sink: dict | None, module, query, key, value, attention_mask, dropout: float = 0.0,
                   scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """:func:`stats_attention` with the statistics stashed in ``sink`` (the module's own at batch 1; one row's
    :func:`row_sink` in a batched prefill, :func:`avkv.batch_prefill.rows_attention`, called with that row's
    unpadded queries, keys and values: the same call batch 1 makes, so no pad enters a sum or a normaliser)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    q_len = query.shape[2]
    if (sink is not None and attention_mask is None and q_len > 1 and key.shape[2] == q_len and query.shape[0] == 1
            and not dropout and is_causal is not False and getattr(module, "is_causal", True)
            and kwargs.get("position_bias") is None and kwargs.get("softcap") is None
            and query.shape[-1] == value.shape[-1] and kernel_ok(query.device, query.dtype)):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        H, kvH, D = query.shape[1], key.shape[1], query.shape[-1]
        if allquery.prefill_route(query.device, H, kvH, D, q_len) == "fused":
            rows = _rows(sink, q_len, query.device)
            impl = allquery.fused_impl(query.device)
            out, lse, sums = allquery.attention_with_sums(query[0], key[0], value[0], scale, rows,
                                                          kernel=impl == "c")
            sink["stats"] = PrefillStats(queries=query[0], lse=lse, row_weights=rows, sums=sums, route=f"fused/{impl}")
            return out[None], None
        res = _kernel(query, key, value, scale)
        if res is not None:
            out, lse = res
            sink["stats"] = PrefillStats(queries=query[0], lse=lse[0, :, :q_len].float())
            return out.transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


def _rows(sink: dict, S: int, device) -> torch.Tensor:
    """The row-weight vectors [R, S] the fused route accumulates for a prompt of S entries: plain sums first, then
    those the installed method(s) declared on the prompt's modality ids (once per sample and length; duplicates
    dropped)."""
    cache, key = sink.setdefault("rows", {}), (S, str(device))     # shared by the layers of one sample
    if key not in cache:
        rows = [torch.ones(S, dtype=torch.float32, device=device)]
        modality, methods = sink.get("modality"), sink.get("methods", [])
        if modality is not None and modality.numel() >= S:
            for m in methods:
                extra = m.all_query_rows(modality[:S].to(device))
                for w in ([] if extra is None else extra.to(device, torch.float32)):
                    if not any(torch.equal(w, x) for x in rows):
                        rows.append(w)
        cache[key] = torch.stack(rows)
    return cache[key]


def wants_stats(method) -> bool:
    """The method, or a method inside it (a wrapper's scorer, Composed's stages), declared ``all_query_stats``."""
    from avkv.attention_support import method_parts
    return any(getattr(m, "all_query_stats", False) for m in method_parts(method))


def attach(view, module, sink: dict | None = None):
    """``view`` with the statistics the module's prefill captured for it (queries served from them: nothing is
    recomputed), or unchanged when there are none for this cache length. ``sink``: a row's (:func:`row_sink`)
    instead of the module's."""
    from dataclasses import replace
    st = take(module, view.seq_len, sink)
    if st is None:
        return view
    q = st.queries
    return replace(view, stats=st, query_fn=lambda a, b: q[:, a:b])


def register() -> None:
    """Register :func:`stats_attention` as ``avkv_stats`` (with SDPA's mask function)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    AttentionInterface.register(STATS_IMPL, stats_attention)
    AttentionMaskInterface.register(STATS_IMPL, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def _sink(method, modality: torch.Tensor | None) -> dict:
    from avkv.attention_support import method_parts
    return {"modality": modality, "methods": [m for m in method_parts(method) if getattr(m, "all_query_stats", False)],
            "rows": {}}


def row_sink(backend, method, modality: torch.Tensor | None = None) -> dict | None:
    """The statistics sink of one row of a batched prefill (what :func:`install` gives every module at batch 1,
    held by the row's compressor instead of the shared modules), or None where batch 1 would not install the route
    (the method declares no ``all_query_stats``, the model does not run SDPA)."""
    if not wants_stats(method) or backend.base_impl != "sdpa":
        return None
    register()
    return _sink(method, modality)


def install(backend, method, modality: torch.Tensor | None = None) -> bool:
    """Route the decoder's attention (:class:`avkv.attention.AttentionBackend` of one request) through
    :func:`stats_attention` when the method declared ``all_query_stats`` and the model runs SDPA; returns whether it
    did. ``modality``: the prompt's modality ids, on which the method's declared row weights are evaluated (fused
    route). Later switches to the engine's per-layer attention keep it as their base function."""
    if not wants_stats(method) or backend.base_impl != "sdpa":
        return False
    register()
    shared = _sink(method, modality)
    for m in backend.modules:
        setattr(m, _SINK, dict(shared))
    backend.route_base(STATS_IMPL)
    return True


def uninstall(backend) -> None:
    """Drop the captured statistics (the backend restores the model's attention when the request ends)."""
    for m in backend.modules:
        if hasattr(m, _SINK):
            delattr(m, _SINK)


def take(module, seq_len: int, sink: dict | None = None) -> PrefillStats | None:
    """The statistics the module's last prefill captured (in ``sink`` when given) when they cover ``seq_len``
    entries (consumed: a layer's queries are held only until its compression has run)."""
    sink = getattr(module, _SINK, None) if sink is None else sink
    st = sink.pop("stats", None) if sink is not None else None
    return st if st is not None and st.seq_len == seq_len else None


__all__ = ["STATS_IMPL", "stats_attention", "sink_attention", "row_sink", "register", "install", "uninstall", "take",
           "attach", "wants_stats", "kernel_ok"]
