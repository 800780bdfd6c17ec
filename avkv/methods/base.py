"""The method contract: what a KV-compression method sees and what it returns.

A method is a small dataclass (one file per method, one Hydra config per method) with a ``compress(view)``
that is called once per decoder layer at the end of the prefill chunk being compressed. It sees one layer at a
time through a :class:`LayerView` and returns a :class:`Selection`: the cache positions each KV head keeps and,
for merging methods, the rewritten keys/values of those entries. The engine applies the selection physically
(the cache tensors shrink) and records what was kept.

Conventions (``shared/design/methods.md`` §0):

* batch size is 1; tensors in a view carry no batch dimension;
* keys are post-RoPE, ``[kv_heads, S, head_dim]``; queries are recomputed post-RoPE from the layer's input
  hidden states (or, for ``all_query_stats`` methods, captured from the prefill with its row log-sum-exps), so
  scores never need a materialised attention matrix and everything runs under SDPA;
* ``view.n_keep`` is the number of entries *per KV head* this layer should keep on average; the observation
  window counts toward it;
* modality ids: 0 text, 1 image, 2 video, 3 audio (``MODALITIES``).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F

from avkv.methods import allquery
from avkv.methods.request import PrefillPlan, Request
from avkv.schema import AUDIO, IMAGE, MODALITIES, TEXT, VIDEO  # noqa: F401 - the methods read them from here too

log = logging.getLogger("avkv")
_WARNED: set = set()


def warn_once(key: Any, msg: str, *args: Any) -> None:
    """Log a warning the first time ``key`` is seen in this process (a run warns once, not once per sample)."""
    if key not in _WARNED:
        _WARNED.add(key)
        log.warning(msg, *args)


# ----------------------------------------------------------------------------------------------- contract
@dataclass
class LayerView:
    """Everything a method may read about one layer at compression time (batch size 1)."""

    layer_idx: int
    num_layers: int
    keys: torch.Tensor                 # [kvH, S, D] post-RoPE
    values: torch.Tensor               # [kvH, S, D]
    modality: torch.Tensor             # [S] long, ids into MODALITIES
    n_keep: int                        # target kept entries per KV head (average over heads)
    num_heads: int                     # query heads H (H = kvH * groups)
    scaling: float
    state: dict                        # the engine's per-request store: methods use scratch(self), not its keys
    generator: torch.Generator         # seeded per sample (random choices must use it)
    query_fn: Callable[[int, int], torch.Tensor]   # (start, end) -> post-RoPE queries [H, end-start, D]
    attentions: torch.Tensor | None = None          # [H, S, S] only when the backend materialises them (eager)
    layout: dict = field(default_factory=dict)      # adapter extras, e.g. video "frame"/"spatial" index per position
    value_norm_fn: Callable[[], torch.Tensor] | None = None
    #: rotary position ids of the cache entries [R, S] (R = 1 for 1-D RoPE, 3 for M-RoPE's t/h/w rows)
    positions: torch.Tensor | None = None
    #: rotary position ids [R, T] -> (cos, sin) [T, D] as the layer's rotary embedding gives them
    rope_fn: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None
    #: the layer's output projection as [H, D, hidden] (query head h's slice of o_proj), for value-output scores
    out_weight_fn: Callable[[], torch.Tensor] | None = None
    #: what the prefill's own attention captured for this layer (queries, row log-sum-exps), when the method declared
    #: ``all_query_stats`` (:mod:`avkv.lse_attention`); None otherwise
    stats: Any = None

    @property
    def seq_len(self) -> int:
        return self.keys.shape[1]

    @property
    def num_kv_heads(self) -> int:
        return self.keys.shape[0]

    @property
    def groups(self) -> int:
        return self.num_heads // self.num_kv_heads

    def queries(self, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Post-RoPE queries of prompt positions [start, end) of this chunk: [H, end-start, D]."""
        end = self.seq_len if end is None else end
        return self.query_fn(start, end)

    def scratch(self, owner: Any) -> dict:
        """Per-request scratch of the method instance ``owner``, shared by every layer of one sample (cross-layer
        methods keep their scores here). The engine gives each sample a fresh store, so nothing leaks between
        samples, and each instance (a wrapper and its scorer alike) has its own namespace."""
        return self.state.setdefault(("scratch", id(owner)), {})

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) ``[T, D]`` of rotary position ids ``[R, T]`` (fails loudly where the engine gave none)."""
        if self.rope_fn is None:
            raise RuntimeError("this layer view carries no rotary embedding (rope_fn)")
        return self.rope_fn(positions)

    def entry_positions(self) -> torch.Tensor:
        """Rotary position ids of the cache entries, ``[R, S]``."""
        if self.positions is None:
            raise RuntimeError("this layer view carries no position ids")
        return self.positions[:, : self.seq_len]

    def future_positions(self, count: int) -> torch.Tensor:
        """Rotary position ids ``[R, count]`` of ``count`` text tokens following the cache entries: every row
        continues at (largest position so far) + 1, the rule of 1-D RoPE and of M-RoPE text after media."""
        p = self.entry_positions()
        nxt = p.max() + 1 + torch.arange(count, device=p.device, dtype=p.dtype)
        return nxt.expand(p.shape[0], count)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE of ``x`` [..., T, D] by (cos, sin) [T, D]."""
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def unrotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rotate` (pre-RoPE vectors from rotated ones); exact also when cos²+sin² ≠ 1 (a rotary
    embedding with an attention scaling factor)."""
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return (x * cos - torch.cat((-x2, x1), dim=-1) * sin) / (cos * cos + sin * sin)


@dataclass
class Selection:
    """What one layer keeps. ``indices[h]`` are positions into the layer's cache for KV head h.

    ``keys``/``values`` replace the gathered entries (merging methods); ``valid`` marks real entries when heads
    keep different counts and the engine must pad (ragged per-head budgets). ``info`` goes into the sample record
    under ``method_info`` for this layer (e.g. a layer's high-priority modality); ``record`` holds fields of the
    sample's record itself (later layers overwrite earlier ones). ``hidden_keep`` (a method that prunes hidden
    states, in the layer before ``PrefillPlan.prune_from``) lists the chunk positions whose hidden states go on;
    ``position_shift`` (re-rotated keys) says how far the suffix and the decoded tokens move back.
    """

    indices: torch.Tensor                      # [kvH, k] long
    keys: torch.Tensor | None = None           # [kvH, k, D]
    values: torch.Tensor | None = None         # [kvH, k, D]
    valid: torch.Tensor | None = None          # [kvH, k] bool
    info: dict = field(default_factory=dict)
    record: dict = field(default_factory=dict)
    hidden_keep: torch.Tensor | None = None    # [S'] long, sorted chunk positions
    position_shift: int | None = None


class Method:
    """Base class. Subclasses are dataclasses; fields are the method's hyper-parameters with paper defaults."""

    name: ClassVar[str] = "method"
    #: the method reads ``view.attentions``; it then needs ``attn_implementation=eager`` and fails loudly otherwise
    requires_attentions: ClassVar[bool] = False
    #: ``grow``: decode tokens are appended; ``fixed``: the engine calls :meth:`decode_step` to hold the size
    decode_policy: str = "grow"
    #: the method allocates across layers (D2O): the engine calls :meth:`observe` in each layer's prefill (queries
    #: available) and :meth:`compress` for every layer after the chunk's forward (no queries then)
    deferred: ClassVar[bool] = False
    #: the method scores from a context reconstruction (KVzip): a deferred method whose :meth:`observe` runs in the
    #: prefill, then the engine runs ``avkv.reconstruct.reconstruct`` (which calls ``score_reconstruction``) before
    #: the deferred :meth:`compress` calls
    needs_reconstruction: ClassVar[bool] = False
    #: ``held``: the method keeps the budget (entries and bytes within ±1 %, the engine checks every sample);
    #: ``achieved``: it keeps what its mechanism keeps and ``budget_reason`` says why (records and reports then put
    #: it at its achieved ratio, apart from the methods that hold the budget)
    budget_mode: str = "held"
    budget_reason: str | None = None
    #: False for a method that keeps every entry whatever the budget (the full cache): its runs at every budget are
    #: one run directory (``avkv.results.identity_core``)
    uses_budget: ClassVar[bool] = True
    #: capabilities the engine installs (``avkv.methods.request``): hidden-state pruning from the plan's
    #: ``prune_from`` layer on (FastV), and a prefill attention pattern (PureKV)
    prunes_hidden_states: ClassVar[bool] = False
    prefill_attention: ClassVar[bool] = False
    #: the method needs the attention of every prompt query (:func:`accumulated_scores`, :func:`attention_sums`): the
    #: engine then captures each layer's queries and row log-sum-exps, or the sums themselves, from the prefill itself
    #: (SDPA models; :mod:`avkv.lse_attention`)
    all_query_stats: ClassVar[bool] = False

    def all_query_rows(self, modality: torch.Tensor) -> torch.Tensor | None:
        """``all_query_stats`` methods: the row-weight vectors [R, S] their :func:`attention_sums` calls will use
        (:func:`avkv.methods.allquery.row_matrix` of each call) for a prompt with these modality ids, so the fused
        prefill accumulates them from its own probabilities; plain column sums are always accumulated. None: only
        those. A vector not declared (or not equal to the one asked for) is computed by the ``lse`` pass instead."""
        return None

    def compress(self, view: LayerView) -> Selection:  # pragma: no cover - interface
        raise NotImplementedError

    def observe(self, view: LayerView) -> None:
        """Deferred methods: compute what :meth:`compress` will need (scores) while the queries exist."""

    def begin(self, request: Request) -> PrefillPlan | None:
        """Called before each sample's prefill with its model-free description; returns what the engine should
        install for the capabilities the method declares (None: nothing)."""
        return None

    def end(self) -> None:
        """Called after each sample."""

    def is_noop(self) -> bool:
        """True when the method keeps everything (the engine then skips the hooks entirely)."""
        return False

    def decode_step(self, view: LayerView) -> Selection | None:
        """``decode_policy=fixed``: called after each decode step with the current cache of one layer (the new
        token included, last); ``view.n_keep`` is the size to hold. Returns the entries to keep, or None to keep
        the cache as it is. Methods without a fixed-size decode rule fail loudly instead of silently growing."""
        raise NotImplementedError(f"{self.name} defines no decode_step: use decode_policy=grow")


class ScoreMethod(Method):
    """A method defined by per-KV-head scores: keep the window plus the top ``n_keep - window`` others.

    Subclasses implement :meth:`score` returning ``[kvH, S]`` (higher = keep). ``window`` positions at the end of
    the chunk are always kept.
    """

    window: int = 0

    def score(self, view: LayerView) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def protected(self, view: LayerView) -> int:
        """How many of the chunk's last positions are always kept (they count toward ``n_keep``).

        ``window`` by default; methods whose recent window depends on the budget (H2O) override it. Allocation
        wrappers read it, so every scorer composes with every wrapper.
        """
        return self.window

    def remember(self, view: LayerView, scores: torch.Tensor, indices: torch.Tensor) -> None:
        """Called with this scorer's scores and the kept indices whenever a selection is made from them (by the
        scorer or by an allocation wrapper); H2O keeps them for fixed-size decoding."""

    def compress(self, view: LayerView) -> Selection:
        scores = self.score(view)
        idx = keep_topk(scores, view.n_keep, protect_last=self.protected(view))
        self.remember(view, scores, idx)
        return Selection(indices=idx)


# ---------------------------------------------------------------------------------------------- primitives
def check_choice(name: str, value: Any, options: tuple) -> None:
    """Reject a config field outside its options: ``<name> must be 'a', 'b' or 'c', got <value>``."""
    if value not in options:
        opts = [repr(o) for o in options]
        listed = opts[0] if len(opts) == 1 else ", ".join(opts[:-1]) + " or " + opts[-1]
        raise ValueError(f"{name} must be {listed}, got {value!r}")


def rank_positions(scores: torch.Tensor) -> torch.Tensor:
    """Positions of each row of ``scores`` [R, S] from best to worst: [R, S].

    Deterministic: equal scores are ranked by position, the later first (a stable sort of the reversed row),
    so reruns are identical whatever the kernel's own ordering and no score is perturbed.
    """
    S = scores.shape[-1]
    s = scores.detach().to(torch.float64)
    return S - 1 - torch.sort(s.flip(-1), dim=-1, descending=True, stable=True).indices


def keep_topk(scores: torch.Tensor, k: int, protect_last: int = 0) -> torch.Tensor:
    """Deterministic top-k per row of ``scores`` [R, S] → sorted indices [R, k].

    The last ``protect_last`` positions are always kept (they count toward k). Ties are broken by position
    (the later position wins, :func:`rank_positions`).
    """
    R, S = scores.shape
    k = max(1, min(int(k), S))
    s = scores.detach().to(torch.float64).clone()
    if protect_last > 0:
        s[:, S - min(protect_last, S):] = math.inf
    return rank_positions(s)[:, :k].sort(dim=-1).values


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[kvH, S, D] → [kvH*groups, S, D] (query-head order of transformers' ``repeat_kv``)."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=0)


def reduce_gqa(scores: torch.Tensor, num_kv_heads: int, how: str = "mean") -> torch.Tensor:
    """Query-head scores [H, ...] → KV-head scores [kvH, ...] by mean (default) / max / sum within each group."""
    H = scores.shape[0]
    g = scores.view(num_kv_heads, H // num_kv_heads, *scores.shape[1:])
    return {"mean": g.mean(1), "max": g.amax(1), "sum": g.sum(1)}[how]


def _grouped_logits(view: LayerView, q: torch.Tensor, cols: int) -> torch.Tensor:
    """Scaled logits of query heads ``q`` [H, r, D] against the first ``cols`` keys: [H, r, cols] (fp32).

    Query heads are grouped onto their KV head by a reshape instead of repeating the keys (same head order as
    transformers' ``repeat_kv``), so no [H, S, D] copy of the cache is made.
    """
    H, r, D = q.shape
    kvH = view.num_kv_heads
    k = view.keys[:, :cols].float()                                          # [kvH, cols, D]
    qg = q.float().reshape(kvH, (H // kvH) * r, D)
    return torch.bmm(qg, k.transpose(1, 2)).mul_(view.scaling).view(H, r, cols)


def _causal_softmax_(logits: torch.Tensor, start: int) -> torch.Tensor:
    """In-place causal mask + softmax of logits [H, r, C] for query rows start..start+r-1 (key j visible iff j ≤ i)."""
    r, C = logits.shape[1], logits.shape[2]
    if start < C - 1:                                   # some row sees fewer than all C keys
        qpos = torch.arange(start, start + r, device=logits.device)[:, None]
        kpos = torch.arange(C, device=logits.device)[None, :]
        logits.masked_fill_(kpos > qpos, float("-inf"))
    return logits.softmax(-1)


def attention_rows(view: LayerView, start: int, end: int) -> torch.Tensor:
    """Causal softmax attention of prompt queries [start, end) over the chunk's keys: [H, end-start, S] (fp32)."""
    logits = _grouped_logits(view, view.queries(start, end), view.seq_len)
    return _causal_softmax_(logits, start)


def window_scores(view: LayerView, window: int, reduce: str = "mean") -> torch.Tensor:
    """SnapKV observation-window scores per query head: attention of the last ``window`` queries, [H, S].

    ``reduce`` = ``mean`` (AdaKV code) or ``sum`` (SnapKV paper) over the window rows.
    """
    S = view.seq_len
    w = max(1, min(window, S))
    a = attention_rows(view, S - w, S)
    return a.mean(1) if reduce == "mean" else a.sum(1)


def accumulated_scores(view: LayerView, chunk: int = allquery.DEFAULT_CHUNK, normalize: bool = False,
                       max_elements: int = 1 << 26) -> torch.Tensor:
    """H2O accumulated attention: column sums of the causal softmax over *all* prompt queries, [H, S].

    No S×S matrix ever exists: query rows go in chunks of complete rows (exact), keys are never repeated per query
    head, and extra memory is O(H·chunk·S) (the chunk shrinks so its logits stay under ``max_elements``). When the
    prefill captured the layer's queries and row log-sum-exps (``view.stats``), the pass is one ``exp`` of the
    logits minus the log-sum-exps per element and no query is recomputed; otherwise an exact chunked softmax over
    recomputed queries (:mod:`avkv.methods.allquery`).

    With ``normalize`` each column is divided by the number of rows that can see it (mean instead of sum).
    """
    S = view.seq_len
    out = allquery.accumulated(view, chunk, max_elements)
    if normalize:
        out = out / torch.arange(S, 0, -1, device=out.device, dtype=out.dtype)
    return out


def pool_scores(scores: torch.Tensor, kernel: int, how: str = "max", count_pad: bool = True) -> torch.Tensor:
    """1-D pooling over positions (stride 1, padding k//2) of [R, S] scores; kernel ≤ 1 returns the input.

    ``avg`` divides every window by ``kernel``, the zero padding at the edges counted (``count_pad``, torch's
    ``count_include_pad=True`` default, which the SnapKV code and kvpress use); ``count_pad=False`` divides by the
    in-range positions only. ``max`` ignores the padding either way.
    """
    if kernel <= 1:
        return scores
    x = scores.unsqueeze(1)
    if how == "max":
        y = F.max_pool1d(x, kernel, stride=1, padding=kernel // 2)
    elif how == "avg":
        y = F.avg_pool1d(x, kernel, stride=1, padding=kernel // 2, count_include_pad=bool(count_pad))
    else:
        raise ValueError(f"pooling must be 'max' or 'avg', got {how!r}")
    return y.squeeze(1)[..., : scores.shape[-1]]


def pool_prefix(scores: torch.Tensor, window: int, kernel: int, how: str = "max", count_pad: bool = True,
                pool_window_columns: bool = False) -> torch.Tensor:
    """SnapKV's smoothing of observation-window scores [R, S]: only the prefix before the window is pooled.

    The reference code (SnapKV ``attn_weights[..., -w:, :-w]``, kvpress ``SnapKVPress``, AdaKV and
    KVCache-Factory alike) drops the window's own columns before pooling, so a prefix position next to the window
    never borrows the window's (large, self-attention) scores, and the first and last ``kernel//2`` prefix
    positions see zero padding. The window columns are returned unchanged (the window is always kept).
    ``pool_window_columns=True`` pools the whole row instead (avkv before issue 13; no reference does this).
    """
    S = scores.shape[-1]
    if pool_window_columns:
        return pool_scores(scores, kernel, how, count_pad)
    P = S - max(0, min(window, S))
    out = scores.clone()
    if P > 0:
        out[..., :P] = pool_scores(scores[..., :P], kernel, how, count_pad)
    return out


def complement(indices: torch.Tensor, size: int) -> torch.Tensor:
    """Positions of [0, size) not in ``indices`` [R, k] (per row, sorted): [R, size - k]. Rows must be duplicate-free."""
    R = indices.shape[0]
    mask = torch.ones(R, size, dtype=torch.bool, device=indices.device)
    mask.scatter_(1, indices, False)
    return torch.nonzero(mask)[:, 1].view(R, -1)


def merge_into_nearest(keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor, evicted: torch.Tensor,
                       mode: str = "pivot", allowed: torch.Tensor | None = None,
                       min_similarity: float | torch.Tensor | Callable[[torch.Tensor], Any] | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge evicted entries into their most key-similar kept entry.

    One KV head: keys/values [S, D], keep [k], evicted [e], ``allowed`` [e, k]. Several heads at once: add a
    leading head dimension to all of them ([R, S, D], [R, k], [R, e], [R, e, k]). ``allowed`` says which kept
    entries each evicted entry may merge into (e.g. same modality only); ``min_similarity`` gates merging on
    the best cosine similarity: a float, a broadcastable tensor, or a callable that receives the best
    similarities [R, e] and returns the gate (D2O's running threshold). An evicted entry with no allowed target,
    or below the gate, is dropped. Modes:

    * ``avg``: contribution = x_e (plain average; conserves the summed mass)
    * ``pivot``: contribution = (x_e + x_target) / 2 (LOOK-M default)
    * ``weighted``: contribution = cos(k_e, k_target) · x_e (LOOK-M ``weighted``, D2O)

    The kept entry becomes the mean of itself and all contributions it receives (scatter-mean including
    itself, as ``torch.scatter_reduce(..., reduce="mean", include_self=True)`` in the LOOK-M code). Returns the
    new kept keys/values ([k, D] or [R, k, D]).
    """
    if mode not in ("avg", "pivot", "weighted"):
        raise ValueError(f"merge mode must be avg, pivot or weighted, got {mode!r}")
    single = keys.dim() == 2
    if single:
        keys, values, keep, evicted = keys[None], values[None], keep[None], evicted[None]
        allowed = None if allowed is None else allowed[None]
    R, _, D = keys.shape
    Kk = keys.gather(1, keep[..., None].expand(-1, -1, D)).float()           # [R, k, D]
    Vk = values.gather(1, keep[..., None].expand(-1, -1, D)).float()
    if evicted.shape[-1] > 0:
        Ke = keys.gather(1, evicted[..., None].expand(-1, -1, D)).float()    # [R, e, D]
        Ve = values.gather(1, evicted[..., None].expand(-1, -1, D)).float()
        sim = F.normalize(Ke, dim=-1) @ F.normalize(Kk, dim=-1).transpose(1, 2)   # [R, e, k]
        if allowed is not None:
            sim = sim.masked_fill(~allowed, float("-inf"))
        best, target = sim.max(dim=-1)                                         # [R, e]
        ok = torch.isfinite(best)
        if min_similarity is not None:
            gate = min_similarity(best.masked_fill(~ok, float("nan"))) if callable(min_similarity) else min_similarity
            ok &= best >= gate
        w = ok.to(Kk.dtype)[..., None]                                         # dropped entries contribute 0
        tgt = target[..., None].expand(-1, -1, D)
        if mode == "avg":
            ck, cv = Ke, Ve
        elif mode == "pivot":
            ck, cv = (Ke + Kk.gather(1, tgt)) / 2, (Ve + Vk.gather(1, tgt)) / 2
        else:
            sw = torch.where(ok, best, torch.zeros_like(best))[..., None]
            ck, cv = Ke * sw, Ve * sw
        count = torch.ones(R, Kk.shape[1], 1, device=Kk.device).scatter_add_(1, target[..., None], w)
        Kk = Kk.scatter_add(1, tgt, ck * w) / count
        Vk = Vk.scatter_add(1, tgt, cv * w) / count
    Kk, Vk = Kk.to(keys.dtype), Vk.to(values.dtype)
    return (Kk[0], Vk[0]) if single else (Kk, Vk)


def modality_counts(modality: torch.Tensor, indices: torch.Tensor, valid: torch.Tensor | None = None) -> dict:
    """Kept entries per modality summed over heads: {name: count}."""
    m = modality[indices]
    if valid is not None:
        m = m[valid]
    return {name: int((m == i).sum()) for i, name in enumerate(MODALITIES)}


def as_record(obj: Any) -> Any:
    """Tensors → lists/floats so selection info can go into JSON records."""
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, dict):
        return {k: as_record(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [as_record(v) for v in obj]
    return obj


# ------------------------------------------------------------------------- primitives of the seed methods
def attention_sums(view: LayerView, chunk: int = allquery.DEFAULT_CHUNK, row_weight: torch.Tensor | None = None,
                   col_weight: torch.Tensor | None = None,
                   blocks: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
                   max_elements: int = 1 << 26) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One chunked pass over *all* prompt query rows of the causal softmax, with O(H·chunk·S) extra memory.

    With Ã[i, j] = row_weight[i] · A[i, j] · col_weight[j] (weights default to 1) it returns

    * ``cols`` [H, S]: column sums Σ_i Ã[i, j] (H2O's accumulated score when both weights are 1);
    * ``block[name]`` [H]: Σ_{i ∈ rows, j ∈ cols} Ã[i, j] for every ``name: (rows [S] bool, cols [S] bool)``.

    Used by AccKV (redistribution and text→modality focus) and FlowMM (cross-modal ratio ρ). Every chunk of rows
    is read once: the column sums and every block's row-weighted sums are one product with a small matrix of row
    weights (:func:`avkv.methods.allquery.weighted_sums`); with ``view.stats`` the prefill's log-sum-exps are used,
    as in :func:`accumulated_scores`. The result equals the eager attention sums.
    """
    return allquery.weighted_sums(view, chunk, row_weight, col_weight, blocks, max_elements)


def sub_view(view: LayerView, index: torch.Tensor | slice, n_keep: int, *,
             query_fn: Callable[[int, int], torch.Tensor] | None = None) -> LayerView:
    """A view of some of ``view``'s entries (wrappers that score parts of the cache: chunks, blocks, stages).

    ``index`` is a slice (the same positions on every head) or per-head positions ``[kvH, k]``. Keys, values and
    — for a slice, or when every head keeps the same positions — modality and positions follow. ``query_fn``
    serves the sub-view's queries (default: for a slice, the parent's queries at the same positions; otherwise
    none, and a scorer that asks for queries fails loudly).
    """
    if isinstance(index, slice):
        a = index.start or 0
        keys, values = view.keys[:, index], view.values[:, index]
        modality = view.modality[index]
        positions = None if view.positions is None else view.positions[:, index]
        qf = query_fn or (lambda s, e: view.query_fn(a + s, a + e))
    else:
        D = view.keys.shape[-1]
        g = index[..., None].expand(-1, -1, D)
        keys, values = view.keys.gather(1, g), view.values.gather(1, g)
        shared = bool((index == index[:1]).all())
        modality = view.modality[index[0]]
        positions = None if view.positions is None or not shared else view.positions[:, index[0]]

        def _no_queries(s: int, e: int) -> torch.Tensor:
            raise RuntimeError("this sub-view of the cache has no queries (its entries differ per head); wrap a "
                               "scorer that reads only keys and values")
        qf = query_fn or _no_queries
    return replace(view, keys=keys, values=values, modality=modality, positions=positions, query_fn=qf,
                   n_keep=int(n_keep), attentions=None, stats=None,
                   value_norm_fn=lambda: values.float().norm(dim=-1))
