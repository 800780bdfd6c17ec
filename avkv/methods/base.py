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

The score primitives (top-k, GQA reduction, attention rows, window scores, pooling, all-query sums) live in
:mod:`avkv.methods.scoring` and the merging ones in :mod:`avkv.methods.merging`; both are re-exported here.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any, Callable, ClassVar

import torch

from avkv.methods.merging import complement, merge_into_nearest  # noqa: F401 - re-exported
from avkv.methods.request import PrefillPlan, ReconstructionPlan, Request
from avkv.methods.scoring import (accumulated_scores, attention_rows, attention_sums, keep_topk,  # noqa: F401
                                  pool_prefix, pool_scores, rank_positions, reduce_gqa, repeat_kv, window_scores)
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
    #: the deferred :meth:`compress` calls, as :meth:`reconstruction_plan` describes
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
    #: the method reads ``view.rope`` (un-/re-rotates keys, rotates future positions): the engine refuses it, by name,
    #: on a model without one rotary embedding for every layer (``ModelAdapter.rotary_embedding`` raises: Gemma-3n)
    needs_rope: ClassVar[bool] = False
    #: the method needs the attention of every prompt query (:func:`accumulated_scores`, :func:`attention_sums`): the
    #: engine then captures each layer's queries and row log-sum-exps, or the sums themselves, from the prefill itself
    #: (SDPA models; :mod:`avkv.lse_attention`)
    all_query_stats: ClassVar[bool] = False
    #: what the engine cannot give on a cache that is not one full-attention K/V per layer (Gemma-3n's sliding and
    #: KV-shared layers), besides the capabilities above: the method's heads may keep different counts (per-head
    #: budgets, ragged storage); it indexes a layer's view by prompt position (a sliding layer's view holds only its
    #: window); it needs every decoder layer to hold its own cache (KV-shared layers are never shown to it)
    ragged_heads: ClassVar[bool] = False
    indexes_prompt_positions: ClassVar[bool] = False
    needs_every_layer: ClassVar[bool] = False
    #: the kvpress press the method reproduces (kvpress 0.5.5, ``requirements/kvpress.txt``; None: not a port); the
    #: tests find the ports from it (``tests/discover.py``), and each has a parity case in ``tests/parity`` or the
    #: reason there why not
    kvpress: ClassVar[str | None] = None

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

    def reconstruction_plan(self) -> ReconstructionPlan | None:
        """``needs_reconstruction`` methods: how the engine reconstructs the context (chunking, instructions,
        prefix), read once per sample before its prefill. A method that declares the capability must return one."""
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
