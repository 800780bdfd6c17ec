"""The method's hooks on the decoder for one sample: lifecycle and phases as context managers.

``with Compressor(adapter, method, request) as cm:`` registers a forward hook on every decoder attention layer,
calls ``method.begin(request)`` and installs what its :class:`~avkv.methods.request.PrefillPlan` asks for (for the
capabilities the method declares): hidden-state pruning hooks on the decoder layers from ``plan.prune_from`` on,
and a prefill attention pattern. The hooks act only inside a stage:

* ``with cm.stage("prefill"):`` the compressed chunk's forward — at the end of each layer's attention the method
  sees the layer (:class:`~avkv.methods.base.LayerView`) and its selection is applied (:mod:`avkv.kvstore`) and
  entered in the keep-ledger (:mod:`avkv.ledger`); deferred methods only observe, and compress in
  :meth:`Compressor.end_prefill`; the plan's attention pattern is live;
* ``with cm.stage("decode"):`` decode steps — a ``decode_policy=fixed`` method holds the cache size.

On exit the hooks are removed, the attention backend is restored (:mod:`avkv.attention`) and ``method.end()`` runs.

Row mode (``Compressor(..., row=True)``): one row of a batched prefill (:mod:`avkv.batch_prefill`). It registers no
hooks and switches no backend; the batch's one hook per layer hands it that row's unpadded slice, and
:meth:`Compressor.layer_done` runs on it exactly the code the batch-1 hook runs.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

from avkv import lse_attention
from avkv.attention import AttentionBackend, RowBackend
from avkv.attention_support import method_parts
from avkv.kvstore import CompressionError, RaggedLayer, apply_selection
from avkv.layer_inputs import EVERY_ROW_ATTENTION, LAST_ROW_UNSUPPORTED, irregular_cache, last_row_hooks, slice_inputs
from avkv.ledger import KeepLedger
from avkv.measure import Clock
from avkv.methods.base import LayerView, Method, Selection
from avkv.methods.request import PrefillPlan, Request

PHASES = ("idle", "prefill", "decode")


class Compressor:
    """Installs the method on every decoder attention layer for one request (context manager)."""

    def __init__(self, adapter: Any, method: Method, request: Request, mask_only: bool = False, seed: int = 0,
                 row: bool = False):
        self.adapter, self.method, self.req, self.mask_only = adapter, method, request, mask_only
        #: one row of a batched prefill (:mod:`avkv.batch_prefill`): no hooks of its own and no backend switch —
        #: the batch's one hook hands it the row's slice of each layer (:meth:`layer_done`), and a switch to the
        #: masked attention is only noted (``backend.wants_masked``) for the row's own suffix
        self.row = row
        self.layers = adapter.decoder_layers()
        self.num_layers = len(self.layers)
        self.phase = "idle"
        self.pending: dict = {}                # deferred methods: layer -> (module, modality, n_keep)
        self.handles: list = []
        self.attn_modules = [layer.self_attn for layer in self.layers]
        self.backend = (RowBackend if row else AttentionBackend)(adapter.text_config(), self.attn_modules)
        self.clock = Clock(adapter.device, getattr(adapter, "devices", None))
        self.ledger = KeepLedger(n_prompt=request.n_prompt, split=request.split)
        self.generator = torch.Generator().manual_seed(int(seed))
        self.modality = request.modality.to(adapter.device)
        self.store: dict = {}                  # per-request scratch of the method (LayerView.scratch)
        self.plan = PrefillPlan()
        self._prune_keep: torch.Tensor | None = None
        self._pruned: set = set()
        self.capture = None                    # needs_reconstruction: the prefill's decoder input (avkv.reconstruct)
        #: a row's all-query statistics sink (:func:`avkv.lse_attention.row_sink`): the batched prefill's attention
        #: fills it from the row's unpadded slice, as the module's own sink is filled at batch 1
        self.row_sink: dict | None = None
        # a cache that is not one full-attention K/V per layer (sliding windows, KV-shared layers: Gemma-3n)
        self.irregular = irregular_cache(adapter)

    def _refuse(self, why: str) -> CompressionError:
        return CompressionError(f"method {self.method.name!r} is not supported on the {self.adapter.family} model's "
                                f"cache (sliding-window and KV-shared layers): {why}")

    #: what a method may ask for that the engine does not do on an irregular cache (sliding windows, KV sharing):
    #: a prefill attention of its own or the statistics route would replace the model's sliding-window masks,
    #: hidden-state pruning and reconstruction re-run layers whose cache another layer reads
    IRREGULAR_UNSUPPORTED = ("prunes_hidden_states", "needs_reconstruction", "all_query_stats", "prefill_attention")

    def __enter__(self):
        if self.irregular:
            asks = [f for f in self.IRREGULAR_UNSUPPORTED if getattr(self.method, f, False)]
            if self.method.decode_policy == "fixed":
                asks.append("decode_policy=fixed (eviction while decoding)")
            if self.mask_only:
                asks.append("mask_only (the masked reference)")
            if asks:
                raise self._refuse("it needs " + ", ".join(asks))
        if any(getattr(m, "needs_rope", False) for m in method_parts(self.method)):
            self._rotary()                     # needs_rope: refused here where the model has no single RoPE
        if self.method.requires_attentions and self.backend.base_impl != "eager":
            raise CompressionError(f"method {self.method.name!r} reads attention weights and needs "
                                   f"model.attn_implementation=eager (got {self.backend.base_impl!r})")
        if self.row:
            asks = [f for f in ROW_UNSUPPORTED if any(getattr(m, f, False) for m in method_parts(self.method))]
            if asks:
                raise CompressionError(f"method {self.method.name!r} cannot run as one row of a batched prefill: "
                                       f"it needs {', '.join(asks)}")
        self.backend.__enter__()
        for i, m in enumerate(self.attn_modules):
            m._avkv_layer = i
            if not self.row:
                self.handles.append(m.register_forward_hook(self._hook, with_kwargs=True))
        try:
            if not self.row:       # all-query methods: the prefill's statistics
                lse_attention.install(self.backend, self.method, self.modality)
            else:                  # a row's: its own sink, filled by the batch's row-by-row attention
                self.row_sink = lse_attention.row_sink(self.backend, self.method, self.modality)
            if getattr(self.method, "needs_reconstruction", False):
                from avkv.reconstruct import Capture, plan_of   # KVzip: the decoder input of the prefill
                self.capture = Capture(self.adapter, plan_of(self.method))
            self.plan = self.method.begin(self.req) or PrefillPlan()
            self._install(self.plan)
        except BaseException:
            self._remove()
            raise
        self.ledger.record.update(self.plan.record)
        return self

    def __exit__(self, *exc):
        self._remove()
        self.method.end()
        return False

    def _remove(self) -> None:
        if self.capture is not None:
            self.capture.remove()
        for h in self.handles:
            h.remove()
        self.handles = []
        for m in self.attn_modules:
            for attr in ("_avkv_valid", "_avkv_ragged", "_avkv_layer", "_avkv_positions"):
                if hasattr(m, attr):
                    delattr(m, attr)
        lse_attention.uninstall(self.backend)
        self.row_sink = None
        self.backend.__exit__(None, None, None)

    def _install(self, plan: PrefillPlan) -> None:
        name = self.method.name
        if plan.prune_from is not None:
            if not self.method.prunes_hidden_states:
                raise CompressionError(f"{name} asks for hidden-state pruning but does not declare "
                                       "prunes_hidden_states")
            if not 1 <= plan.prune_from < self.num_layers:
                raise CompressionError(f"{name}: prune_from={plan.prune_from} outside [1, {self.num_layers})")
            for i in range(plan.prune_from, self.num_layers):
                self.handles.append(self.layers[i].register_forward_pre_hook(self._prune_hook(i), with_kwargs=True))
        if plan.attention is not None and not self.method.prefill_attention:
            raise CompressionError(f"{name} installs a prefill attention but does not declare prefill_attention")

    # ------------------------------------------------------------------------------------------- stages
    @contextlib.contextmanager
    def stage(self, phase: str, last_logits_only: bool = False) -> Iterator[None]:
        """The hooks act as ``phase`` inside (``prefill``: the compressed chunk; ``decode``: decode steps).

        ``last_logits_only`` (prefill; the caller reads the chunk's logits at its last position only, or not at
        all): the last decoder layer computes its attention, output projection and MLP for the chunk's last row
        only, where nothing the method sees depends on the rows before it
        (:func:`avkv.layer_inputs.last_row_hooks`); its
        keys/values, its cache and what its hook sees are those of every row."""
        if phase not in PHASES[1:]:
            raise ValueError(f"stage must be one of {PHASES[1:]}, got {phase!r}")
        pattern = self.plan.attention if phase == "prefill" else None
        rows = self._last_row_hooks() if phase == "prefill" and last_logits_only else []
        self.phase = phase
        try:
            with self.backend.pattern(pattern) if pattern is not None else contextlib.nullcontext():
                yield
        finally:
            self.phase = "idle"
            for h in rows:
                h.remove()
            self.backend.end_last_row(self.attn_modules[-1])
        if pattern is not None:
            self.ledger.record.update(pattern.report())

    def _last_row_hooks(self) -> list:
        """:func:`avkv.layer_inputs.last_row_hooks` on the last decoder layer, inside the prefill stage; none on a
        row of a batched prefill, an irregular cache, the masked reference, or for a method that declares a flag in
        :data:`~avkv.layer_inputs.LAST_ROW_UNSUPPORTED`; the attention over every row for one that declares a flag
        in :data:`~avkv.layer_inputs.EVERY_ROW_ATTENTION`."""
        flags = {f for m in method_parts(self.method) for f in LAST_ROW_UNSUPPORTED + EVERY_ROW_ATTENTION
                 if getattr(m, f, False)}
        if self.row or self.irregular or self.mask_only or flags & set(LAST_ROW_UNSUPPORTED):
            return []
        return last_row_hooks(self.layers[-1], self.attn_modules[-1], self.backend, lambda: self.phase == "prefill",
                              attention=not flags & set(EVERY_ROW_ATTENTION))

    def end_prefill(self, cache) -> None:
        """After the compressed chunk: run deferred compressions (methods that allocate across layers see every
        layer first), then give layers whose caches now differ in length per-layer masks. A method that scores
        from a context reconstruction (``needs_reconstruction``: KVzip) gets it first (:mod:`avkv.reconstruct`; its
        time is in ``compress_s`` and, on its own, ``reconstruct_s``)."""
        if getattr(self.method, "needs_reconstruction", False) and self.pending:
            from avkv.reconstruct import reconstruct
            self.ledger.compress_s += reconstruct(self, cache)
        if self.pending:
            t0 = self.clock.now()
            for i in sorted(self.pending):
                module, modality, n_keep = self.pending[i]
                layer = cache.layers[i]
                view = self._view(module, None, layer.keys[0], layer.values[0], modality, n_keep)
                self._apply(module, cache, i, self._call(self.method.compress, view), modality)
            self.pending = {}
            self.ledger.compress_s += self.clock.elapsed(t0, self.clock.now())
        lengths = {layer.keys.shape[2] for layer in cache.layers if layer.keys is not None and layer.keys.numel()}
        if len(lengths) > 1 or (self.irregular and self.ledger.kept):
            # (a sliding layer's own mask is sized by the tokens it has seen, not by what it holds after compression)
            self.backend.masked()

    # ------------------------------------------------------------------------------------------- views
    def _view(self, module, kwargs, keys, values, modality, n_keep, attentions=None, decode=False) -> LayerView:
        """``kwargs`` None: a deferred compression after the forward, where no hidden states (queries) remain."""
        h = kwargs["hidden_states"] if kwargs is not None else None
        cos, sin = kwargs["position_embeddings"] if kwargs is not None else (None, None)
        S = keys.shape[1]

        def query_fn(a: int, b: int) -> torch.Tensor:
            if h is None:
                raise CompressionError("deferred compression has no queries: compute scores in observe()")
            if decode:                                  # only the newest positions exist in this forward
                if b != S or b - a > h.shape[1]:
                    raise CompressionError("during decode only the newest queries are available")
                a, b = h.shape[1] - (b - a), h.shape[1]
            return self.adapter.layer_queries(module, h[:, a:b], (cos[:, a:b], sin[:, a:b]))

        idx = module._avkv_layer
        positions = self.req.positions
        if positions is not None and not decode:
            lp = self.ledger.positions.get(idx)
            positions = positions[:, :S] if lp is None else positions[:, lp]
        else:
            positions = None
        return LayerView(layer_idx=idx, num_layers=self.num_layers, keys=keys, values=values, modality=modality,
                         n_keep=n_keep, num_heads=module.config.num_attention_heads, scaling=module.scaling,
                         state=self.store, generator=self.generator, query_fn=query_fn,
                         attentions=attentions, layout=self.req.layout,
                         value_norm_fn=lambda: values.float().norm(dim=-1), positions=positions,
                         rope_fn=self._rope, out_weight_fn=lambda: self.adapter.output_weight(module))

    def _rotary(self) -> torch.nn.Module:
        """The decoder's rotary embedding; a CompressionError naming the method where the adapter has none."""
        rot = getattr(self, "_rotary_emb", None)
        if rot is None:
            try:
                rot = self._rotary_emb = self.adapter.rotary_embedding()
            except NotImplementedError as e:
                raise CompressionError(f"method {self.method.name!r} reads the rotary embedding (needs_rope), not "
                                       f"supported on the {self.adapter.family} model: {e}") from e
        return rot

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) [T, D] of rotary position ids [R, T], from the decoder's own rotary embedding."""
        rot = self._rotary()
        p = positions.to(self.adapter.device)                   # [R, T]
        pid = p[:, None] if p.shape[0] == 3 else p               # M-RoPE [3, 1, T]; 1-D [1, T]
        x = torch.zeros(1, dtype=self.adapter.dtype, device=self.adapter.device)
        cos, sin = rot(x, pid)
        return cos[0].float(), sin[0].float()

    # ------------------------------------------------------------------------------------------- hooks
    @torch.no_grad()
    def _hook(self, module, args, kwargs, output):
        if self.phase not in ("prefill", "decode"):
            return
        if self.phase == "decode" and self.method.decode_policy != "fixed":
            return
        cache = kwargs.get("past_key_values")
        if cache is None:
            raise CompressionError("the decoder was called without a cache; the engine always passes one")
        attn = output[1][0] if isinstance(output, tuple) and len(output) > 1 and output[1] is not None else None
        self.layer_done(module, cache, kwargs, attn)

    def layer_done(self, module, cache, kwargs: dict, attn: torch.Tensor | None) -> None:
        """The end of one attention layer's forward in the current stage: ``cache`` holds this request's layer,
        ``kwargs`` its ``hidden_states`` [1, S, D] and ``position_embeddings``, ``attn`` its attention weights
        [H, q, S] (eager only). Called by the layer's hook, or, for a row of a batched prefill, with the row's
        unpadded slices (:mod:`avkv.batch_prefill`): the same code either way."""
        i = module._avkv_layer
        layer = cache.layers[i]
        if layer.keys is None:           # owns no cache: it attends over its source's, compressed with the source
            return
        t0 = self.clock.now()
        if self.phase == "prefill":
            if i in self.ledger.kept or i in self.pending:   # each layer is compressed once, at the end of its chunk
                return
            if getattr(layer, "sliding_window", None) is not None:
                attn = self._window_candidates(i, layer, attn)
            positions = self.ledger.positions.get(i)
            S = layer.keys.shape[2]
            modality = self.modality[: S] if positions is None else self.modality[positions]
            modality = modality.to(layer.keys.device)      # layers may sit on different devices (device_map)
            n_keep = min(self.req.n_keep, S)
            view = lse_attention.attach(self._view(module, kwargs, layer.keys[0], layer.values[0], modality, n_keep,
                                                   attn), module, self.row_sink)
            if view.stats is not None:                      # how the prefill computed the all-query statistics
                self.ledger.record["allquery_route"] = view.stats.route
            if self.method.deferred:          # scores now, selection once every layer has been seen
                self._call(self.method.observe, view)
                self.pending[i] = (module, modality, n_keep)
            else:
                self._apply(module, cache, i, self._call(self.method.compress, view), modality)
        else:
            if isinstance(layer, RaggedLayer):
                raise CompressionError(f"{self.method.name}: fixed-size decoding over a ragged (per-head) cache "
                                       "layer is not implemented; use decode_policy=grow")
            S = layer.keys.shape[2]
            target = self.ledger.decode_size.setdefault(i, S - 1)
            if S > target:
                view = self._view(module, kwargs, layer.keys[0], layer.values[0],
                                  torch.zeros(S, dtype=torch.long, device=layer.keys.device), target, attn, decode=True)
                sel = self.method.decode_step(view)
                if sel is not None:
                    _, _, storage = apply_selection(cache, i, module, sel, self.method.name, self.mask_only)
                    if storage != "dense":
                        self.backend.masked()
        self.ledger.compress_s += self.clock.elapsed(t0, self.clock.now())

    def _call(self, fn, view: LayerView):
        """``fn(view)``; on an irregular cache a method that fails on what it is shown (a sliding layer's view holds
        only its window, KV-shared layers are never shown: a method that indexes the view by prompt position or
        counts on seeing every layer) is refused by name, with its own message."""
        if not self.irregular:
            return fn(view)
        try:
            return fn(view)
        except CompressionError:
            raise
        except Exception as e:
            raise self._refuse(f"it fails on what the layers hold ({type(e).__name__}: {e})") from e

    def _window_candidates(self, i: int, layer, attn):
        """A sliding-window layer competes among the entries still in its window at the end of the prompt: the
        newest W − 1 − (n − s) of the chunk (with the uncompressed suffix that is what it holds at full, W − 1). The
        older ones are dropped before the method sees the layer; the chunk positions it holds are entered in the
        ledger (its view's modality and positions follow them). Returns ``attn`` cut to the same keys."""
        n, s = self.req.n_prompt, self.req.split
        room = min(s, int(layer.sliding_window) - 1 - (n - s))
        if room < 1:
            raise self._refuse(f"layer {i}'s window ({layer.sliding_window}) leaves no room beside the {n - s} "
                               f"uncompressed entries after the split")
        if layer.keys.shape[2] > room:
            layer.keys, layer.values = layer.keys[:, :, -room:], layer.values[:, :, -room:]
            attn = attn[..., -room:] if attn is not None else None
        S = layer.keys.shape[2]
        self.ledger.positions[i] = torch.arange(s - S, s, device=self.adapter.device)
        return attn

    def _apply(self, module, cache, i: int, sel: Selection, modality) -> None:
        """Apply layer ``i``'s prefill selection to the cache and enter it in the ledger. On an irregular cache
        only dense selections (every KV head keeping as many) are applied; a sliding-window layer's module gets the
        logical positions of what it kept (``_avkv_positions``: its decode window moves over them)."""
        if self.irregular and sel.valid is not None and not bool(sel.valid.all()):
            raise self._refuse("per-head budgets (ragged storage) are not supported on it")
        idx, valid, storage = apply_selection(cache, i, module, sel, self.method.name, self.mask_only)
        if getattr(cache.layers[i], "sliding_window", None) is not None:
            module._avkv_positions = self.ledger.positions[i][idx.to(self.ledger.positions[i].device)]
        if storage != "dense":
            self.backend.masked()
        self.ledger.keep(i, idx, valid, modality, sel, storage)
        if sel.hidden_keep is not None:
            self._accept_pruning(i, sel.hidden_keep)

    # ------------------------------------------------------------------------------------------- pruning
    def _accept_pruning(self, i: int, keep: torch.Tensor) -> None:
        K = self.plan.prune_from
        if K is None or i != K - 1:
            raise CompressionError(f"{self.method.name}: Selection.hidden_keep from layer {i}, but the plan prunes "
                                   f"from layer {K} (hidden_keep belongs to layer prune_from - 1)")
        if self._prune_keep is not None:
            return
        self._prune_keep = keep.to(self.adapter.device).long()
        for j in range(K, self.num_layers):      # the caches of the pruned layers hold these chunk positions
            self.ledger.positions[j] = self._prune_keep

    def _prune_hook(self, i: int):
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            keep = self._prune_keep
            if keep is None or i in self._pruned or self.phase != "prefill":
                return None                          # not the compressed chunk (suffix, decode) or nothing ranked
            h = args[0] if args else kwargs["hidden_states"]
            S = self.req.split
            if i == self.plan.prune_from and h.shape[1] != S:
                return None
            self._pruned.add(i)
            if i == self.plan.prune_from:
                h = h[:, keep.to(h.device)]
            return slice_inputs(args, kwargs, h, keep, S)
        return hook


#: what a row of a batched prefill cannot do (the batch's forward is shared: one attention pattern, one set of
#: hidden states; reconstruction re-runs the prefill of one request); such methods take the per-sample prefill
ROW_UNSUPPORTED = ("prefill_attention", "prunes_hidden_states", "needs_reconstruction")


__all__ = ["Compressor", "ROW_UNSUPPORTED", "PHASES"]
