"""Context reconstruction between the prefill and the compression (KVzip, Kim et al., 2025, arXiv 2505.23416).

A method that declares ``needs_reconstruction`` (:class:`~avkv.methods.kvzip.KVzip`) scores the cache by how much
a *reconstruction* of the context attends to it. After the prefill of the compressed chunk ``[0, s)`` the engine
makes one call, :func:`reconstruct` (from ``Compressor.end_prefill``, before the deferred compressions), which runs
extra forwards of the decoder over the cache, one per context chunk ``[a, b)``, as the method's
:class:`~avkv.methods.request.ReconstructionPlan` says (``method.reconstruction_plan()``, asked once per sample
when the engine installs :class:`Capture`, :func:`plan_of`; the engine never reads the method's own settings):

    repeat instruction · (last ``tail`` entries of the previous chunk) · assistant preamble · context[a:b]

The instruction is plain text, tokenized by the adapter's tokenizer with every control-token string escaped
(:func:`~avkv.models.base.escape_controls`); the assistant preamble is the chat template's own (kvpress's rule,
:func:`template_parts`); the context chunk is the decoder's own input of the prefill, *embeddings* captured by
:class:`Capture` (media features included, so a video or audio context is repeated as the model saw it, not as
placeholder ids). The reconstruction tokens take the positions that follow the chunk ``[0, s)``
(:func:`next_positions`: every rotary row continues at its last value + 1, as the question would).

In each decoder layer, right after its attention, a hook hands the method the reconstruction queries and the
layer's keys (:class:`ReconstructionView`, ``method.score_reconstruction``) and then cuts the layer's cache back
to ``s`` entries, so no key or value of the reconstruction stays in the cache (checked after every chunk).

Time: the whole step is measured by the engine's clock and returned; the engine adds it to ``compress_s`` and it
is recorded on its own as ``reconstruct_s`` (both also inside ``prefill_s``, like every compression step).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from avkv.methods.request import ReconstructionPlan


class ReconstructionError(RuntimeError):
    pass


def decoder_stack(adapter) -> torch.nn.Module:
    """The module that runs the decoder layers (``Qwen2Model``, a VLM's language model): the one whose ``layers``
    start with the adapter's first decoder layer."""
    first = adapter.decoder_layers()[0]
    for m in adapter.model.modules():
        layers = getattr(m, "layers", None)
        if isinstance(layers, torch.nn.ModuleList) and len(layers) and layers[0] is first:
            return m
    raise ReconstructionError(f"{type(adapter).__name__}: no module holds the decoder layers")


class Capture:
    """The decoder's input of the first forward after it is installed (the prefill of the compressed chunk):
    input embeddings ``[1, s, hidden]`` (media features merged, as the decoder received them) and position ids;
    ``plan`` is the method's :class:`~avkv.methods.request.ReconstructionPlan` for this sample (:func:`plan_of`)."""

    def __init__(self, adapter, plan: ReconstructionPlan | None = None):
        self.plan = plan                   # what the engine will run over the captured input (reconstruct)
        self.stack = decoder_stack(adapter)
        self.embeds: torch.Tensor | None = None
        self.position_ids: torch.Tensor | None = None
        self._h = self.stack.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        if self.embeds is not None:
            return
        emb = kwargs.get("inputs_embeds")
        if emb is None:
            ids = kwargs.get("input_ids", args[0] if args else None)
            emb = module.get_input_embeddings()(ids)
        self.embeds = emb.detach()
        self.position_ids = kwargs.get("position_ids")
        self.remove()

    def remove(self) -> None:
        if self._h is not None:
            self._h.remove()
            self._h = None


def plan_of(method: Any) -> ReconstructionPlan:
    """The method's reconstruction plan (``Method.reconstruction_plan``), which a method that declares
    ``needs_reconstruction`` must return."""
    plan = method.reconstruction_plan()
    if not isinstance(plan, ReconstructionPlan):
        raise ReconstructionError(f"method {method.name!r} declares needs_reconstruction but its "
                                  f"reconstruction_plan() returned {plan!r}, not a ReconstructionPlan")
    return plan


def next_positions(pos: torch.Tensor | None, s: int, count: int, device) -> torch.Tensor:
    """Position ids of ``count`` text tokens after the prefilled chunk, in the layout the decoder was given:
    every row continues at its own last value + 1 (``[1, s]`` → s, s+1, …; M-RoPE ``[3|4, 1, s]``: text after the
    chunk's last, text token, the rule of ``ModelAdapter.continue_position_ids``)."""
    step = torch.arange(1, count + 1, device=device)
    if pos is None:
        return (s - 1 + step)[None]
    pos = pos.to(device)
    if pos.dim() == 2:
        return pos[:, -1:] + step[None]
    return pos[:, :, -1:] + step


def template_parts(adapter) -> tuple[int, list[int]]:
    """kvpress's rule for the chat template: (tokens before a user message's content, the ids of what follows it
    up to the assistant turn). A dummy user message is rendered by the tokenizer's chat template; without one the
    prefix is empty and the preamble is a newline."""
    tok = adapter.tokenizer
    encode = lambda t: tok(t, add_special_tokens=False)["input_ids"]
    if getattr(tok, "chat_template", None) is None:
        return 0, encode("\n")
    dummy = "dummy context"
    sep = "\n" + "#" * len(dummy)
    text = tok.apply_chat_template([{"role": "user", "content": dummy + sep}], add_generation_prompt=True,
                                   tokenize=False, enable_thinking=False)
    head, found, suffix = text.partition(sep)
    if not found:
        raise ReconstructionError("the chat template did not render the user message verbatim")
    return len(encode(head.partition(dummy)[0])), encode(suffix)


def plain_ids(adapter, text: str) -> list[int]:
    """``text`` as ordinary tokens: control-token strings in it are escaped first (they never become controls)."""
    from avkv.models.base import escape_controls
    safe, _ = escape_controls(text, adapter.control_strings())
    return adapter.tokenizer(safe, add_special_tokens=False)["input_ids"]


@dataclass
class ReconstructionView:
    """One layer, one reconstruction chunk, as the method's ``score_reconstruction`` sees it (batch size 1)."""

    layer_idx: int
    queries: torch.Tensor              # [H, T, D] post-RoPE queries of the T reconstruction tokens
    keys: torch.Tensor                 # [kvH, s + T, D] the prefilled chunk, then the reconstruction's own keys
    values: torch.Tensor               # [kvH, s + T, D]
    hidden: torch.Tensor               # [T, hidden] the attention's input hidden states of the reconstruction tokens
    start: int                         # context chunk [start, end) being reconstructed
    end: int
    split: int                         # s: entries of the prefilled chunk
    scaling: float
    state: dict                        # the engine's per-request store: methods use scratch(self), not its keys
    out_weight_fn: Callable[[], torch.Tensor]      # [H, D, hidden] the layer's output projection per query head

    def scratch(self, owner: Any) -> dict:
        """The method instance's per-request scratch: the same dict ``LayerView.scratch(owner)`` gives its layers."""
        return self.state.setdefault(("scratch", id(owner)), {})


@torch.no_grad()
def reconstruct(compressor: Any, cache: Any) -> float:
    """Run the method's reconstruction over ``cache`` (the prefilled chunk, every layer ``[1, kvH, s, D]``); the
    cache is left as it was. Returns the seconds it took (the engine's clock); also recorded as
    ``reconstruct_s``."""
    method, adapter, store = compressor.method, compressor.adapter, compressor.store
    clock = compressor.clock
    t0 = clock.now()
    cap: Capture | None = getattr(compressor, "capture", None)
    if cap is None or cap.embeds is None or cap.plan is None:
        raise ReconstructionError(f"{method.name}: the prefill input was not captured (the engine installs Capture "
                                  "with the method's plan for a method with needs_reconstruction)")
    plan = cap.plan
    s = int(cache.layers[0].keys.shape[2])
    lengths = {int(layer.keys.shape[2]) for layer in cache.layers}
    if lengths != {s} or cap.embeds.shape[1] != s:
        raise ReconstructionError(f"reconstruction needs every layer at the prefilled length {s} (layers hold "
                                  f"{sorted(lengths)}, the captured input {cap.embeds.shape[1]})")
    ctx = cap.embeds
    dev = ctx.device
    prefix, preamble = template_parts(adapter)
    prefix = max(0, min(prefix if plan.prefix is None else plan.prefix, s - 1))
    emb = cap.stack.get_input_embeddings()
    embed = lambda ids: emb(torch.tensor([ids], dtype=torch.long, device=emb.weight.device)).to(ctx.dtype).to(dev)
    first, later, tail = embed(plain_ids(adapter, plan.repeat_prompt)), None, plan.tail
    pre = embed(preamble) if preamble else ctx[:, :0]
    chunk = plan.chunk
    current: dict = {}

    def hook(module, args, kwargs, output):
        i = module._avkv_layer
        layer = cache.layers[i]
        h = kwargs["hidden_states"]
        T = h.shape[1]
        q = adapter.layer_queries(module, h, kwargs["position_embeddings"])
        method.score_reconstruction(ReconstructionView(
            layer_idx=i, queries=q, keys=layer.keys[0], values=layer.values[0], hidden=h[0],
            start=current["a"], end=current["b"], split=s, scaling=module.scaling, state=store,
            out_weight_fn=lambda: adapter.output_weight(module)))
        if layer.keys.shape[2] != s + T:
            raise ReconstructionError(f"layer {i}: the reconstruction forward left {layer.keys.shape[2]} entries, "
                                      f"expected {s} + {T}")
        layer.keys, layer.values = layer.keys[:, :, :s].contiguous(), layer.values[:, :, :s].contiguous()

    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in compressor.attn_modules]
    n_chunks = 0
    try:
        for a in range(prefix, s, chunk):
            b = min(a + chunk, s)
            if a == prefix:
                parts = [first]
            else:
                later = embed(plain_ids(adapter, plan.repeat_part_prompt)) if later is None else later
                parts = [later, ctx[:, a - min(tail, chunk):a]]     # the previous chunk's end
            x = torch.cat(parts + [pre, ctx[:, a:b]], dim=1)
            current.update(a=a, b=b)
            cap.stack(inputs_embeds=x, position_ids=next_positions(cap.position_ids, s, x.shape[1], dev),
                      past_key_values=cache, use_cache=True)
            n_chunks += 1
            if any(int(layer.keys.shape[2]) != s for layer in cache.layers):
                raise ReconstructionError("the reconstruction left entries in the cache")
    finally:
        for hd in handles:
            hd.remove()
    dt = clock.elapsed(t0, clock.now())
    rec = compressor.ledger.record
    rec["reconstruct_s"] = rec.get("reconstruct_s", 0.0) + dt
    rec["reconstruct_chunks"] = n_chunks
    rec["reconstruct_prefix"] = prefix
    return dt
