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

#: tolerance of the probe-step logits (max absolute difference)
LOGIT_TOL = 1e-4
#: two scores closer than this (relative to the larger) count as tied at the cut: float sums in another order
#: (avkv's grouped matmul vs kvpress's repeat_kv) may swap them, so which one is kept is not defined
TIE_RTOL = 1e-5

CASES: list[dict] = [
    {"id": "snapkv_w16_k5", "press": "SnapKVPress", "kwargs": {"window_size": 16, "kernel_size": 5},
     "ratios": [0.5, 0.8],
     "avkv": {"method": "snapkv", "overrides": {"window": 16, "kernel": 5, "pooling": "avg", "gqa": "mean"}},
     "compare": "kept+logits", "note": "window attention, prefix-only avg pooling with zero padding counted"},
    {"id": "snapkv_w64_k5", "press": "SnapKVPress", "kwargs": {"window_size": 64, "kernel_size": 5},
     "ratios": [0.5],
     "avkv": {"method": "snapkv", "overrides": {"window": 64, "kernel": 5, "pooling": "avg", "gqa": "mean"}},
     "compare": "kept+logits", "note": "kvpress's default window"},
    {"id": "streamingllm_4", "press": "StreamingLLMPress", "kwargs": {"n_sink": 4}, "ratios": [0.5, 0.8],
     "avkv": {"method": "streamingllm", "overrides": {"sink": 4}},
     "compare": "kept+logits", "note": "sinks + most recent"},
    {"id": "knorm", "press": "KnormPress", "kwargs": {}, "ratios": [0.5, 0.8],
     "avkv": {"method": "knorm", "overrides": {}}, "compare": "kept+logits", "note": "lowest key L2 norms, no window"},
    {"id": "keydiff", "press": "KeyDiffPress", "kwargs": {}, "ratios": [0.5, 0.8],
     "avkv": {"method": "keydiff", "overrides": {}}, "compare": "kept+logits",
     "note": "least cosine-similar to the mean unit key, no window"},
    {"id": "tova", "press": "TOVAPress", "kwargs": {}, "ratios": [0.5, 0.8],
     "avkv": {"method": "tova", "overrides": {}}, "compare": "kept+logits",
     "note": "last query's attention, mean over all heads, last position kept"},
    {"id": "observed_attention", "press": "ObservedAttentionPress", "kwargs": {}, "kvpress_attn": "eager",
     "ratios": [0.5, 0.8], "avkv": {"method": "observed_attention", "overrides": {}}, "compare": "kept+logits",
     "note": "kvpress reads eager attention weights; avkv recomputes the column sums under SDPA"},
    {"id": "h2o_vs_observed_attention", "press": "ObservedAttentionPress", "kwargs": {}, "kvpress_attn": "eager",
     "ratios": [0.5, 0.8], "avkv": {"method": "h2o", "overrides": {"decode_policy": "grow"}},
     "compare": "measured_only",
     "note": "closest kvpress press to H2O; H2O keeps raw column sums (not divided by n−j) and half the budget as "
             "a recent window"},
    {"id": "pyramidkv_w16_k5", "press": "PyramidKVPress", "kwargs": {"window_size": 16, "kernel_size": 5},
     "ratios": [0.5, 0.8], "avkv": {"method": "pyramidkv", "overrides": {
         "scorer.window": 16, "scorer.kernel": 5, "scorer.pooling": "avg"}},
     "avkv_layer_counts_from_reference": True, "compare": "kept+logits",
     "note": "same scorer at kvpress's per-layer counts (schedule=weights); the schedules themselves differ: "
             "see pyramidkv_w16_k5_schedule"},
    {"id": "pyramidkv_w16_k5_schedule", "press": "PyramidKVPress", "kwargs": {"window_size": 16, "kernel_size": 5},
     "ratios": [0.5, 0.8], "avkv": {"method": "pyramidkv", "overrides": {
         "scorer.window": 16, "scorer.kernel": 5, "scorer.pooling": "avg"}},
     "compare": "measured_only",
     "note": "avkv's own schedule (KVCache-Factory, the window outside n·(1−ratio), mean exactly B) vs kvpress's "
             "(window inside, uniform fallback when the last layer would keep less than the window)"},
    {"id": "adakv_safeguard_snapkv_w16_k5", "press": "AdaKVPress",
     "kwargs": {"press": {"press": "SnapKVPress", "kwargs": {"window_size": 16, "kernel_size": 5}},
                "alpha_safeguard": 0.2},
     "ratios": [0.5, 0.8], "avkv": {"method": "adakv", "overrides": {
         "scorer.window": 16, "scorer.kernel": 5, "scorer.pooling": "avg", "floor": 0.2, "floor_rule": "safeguard"}},
     "compare": "kept+logits",
     "note": "kvpress's allocation rule (floor_rule=safeguard); kvpress masks the dropped keys, avkv stores the "
             "heads ragged"},
    {"id": "adakv_snapkv_w16_k5", "press": "AdaKVPress",
     "kwargs": {"press": {"press": "SnapKVPress", "kwargs": {"window_size": 16, "kernel_size": 5}},
                "alpha_safeguard": 0.2},
     "ratios": [0.5, 0.8], "avkv": {"method": "adakv", "overrides": {
         "scorer.window": 16, "scorer.kernel": 5, "scorer.pooling": "avg", "floor": 0.2}},
     "compare": "measured_only",
     "note": "same scorer and layer budget; kvpress's safeguard keeps each head's top int(0.2·n_kept) entries "
             "(the window among them) then prunes globally, avkv (AdaKV paper) mixes the global win count with a "
             "floor of 0.2·(B − w) prefix entries beyond the window"},
]


from tests.parity.cases_presses import PRESS_CASES  # noqa: E402  (the presses of issue 13 item 3)

CASES += PRESS_CASES


def by_id(case_id: str) -> dict:
    for c in CASES:
        if c["id"] == case_id:
            return c
    raise KeyError(case_id)
