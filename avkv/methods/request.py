"""The method lifecycle's typed messages: what a method is told about a sample, and what it asks the engine for.

Per sample the engine calls ``method.begin(request)`` with a frozen, model-free :class:`Request` (lengths, the
modality layout, the split point, the model's shape and identity — never the model, adapter or layer objects) and
installs what the returned :class:`PrefillPlan` asks for, for the capabilities the method declares
(:class:`~avkv.methods.base.Method`):

* ``prunes_hidden_states`` (FastV): hidden states are pruned from decoder layer ``plan.prune_from`` on; the
  selection of layer ``prune_from - 1`` names the chunk positions that stay (``Selection.hidden_keep``) and the
  engine slices the later layers' inputs and knows which positions their caches hold;
* ``prefill_attention`` (PureKV): the compressed chunk's forward runs through ``plan.attention``, a registered
  attention function the engine switches the decoder to (:mod:`avkv.attention` owns that switch);
* ``needs_reconstruction`` (KVzip): the method's ``reconstruction_plan()`` returns a :class:`ReconstructionPlan`
  (chunk size, instruction texts, prefix rule) and the engine runs that reconstruction after the prefill
  (:mod:`avkv.reconstruct`), never reading the method's own settings.

What a method finds out comes back as return values: ``Selection.info`` (per layer), ``Selection.record`` and
``plan.record`` / ``plan.attention.report()`` (fields of the sample's record), ``Selection.position_shift``
(re-rotated keys: how far the suffix and the decoded tokens move). Per-request scratch a method keeps between
layers lives in ``view.scratch(self)``, a dict the engine gives each method instance for one sample.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Mapping

import torch


@dataclass(frozen=True)
class Request:
    """One sample as a method sees it before the prefill (batch size 1)."""

    n_prompt: int                      # prompt tokens n
    split: int                         # the compressed chunk is [0, split); [split, n) is fed on the compressed cache
    n_keep: int                        # target kept entries per KV head and layer, for the compressed chunk
    num_layers: int                    # decoder layers L
    num_heads: int                     # query heads H
    num_kv_heads: int                  # KV heads
    modality: torch.Tensor             # [n] modality ids of the whole prompt
    layout: Mapping[str, Any] = field(default_factory=dict)   # adapter extras, e.g. video "frame"/"spatial" index
    question_start: int | None = None  # first question token
    positions: torch.Tensor | None = None   # rotary position ids of the prompt [R, n] (R = 1, or 3 for M-RoPE)
    family: str | None = None          # the model family (ModelAdapter.family), for messages and per-model files
    model_path: str | None = None      # the checkpoint folder (AudioKV finds its calibration file from it)


@dataclass(frozen=True)
class AttentionPattern:
    """A prefill attention pattern, installed for the compressed chunk's forward.

    ``name`` is the attention implementation the decoder is switched to; ``register(base_impl)`` registers it with
    transformers; ``activate(base_fn)`` is a context manager inside which the pattern is live (``base_fn`` is the
    attention function of the model's own backend, for every call the pattern does not handle); ``report()`` gives
    fields for the sample's record once the chunk ran.
    """

    name: str
    register: Callable[[str], Any]
    activate: Callable[[Callable], ContextManager]
    report: Callable[[], dict] = dict


@dataclass(frozen=True)
class PrefillPlan:
    """What a method asks the engine to install for one sample (``Method.begin``'s return value)."""

    prune_from: int | None = None      # prunes_hidden_states: the first decoder layer whose inputs are pruned
    attention: AttentionPattern | None = None   # prefill_attention: the pattern of the compressed chunk's forward
    record: dict = field(default_factory=dict)  # fields of the sample's record known before the prefill


@dataclass(frozen=True)
class ReconstructionPlan:
    """How the engine reconstructs the context for a ``needs_reconstruction`` method
    (``Method.reconstruction_plan``'s return value; :mod:`avkv.reconstruct` runs it).

    Per context chunk ``[a, b)`` of at most ``chunk`` entries after the first ``prefix`` entries, the decoder reads
    ``repeat_prompt`` (first chunk) or ``repeat_part_prompt`` + the previous chunk's last ``tail`` entries (later
    chunks), then the chat template's assistant preamble, then the chunk. The texts are plain text (control
    strings escaped). ``prefix=None``: the chat template's own prefix (tokens before a user message's content).
    """

    chunk: int                         # context entries reconstructed per forward
    tail: int                          # entries of the previous chunk repeated after a later chunk's instruction
    repeat_prompt: str                 # instruction of the first chunk
    repeat_part_prompt: str            # instruction of the later chunks
    prefix: int | None = None          # leading entries never reconstructed; None: the chat template's prefix

    def __post_init__(self) -> None:
        if self.chunk < 1 or self.tail < 0 or (self.prefix is not None and self.prefix < 0):
            raise ValueError(f"ReconstructionPlan: chunk must be ≥ 1, tail and prefix ≥ 0 (got chunk={self.chunk}, "
                             f"tail={self.tail}, prefix={self.prefix})")


def one_plan(plans: list[PrefillPlan | None], owner: str) -> PrefillPlan | None:
    """The plan of several inner methods (wrappers, compositions): at most one may install something."""
    real = [p for p in plans if p is not None]
    if not real:
        return None
    if sum(p.prune_from is not None or p.attention is not None for p in real) > 1:
        raise ValueError(f"{owner}: only one inner method may prune hidden states or install a prefill attention")
    record: dict = {}
    for p in real:
        record.update(p.record)
    main = next((p for p in real if p.prune_from is not None or p.attention is not None), real[0])
    return PrefillPlan(prune_from=main.prune_from, attention=main.attention, record=record)


__all__ = ["Request", "PrefillPlan", "AttentionPattern", "ReconstructionPlan", "one_plan"]
