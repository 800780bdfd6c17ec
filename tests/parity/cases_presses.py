"""Parity cases of the kvpress presses added in issue 13 item 3 (scorers and wrappers); appended to
:data:`tests.parity.cases.CASES`. Same schema; extra keys used here:

* ``ratio_fixed_by_press``: the press fixes its own ratios (SimLayerKV, PerLayerCompression): no ratio is set, the
  single entry of ``ratios`` only names the reference file;
* ``avkv_n_kept_from_reference``: avkv runs at the count kvpress's cache holds (layer 0), when the press keeps a
  different count than ``n_kept`` (ChunkKV's whole chunks, a composition);
* ``attrs``: press attributes set after construction (FINCH's window, outside its constructor);
* ``avkv_n_kept_mean_from_reference``: one selection over every layer and head (KVzip): avkv runs at kvpress's
  total kept count over layers and heads, as a mean per head (``int(L·kvH·n·ratio)`` pruned, not ``n_kept``);
* ``avkv.config``: a whole avkv method config (wrappers around another scorer) instead of ``method`` + ``overrides``;
* ``compare: kept``: kept sets only (kvpress's probe logits are not defined there, ``note`` says why);
* ``compare: logits``: the kept keys are rewritten (re-rotated), so no row matches the uncompressed keys; the probe
  logits (and the kept count) are compared;
* ``score_atol``: the method's own scores, z-scored over the layer (one mean and deviation over all KV heads, as
  kvpress's press returns them), are within this of kvpress's (max absolute difference) on every layer.

Inner scorers are chosen so that what the wrapper receives is defined: where kvpress hands a wrapped scorer its
entries in ``topk`` order (Block, Composed), the scorer is order-free (CUR without local windows or sinks).
"""
from __future__ import annotations

CUR_FREE = {"press": "CURPress", "kwargs": {"num_sinks": 0, "use_local_approximation": False}}
CUR_FREE_AVKV = {"_target_": "avkv.methods.cur.CUR", "sink": 0, "local": False}
CUR = {"_target_": "avkv.methods.cur.CUR"}

SNAPKV = {"press": "SnapKVPress", "kwargs": {"window_size": 16, "kernel_size": 5}}
SNAPKV_AVKV = {"_target_": "avkv.methods.snapkv.SnapKV", "window": 16, "kernel": 5, "pooling": "avg", "gqa": "mean"}

PRESS_CASES: list[dict] = [
    {"id": "expected_attention", "press": "ExpectedAttentionPress", "kwargs": {}, "ratios": [0.5, 0.8],
     "avkv": {"method": "expected_attention", "overrides": {}}, "compare": "kept+logits",
     "note": "Gaussian query model, mean RoPE over 512 future positions, covariance term, value norms"},
    {"id": "expected_attention_plain", "press": "ExpectedAttentionPress",
     "kwargs": {"use_covariance": False, "use_vnorm": False, "n_future_positions": 64}, "ratios": [0.5],
     "avkv": {"method": "expected_attention", "overrides": {"covariance": False, "vnorm": False, "future": 64}},
     "compare": "kept+logits", "note": "mean term only"},
    {"id": "lagkv", "press": "LagKVPress", "kwargs": {}, "ratios": [0.2, 0.4],
     "avkv": {"method": "lagkv", "overrides": {}}, "compare": "kept+logits",
     "note": "lag 128 on 300 entries: one scored block (4..131), sinks and tail (172 entries) score 1; at ratios "
             "≥ 0.43 the cut falls inside that tie on every head (nothing defined to compare), so 0.2 and 0.4"},
    {"id": "lagkv_lag32_cross", "press": "LagKVPress", "kwargs": {"lag_size": 32, "cross_scoring": True},
     "ratios": [0.5, 0.8], "avkv": {"method": "lagkv", "overrides": {"lag": 32, "cross_scoring": True}},
     "compare": "kept+logits", "note": "cross-block scores: no rank ties"},
    {"id": "cur", "press": "CURPress", "kwargs": {}, "ratios": [0.5, 0.8],
     "avkv": {"method": "cur", "overrides": {}}, "compare": "kept+logits", "note": "kv_product, local windows of 16"},
    {"id": "cur_key_global", "press": "CURPress", "kwargs": {"leverage_type": "key", "use_local_approximation": False},
     "ratios": [0.5], "avkv": {"method": "cur", "overrides": {"leverage": "key", "local": False}},
     "compare": "kept+logits", "note": "key energy, no local windows"},
    {"id": "compactor", "press": "CompactorPress", "kwargs": {"blending": 0.35}, "ratios": [0.5, 0.8],
     "avkv": {"method": "compactor", "overrides": {"blending": 0.35}}, "compare": "kept+logits",
     "note": "sketch 48 ≥ head_dim 16: the random sketch (global RNG in kvpress, the sample's generator in avkv) only "
             "enters through the 0.01 Cholesky jitter"},
    {"id": "leverage", "press": "LeverageScorePress", "kwargs": {}, "ratios": [0.5, 0.8],
     "avkv": {"method": "leverage"}, "compare": "kept+logits", "score_atol": 5e-4,
     "note": "sketch 48 ≥ head_dim 16: the random sketch only enters through the 0.01 Cholesky jitter; kvpress's "
             "layer z-score ranks as the raw scores. score_atol: avkv's layer z-scores against kvpress's (two "
             "random sketches: up to 2.4e-4 apart over 190 seed pairs; a jitter of 0.1: 9e-4)"},
    {"id": "finch_w16", "press": "FinchPress", "kwargs": {"rerotate_keys": False},
     "attrs": {"window_size": 16, "delimiter_token_id": -1}, "ratios": [0.5, 0.8],
     "avkv": {"method": "finch", "overrides": {"window": 16, "rerotate": False}}, "compare": "kept+logits",
     "note": "a fixed 16-token window (kvpress's delimiter never occurs), position-normalised window attention"},
    {"id": "finch_w16_rerotate", "press": "FinchPress", "kwargs": {"rerotate_keys": True},
     "attrs": {"window_size": 16, "delimiter_token_id": -1}, "ratios": [0.5],
     "avkv": {"method": "finch", "overrides": {"window": 16, "rerotate": True, "continue_at": "original"}},
     "compare": "logits", "note": "kept keys re-rotated to 0..k-1; the probe at the original position n as the "
                                  "reference script runs it"},
    {"id": "simlayerkv", "press": "SimLayerKVPress",
     "kwargs": {"lazy_threshold": 0.147, "n_recent": 64, "n_initial": 4, "n_last": 1},
     "ratio_fixed_by_press": True, "ratios": [0.0],
     "avkv": {"method": "simlayerkv", "overrides": {"lazy_threshold": 0.147, "n_recent": 64, "n_initial": 4,
                                                    "n_last": 1}},
     "compare": "kept+logits", "note": "threshold between the two layers' scores (avkv: 0.1415, 0.1525): layer 1 "
                                       "lazy (4 + 63 entries), layer 0 whole"},
    {"id": "chunkkv_cur", "press": "ChunkKVPress", "kwargs": {"press": {"press": "CURPress", "kwargs": {}},
                                                              "chunk_length": 20},
     "ratios": [0.2, 0.6], "avkv_n_kept_from_reference": True,
     "avkv": {"config": {"_target_": "avkv.methods.chunkkv.ChunkKV", "chunk": 20, "scorer": CUR}},
     "compare": "kept+logits", "note": "whole chunks of 20 by summed CUR scores (ratios where kvpress's chunk "
                                       "count fills n_kept)"},
    {"id": "chunkkv_snapkv", "press": "ChunkKVPress", "kwargs": {"press": SNAPKV, "chunk_length": 20},
     "ratios": [0.2, 0.6], "avkv_n_kept_from_reference": True,
     "avkv": {"config": {"_target_": "avkv.methods.chunkkv.ChunkKV", "chunk": 20, "scorer": SNAPKV_AVKV}},
     "compare": "kept+logits", "note": "the paper's pairing: SnapKV scores (window padded with max + 1, as kvpress)"},
    {"id": "criticalkv_snapkv", "press": "CriticalKVPress", "kwargs": {"press": SNAPKV}, "ratios": [0.5, 0.8],
     "avkv": {"config": {"_target_": "avkv.methods.criticalkv.CriticalKV", "scorer": SNAPKV_AVKV}},
     "compare": "kept+logits", "note": "SnapKV first stage (its window among the first-stage entries)"},
    {"id": "criticaladakv_snapkv", "press": "CriticalAdaKVPress", "kwargs": {"press": SNAPKV, "alpha_safeguard": 0.2},
     "ratios": [0.5, 0.8],
     "avkv": {"config": {"_target_": "avkv.methods.criticalkv.CriticalAdaKV", "scorer": SNAPKV_AVKV,
                         "alpha_safeguard": 0.2}},
     "compare": "kept+logits", "note": "SnapKV scores, safeguard, head budgets"},
    {"id": "criticalkv_cur", "press": "CriticalKVPress", "kwargs": {"press": {"press": "CURPress", "kwargs": {}}},
     "ratios": [0.5, 0.8],
     "avkv": {"config": {"_target_": "avkv.methods.criticalkv.CriticalKV", "scorer": CUR}},
     "compare": "kept+logits", "note": "first half of the budget by CUR, the rest by (score+ε)·‖v W_o‖₁"},
    {"id": "criticalkv_expected_attention", "press": "CriticalKVPress",
     "kwargs": {"press": {"press": "ExpectedAttentionPress", "kwargs": {"use_vnorm": False}}}, "ratios": [0.5],
     "avkv": {"config": {"_target_": "avkv.methods.criticalkv.CriticalKV", "scorer": {
         "_target_": "avkv.methods.expected_attention.ExpectedAttention", "vnorm": False}}},
     "compare": "kept+logits", "note": "kvpress's recommended pairing (no value norm in the scorer)"},
    {"id": "criticaladakv_cur", "press": "CriticalAdaKVPress",
     "kwargs": {"press": {"press": "CURPress", "kwargs": {}}, "alpha_safeguard": 0.2}, "ratios": [0.4, 0.6, 0.8],
     "avkv": {"config": {"_target_": "avkv.methods.criticalkv.CriticalAdaKV", "scorer": CUR,
                         "alpha_safeguard": 0.2}},
     "compare": "kept+logits", "note": "safeguard, global head budgets, two stages per head"},
    {"id": "block_cur", "press": "BlockPress", "kwargs": {"press": CUR_FREE, "block_size": 64},
     "ratios": [0.4, 0.6, 0.8], "avkv": {"config": {"_target_": "avkv.methods.block.Block", "block": 64, "scorer": CUR_FREE_AVKV}},
     "compare": "kept+logits", "note": "blocks of 64 through an order-free CUR"},
    {"id": "chunk_cur", "press": "ChunkPress", "kwargs": {"press": {"press": "CURPress", "kwargs": {}},
                                                          "chunk_length": 100},
     "ratios": [0.5, 0.6], "avkv": {"config": {"_target_": "avkv.methods.chunk.Chunk", "chunk": 100, "scorer": CUR}},
     "compare": "kept+logits", "note": "CUR inside chunks of 100 (ratios where the per-chunk counts are whole)"},
    {"id": "composed_cur_cur", "press": "ComposedPress",
     "kwargs": {"presses": [{"press": "CURPress", "kwargs": {}}, CUR_FREE]}, "ratios": [0.5],
     "avkv_n_kept_from_reference": True,
     "avkv": {"config": {"_target_": "avkv.methods.composed.Composed", "keep": [0.5],
                         "methods": [CUR, CUR_FREE_AVKV]}},
     "compare": "kept+logits", "note": "each stage at ratio 0.5 (150 then 75 kept); avkv's keep=[0.5] says the same"},
    {"id": "per_layer_cur", "press": "PerLayerCompressionPress",
     "kwargs": {"press": {"press": "CURPress", "kwargs": {}}, "compression_ratios": [0.3, 0.7]},
     "ratio_fixed_by_press": True, "ratios": [0.0],
     "avkv": {"config": {"_target_": "avkv.methods.per_layer_compression.PerLayerCompression",
                         "ratios": [0.3, 0.7], "scorer": CUR}},
     "compare": "kept", "note": "layer 0 keeps 210, layer 1 keeps 90; layers of different lengths, where kvpress's "
                                "SDPA probe is not defined (its warning: flash attention only), so kept sets only"},
    {"id": "kvzip", "press": "KVzipPress", "kwargs": {}, "ratios": [0.5, 0.8], "avkv_n_kept_mean_from_reference": True,
     "avkv": {"method": "kvzip", "overrides": {}}, "compare": "kept+logits",
     "note": "context reconstruction (one chunk: 32 template-prefix entries skipped, 268 repeated), max attention "
             "per KV head, 4 sinks, one top-k over both layers and all heads"},
    {"id": "kvzip_chunk100", "press": "KVzipPress", "kwargs": {"chunk_size": 100}, "ratios": [0.5, 0.8],
     "avkv_n_kept_mean_from_reference": True, "avkv": {"method": "kvzip", "overrides": {"chunk": 100}},
     "compare": "kept+logits", "note": "three reconstruction chunks (100, 100, 68), later ones prompted with the "
                                       "previous chunk's last 8 ids"},
    {"id": "kvzip_layerwise", "press": "KVzipPress", "kwargs": {"layerwise": True}, "ratios": [0.5, 0.8],
     "avkv_n_kept_mean_from_reference": True, "avkv": {"method": "kvzip", "overrides": {"layerwise": True}},
     "compare": "kept+logits", "note": "one top-k per layer over its heads"},
    {"id": "kvzip_plus", "press": "KVzipPress", "kwargs": {"kvzip_plus_normalization": True}, "ratios": [0.5, 0.8],
     "avkv_n_kept_mean_from_reference": True,
     "avkv": {"method": "kvzip", "overrides": {"plus_normalization": True}}, "compare": "kept+logits",
     "note": "KVzip+: weights / ‖h‖ · ‖v W_o‖"},
    {"id": "key_rerotation_cur", "press": "KeyRerotationPress", "kwargs": {"press": {"press": "CURPress", "kwargs": {}}},
     "ratios": [0.5, 0.8],
     "avkv": {"config": {"_target_": "avkv.methods.key_rerotation.KeyRerotation", "scorer": CUR,
                         "continue_at": "original"}},
     "compare": "logits", "note": "re-rotated keys; the probe at the original position n as the reference runs it"},
]
