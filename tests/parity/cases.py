"""The kvpress parity cases: plain data, read by the reference script (side venv) and by the tests (main venv).

Each case is a dict:

* ``id``: unique name (file names of the cached references use it);
* ``press``: a kvpress class name (``getattr(kvpress, name)``); ``kwargs``: its constructor arguments, where a
  nested press is ``{"press": "ClassName", "kwargs": {...}}`` (wrappers: ``AdaKVPress``, ``BlockPress``, ...);
  ``compression_ratio`` is set by the script from ``ratios`` (on the outer press; wrappers forward it);
* ``kvpress_attn``: attention implementation kvpress runs with (``sdpa``, or ``eager`` for presses that read the
  attention weights);
* ``ratios``: kvpress compression ratios; kvpress keeps ``n_kept = max(1, int(n·(1−ratio)))`` per KV head;
* ``avkv``: ``{"method": config name, "overrides": {dotted field: value}}`` — the avkv method driven through its own
  Engine to the same kept count;
* ``compare``: ``kept+logits`` (kept set equal on every KV head not tied at the cut, probe logits within 1e-4, same
  argmax) or ``measured_only`` (the numbers are recorded and reported, not asserted; ``note`` says why);
* ``avkv_layer_counts_from_reference`` (optional): avkv runs at the per-layer kept counts kvpress kept
  (``schedule=weights``), so a per-layer allocation is compared on its scorer alone;
* ``note``: what the case checks, or the documented difference.

Other helpers extend :data:`CASES` (append entries); nothing else needs to change.
"""
from __future__ import annotations

import copy

#: tolerance of the probe-step logits (max absolute difference)
LOGIT_TOL = 1e-4
#: two scores closer than this (relative to the larger) count as tied at the cut: float sums in another order
#: (avkv's grouped matmul vs kvpress's repeat_kv) may swap them, so which one is kept is not defined
TIE_RTOL = 1e-5

def case(id: str, press: str, kwargs: dict, method: str, overrides: dict, note: str, ratios=(0.5, 0.8),
         compare: str = "kept+logits", kvpress_attn: str | None = None, layer_counts: bool = False) -> dict:
    """One case dict (the fields above, in that order); ``layer_counts``: ``avkv_layer_counts_from_reference``."""
    c = {"id": id, "press": press, "kwargs": copy.deepcopy(kwargs)}
    if kvpress_attn:
        c["kvpress_attn"] = kvpress_attn
    c.update(ratios=list(ratios), avkv={"method": method, "overrides": dict(overrides)})
    if layer_counts:
        c["avkv_layer_counts_from_reference"] = True
    c.update(compare=compare, note=note)
    return c


SNAP_W16 = {"window_size": 16, "kernel_size": 5}
#: avkv's SnapKV scorer as kvpress computes it, inside a wrapper method (PyramidKV, AdaKV)
SCORER_W16 = {"scorer.window": 16, "scorer.kernel": 5, "scorer.pooling": "avg"}
ADAKV_SNAP_W16 = {"press": {"press": "SnapKVPress", "kwargs": SNAP_W16}, "alpha_safeguard": 0.2}
MEASURED = dict(compare="measured_only")
EAGER = dict(kvpress_attn="eager")

#: id, kvpress press, its kwargs, avkv method, its overrides, note, options (ratios, compare, kvpress_attn, ...)
TABLE = [
    ("snapkv_w16_k5", "SnapKVPress", SNAP_W16, "snapkv", {"window": 16, "kernel": 5, "pooling": "avg", "gqa": "mean"},
     "window attention, prefix-only avg pooling with zero padding counted", {}),
    ("snapkv_w64_k5", "SnapKVPress", {"window_size": 64, "kernel_size": 5},
     "snapkv", {"window": 64, "kernel": 5, "pooling": "avg", "gqa": "mean"}, "kvpress's default window",
     dict(ratios=[0.5])),
    ("streamingllm_4", "StreamingLLMPress", {"n_sink": 4}, "streamingllm", {"sink": 4}, "sinks + most recent", {}),
    ("knorm", "KnormPress", {}, "knorm", {}, "lowest key L2 norms, no window", {}),
    ("keydiff", "KeyDiffPress", {}, "keydiff", {}, "least cosine-similar to the mean unit key, no window", {}),
    ("tova", "TOVAPress", {}, "tova", {}, "last query's attention, mean over all heads, last position kept", {}),
    ("observed_attention", "ObservedAttentionPress", {}, "observed_attention", {},
     "kvpress reads eager attention weights; avkv recomputes the column sums under SDPA", EAGER),
    ("h2o_vs_observed_attention", "ObservedAttentionPress", {}, "h2o", {"decode_policy": "grow"},
     "closest kvpress press to H2O; H2O keeps raw column sums (not divided by n−j) and half the budget as "
     "a recent window", {**EAGER, **MEASURED}),
    ("pyramidkv_w16_k5", "PyramidKVPress", SNAP_W16, "pyramidkv", SCORER_W16,
     "same scorer at kvpress's per-layer counts (schedule=weights); the schedules themselves differ: "
     "see pyramidkv_w16_k5_schedule", dict(layer_counts=True)),
    ("pyramidkv_w16_k5_schedule", "PyramidKVPress", SNAP_W16, "pyramidkv", SCORER_W16,
     "avkv's own schedule (KVCache-Factory, the window outside n·(1−ratio), mean exactly B) vs kvpress's "
     "(window inside, uniform fallback when the last layer would keep less than the window)", MEASURED),
    ("adakv_safeguard_snapkv_w16_k5", "AdaKVPress", ADAKV_SNAP_W16, "adakv",
     {**SCORER_W16, "floor": 0.2, "floor_rule": "safeguard"},
     "kvpress's allocation rule (floor_rule=safeguard); kvpress masks the dropped keys, avkv stores the "
     "heads ragged", {}),
    ("adakv_snapkv_w16_k5", "AdaKVPress", ADAKV_SNAP_W16, "adakv", {**SCORER_W16, "floor": 0.2},
     "same scorer and layer budget; kvpress's safeguard keeps each head's top int(0.2·n_kept) entries "
     "(the window among them) then prunes globally, avkv (AdaKV paper) mixes the global win count with a "
     "floor of 0.2·(B − w) prefix entries beyond the window", MEASURED),
]

CASES: list[dict] = [case(*row[:6], **row[6]) for row in TABLE]


from tests.parity.cases_presses import PRESS_CASES  # noqa: E402  (the presses of issue 13 item 3)

CASES += PRESS_CASES


#: kvpress ports (``Method.kvpress``) with no compared case, and why: every other port has a case that asserts parity
#: (``tests/parity/test_ports.py``)
NOT_COMPARED = {
    "decoding": "DecodingPress compresses during decoding; the suite compares a prefill and one probe step, where "
                "it is the wrapped scorer's prefill selection (docs/methods.md: not compared)",
}


def by_id(case_id: str) -> dict:
    for c in CASES:
        if c["id"] == case_id:
            return c
    raise KeyError(case_id)
