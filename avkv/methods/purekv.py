"""PureKV (arXiv 2510.25600): cross-layer importance estimation (CLIE) + spatial-temporal sparse prefill attention.

Specification: ``shared/design/methods.md`` §2. No code exists and the full text was not seen (abstract and four
ICLR-2026 reviews only), so most details are our reconstruction; treat results as "PureKV (our reading)".

From the paper [paper/2nd]:
  * importance is computed only at a low *source* layer; higher (*target*) layers reuse it, re-weighted by their
    own value norms: s^{l,h}_j = S^{src}_j · ‖v^{l,h}_j‖₂ ("V-weighted scoring"), so target layers need no
    attention scores and run FlashAttention/SDPA;
  * ST-SpAttn: spatial + temporal sparsity of video-token attention during prefill ("purified" video KV, faster
    prefill).

Our reading [ours] (each a field):
  * ``source_layer=2`` feeds every deeper layer (``mapping='single'``); ``mapping='groups'`` uses groups of
    ``group_size`` consecutive layers, each fed by its first layer;
  * source score: window attention of the last ``window``=32 queries summed over the window, averaged over heads,
    avg-pooled with kernel 5 (``clie_scope='window'``); ``clie_scope='all'`` uses accumulated attention over all
    queries (chunked); pooling follows the SnapKV code and kvpress (reference of the SnapKV part): only the prefix
    before the window is pooled, zero padding counted (:func:`~avkv.methods.base.pool_prefix`);
  * layers up to and including a source layer select with their own window scores per KV head (plain SnapKV);
  * ST-SpAttn pattern, for *video query tokens only* during prefill: a video token at (frame t, spatial p) sees
    (a) every non-video token before it, (b) the tokens of its own frame (causal), (c) the tokens at spatial index
    within ±``st_radius`` (0) in the previous ``st_frames`` frames (``None``: all). Other queries stay dense and
    causal. Off in layers < ``st_dense_layers`` (2), so the source layer's scores stay comparable.

ST-SpAttn needs the adapter's layout (``request.layout['video_frame']``/``['video_spatial']``, -1 for non-video).
PureKV declares ``prefill_attention``: :meth:`PureKV.begin` returns a plan whose attention pattern is the registered
``avkv_st_spattn`` function, and the engine switches the decoder (text config only; vision/audio towers are never
touched) to it for the compressed chunk's forward and back afterwards (:class:`avkv.attention.AttentionBackend`).
Any other attention call (dense layers, other shapes) goes to the model's own function unchanged. A missing layout,
or a prefill in which the function was never reached, fails loudly.

Depth: CLIE needs a layer deeper than a source layer, ST-SpAttn a layer ≥ ``st_dense_layers``. On a model too shallow
for either (the 2-layer tiny and proxy models with the defaults) PureKV is plain SnapKV-style selection with dense
attention; it warns once per run and every record says which mechanisms ran: ``clie_active`` (some layer selected
from source-layer scores) and ``st_spattn_used`` (some layer's prefill attention was sparse).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from avkv.methods.base import check_choice
from avkv.methods.base import (VIDEO, LayerView, Method, Selection, accumulated_scores, keep_topk, pool_prefix, reduce_gqa,
                               warn_once, window_scores)
from avkv.methods.request import AttentionPattern, PrefillPlan, Request
from avkv.methods.st_spattn import (ST_ATTENTION_NAME, STContext, register_st_attention,  # noqa: F401 - re-exported
                                    st_allowed_mask, st_sparse_attention, st_spattn_attention)

@dataclass
class PureKV(Method):
    """CLIE (source-layer scores × target-layer value norms) and ST-SpAttn during prefill.

    Parameters
    ----------
    source_layer : int
        The single source layer l_s (2) [ours]; layers ≤ l_s score themselves.
    mapping : str
        ``single`` (one source layer feeds all deeper layers) or ``groups`` (each block of ``group_size`` layers is
        fed by its first layer) [ours].
    group_size : int
        Layers per group for ``mapping='groups'`` (4) [ours].
    window : int
        Observation window (last prompt positions; always kept) (32) [ours].
    kernel : int
        Avg-pooling kernel of the source scores (5) [ours].
    pooling : str
        ``avg`` (5) [ours] or ``max``.
    clie_scope : str
        ``window`` (window queries) [ours] or ``all`` (accumulated attention over all queries, chunked) [2nd].
    chunk : int
        Query rows per chunk for ``clie_scope='all'``.
    st_spattn : bool
        Spatial-temporal sparse attention for video queries during prefill [paper]; pattern [ours].
    st_dense_layers : int
        Layers 0 .. st_dense_layers-1 keep dense prefill attention (2) [ours].
    st_radius : int
        Temporal keys at spatial index within ±radius (0) [ours].
    st_frames : int | None
        Previous frames a video token sees at its spatial index (None = all previous) [ours].
    """

    name = "purekv"
    prefill_attention = True
    source_layer: int = 2
    mapping: str = "single"
    group_size: int = 4
    window: int = 32
    kernel: int = 5
    pooling: str = "avg"
    clie_scope: str = "window"
    chunk: int = 128
    gqa: str = "mean"
    st_spattn: bool = True
    st_dense_layers: int = 2
    st_radius: int = 0
    st_frames: int | None = None

    _ctx: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_choice("mapping", self.mapping, ("single", "groups"))
        check_choice("clie_scope", self.clie_scope, ("window", "all"))

    # ------------------------------------------------------------------ CLIE
    def source_of(self, layer: int) -> int | None:
        """The source layer feeding ``layer``, or ``None`` when the layer scores itself."""
        if self.mapping == "single":
            return None if layer <= self.source_layer else self.source_layer
        first = (layer // self.group_size) * self.group_size
        return None if layer == first else first

    def is_source(self, layer: int, num_layers: int) -> bool:
        if self.mapping == "single":
            return layer == self.source_layer
        return layer % self.group_size == 0

    def source_scores(self, view: LayerView) -> torch.Tensor:
        """S^{src}_j [S]: head-averaged (window or all-query) attention, pooled."""
        if self.clie_scope == "window":
            s = window_scores(view, self.window, reduce="sum")                  # [H, S]
        else:
            s = accumulated_scores(view, self.chunk)
        return pool_prefix(s.mean(0, keepdim=True), self.window, self.kernel, self.pooling)[0]

    def compress(self, view: LayerView) -> Selection:
        l, S = view.layer_idx, view.seq_len
        st = view.scratch(self)
        src = self.source_of(l)
        if src is None:                                                           # a scoring layer: plain SnapKV
            s = window_scores(view, self.window, reduce="sum")
            own = reduce_gqa(pool_prefix(s, self.window, self.kernel, self.pooling), view.num_kv_heads, self.gqa)
            if self.is_source(l, view.num_layers):
                st[l] = (S, self.source_scores(view) if self.clie_scope == "all" else
                         pool_prefix(s.mean(0, keepdim=True), self.window, self.kernel, self.pooling)[0])
            idx = keep_topk(own, view.n_keep, protect_last=self.window)
            info = {"clie": "self"}
        else:                                                                     # a target layer: no attention at all
            if src not in st:
                raise RuntimeError(f"PureKV: layer {l} needs the scores of source layer {src}, which was not "
                                   "compressed before it (compress every layer in order)")
            n_src, s_src = st[src]
            if n_src != S:
                raise RuntimeError(f"PureKV: source layer {src} scored {n_src} positions, layer {l} holds {S}")
            vnorm = view.value_norm_fn() if view.value_norm_fn is not None else \
                torch.linalg.vector_norm(view.values.float(), dim=-1)             # [kvH, S]
            score = s_src.to(vnorm.device)[None, :] * vnorm
            idx = keep_topk(score, view.n_keep, protect_last=self.window)
            info = {"clie": f"from_layer_{src}"}
            st["clie_active"] = True
        ctx = self._ctx
        if ctx is not None:
            info["st_spattn"] = l in ctx.used_layers
        return Selection(indices=idx, info=info, record={"clie_active": True} if st.get("clie_active") else {})

    # ------------------------------------------------------------------ ST-SpAttn lifecycle
    def begin(self, request: Request) -> PrefillPlan:
        self._ctx = None
        n_layers = request.num_layers
        record = dict(clie_active=False, st_spattn_used=False)
        if not any(self.source_of(layer) is not None for layer in range(n_layers)):
            warn_once(("purekv", "clie", self.mapping, self.source_layer, n_layers),
                      "PureKV: CLIE needs a layer deeper than source layer %d (mapping=%s); the model has %d "
                      "decoder layers, so every layer scores itself (records: clie_active=false)",
                      self.source_layer, self.mapping, n_layers)
        if self.st_spattn and n_layers <= self.st_dense_layers:
            warn_once(("purekv", "st", self.st_dense_layers, n_layers),
                      "PureKV: ST-SpAttn is off in layers < st_dense_layers=%d and the model has %d decoder "
                      "layers, so no prefill attention is sparse (records: st_spattn_used=false)",
                      self.st_dense_layers, n_layers)
        if not self.st_spattn:
            return PrefillPlan(record=record)
        layout = request.layout or {}
        if "video_frame" not in layout or "video_spatial" not in layout:
            if not bool((torch.as_tensor(request.modality) == VIDEO).any()):
                warn_once(("purekv", "novideo"), "PureKV: the prompt has no video, so ST-SpAttn has nothing to "
                          "sparsify (records: st_spattn_used=false)")
                return PrefillPlan(record=record)
            raise ValueError("PureKV with st_spattn=True needs the adapter's video layout: the request's layout must "
                             "hold 'video_frame' and 'video_spatial' (LongTensor[n], -1 for non-video); set "
                             "st_spattn=false to run CLIE alone")
        frame = torch.as_tensor(layout["video_frame"]).long().flatten()
        spatial = torch.as_tensor(layout["video_spatial"]).long().flatten()
        ctx = STContext(frame=frame, spatial=spatial, dense_layers=self.st_dense_layers, radius=self.st_radius,
                         max_prev=self.st_frames,
                         expected=bool((frame >= 0).any()) and n_layers > self.st_dense_layers)
        self._ctx = ctx
        pattern = AttentionPattern(name=ST_ATTENTION_NAME, register=register_st_attention, activate=ctx.activate,
                                   report=lambda: {"st_spattn_used": bool(ctx.used_layers)})
        return PrefillPlan(attention=pattern, record=record)

    def end(self) -> None:
        self._ctx = None
