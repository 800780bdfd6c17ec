"""The keep-ledger of one sample: what each layer kept, and the sample's accounting record written from it.

The compressor enters every applied selection (:meth:`KeepLedger.keep`): kept entries per head, per modality, the
selection's ``info`` and ``record`` fields, the storage it produced, and the re-rotation shift. After the prefill
:func:`write_record` checks the ledger against what the cache really holds (:func:`~avkv.kvstore.measure_cache`) and
writes the record: entries per layer and head, bytes, kept share per modality and the budget conformance —
``budget_target``, ``budget_achieved`` (fraction of the full cache's bytes held), ``budget_held`` (entries and bytes
within ±1 % of the budget, one entry per layer and head of rounding aside, :func:`~avkv.kvstore.within_budget`) and
the method's declaration ``budget_mode`` (``held``, or ``achieved`` with a ``budget_reason``); a method that misses
the budget it claims to hold is logged once.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from avkv.kvstore import CompressionError, layer_capacity, within_budget
from avkv.methods.base import MODALITIES, Method, Selection, as_record, warn_once


@dataclass
class KeepLedger:
    n_prompt: int
    split: int
    kept: dict = field(default_factory=dict)        # layer -> [kvH] kept prompt-chunk entries
    mod_kept: dict = field(default_factory=dict)    # layer -> {modality: count summed over heads}
    info: dict = field(default_factory=dict)        # layer -> Selection.info
    record: dict = field(default_factory=dict)      # fields of the sample record (plan, selections, pattern)
    shifts: dict = field(default_factory=dict)      # layer -> Selection.position_shift
    positions: dict = field(default_factory=dict)   # layer -> chunk positions its cache holds (hidden pruning)
    decode_size: dict = field(default_factory=dict)  # layer -> cache size a fixed decode policy holds
    ragged: bool = False                            # some layer is stored per head (RaggedLayer)
    compress_s: float = 0.0

    def keep(self, i: int, idx: torch.Tensor, valid: torch.Tensor | None, modality: torch.Tensor, sel: Selection,
             storage: str) -> None:
        """Enter layer ``i``'s applied prefill selection (indices ``idx`` [kvH, k], validity ``valid``)."""
        kvH = idx.shape[0]
        counts = valid.sum(-1) if valid is not None else torch.full((kvH,), idx.shape[1])
        self.kept[i] = counts.tolist()
        m = modality[idx] if valid is None else modality[idx][valid]
        self.mod_kept[i] = {name: int((m == c).sum()) for c, name in enumerate(MODALITIES)}
        if sel.info:
            self.info[i] = as_record(sel.info)
        if sel.record:
            self.record.update(as_record(sel.record))
        if sel.position_shift is not None:
            self.shifts[i] = int(sel.position_shift)
        self.ragged |= storage == "ragged"
        self.decode_size[i] = idx.shape[1] + (self.n_prompt - self.split)

    def rope_shift(self) -> int:
        """How far re-rotating selections moved the positions: the suffix and the decoded tokens move by as much,
        so they follow the re-rotated keys. Every layer must agree."""
        if not self.shifts:
            return 0
        values = set(self.shifts.values())
        if len(values) != 1 or len(self.shifts) != len(self.kept):
            raise CompressionError(f"re-rotated layers moved their positions by different amounts {sorted(values)}: "
                                   "key re-rotation needs the same kept count in every layer")
        return int(values.pop())


def write_record(ledger: KeepLedger | None, enc: Any, cache: Any, held: tuple, *, n: int, s: int, method: Method,
                 compress_at: str, target_kept: int, num_heads: int, mask_only: bool) -> dict:
    """The sample's accounting, from what the cache really holds after the prefill (``held``, see
    :func:`~avkv.kvstore.measure_cache`) checked against the ledger (None: nothing was compressed)."""
    entries, nbytes = held
    compressed = ledger is not None
    owners = [i for i, e in enumerate(entries) if e is not None]   # layers that hold a cache (KV-shared ones don't)
    if not owners:
        raise CompressionError("no cache layer holds keys")
    L = len(owners)
    first = cache.layers[owners[0]]
    kvH = len(entries[owners[0]])
    D, el = first.keys.shape[-1], first.keys.element_size()
    cap = [layer_capacity(cache.layers[i], n) for i in owners]       # entries per head held uncompressed
    kv_full = 2 * kvH * sum(cap) * D * el
    kv_kept = sum(nbytes)
    suffix = n - s
    per_layer = [sum(entries[i]) / kvH for i in owners]
    total = {name: int((enc.modality == c).sum()) for c, name in enumerate(MODALITIES)}
    if ledger is not None and ledger.kept:
        for i, counts in ledger.kept.items():          # what the method selected = what the cache holds
            if [c + suffix for c in counts] != entries[i]:
                raise CompressionError(f"layer {i}: the method kept {counts} (+{suffix} suffix) entries per "
                                       f"head but the cache holds {entries[i]}")
    suffix_mod = {name: int((enc.modality[s:] == c).sum()) for c, name in enumerate(MODALITIES)}
    by_mod = {}
    for c, m in enumerate(MODALITIES):
        if not total[m]:
            continue
        # per owning layer: what the method kept of m (+ the suffix's), or, uncompressed, the m entries among the
        # last cap positions it holds (all n but for a sliding-window layer)
        kept = [ledger.mod_kept[i][m] / kvH + suffix_mod[m] if ledger is not None and i in ledger.mod_kept
                else int((enc.modality[n - k:] == c).sum()) for i, k in zip(owners, cap)]
        by_mod[m] = {"kept": sum(kept) / L, "total": total[m]}
    for v in by_mod.values():
        v["ratio"] = v["kept"] / v["total"]
    rec = {
        "n_prompt": n, "split": s, "compress_at": compress_at, "compressed": compressed,
        "kv_bytes_full": kv_full, "kv_bytes_kept": kv_kept, "kv_bytes_ratio": kv_kept / kv_full,
        "kept_ratio": sum(per_layer) / sum(cap), "kept_by_modality": by_mod,
        "kept_per_layer": per_layer, "decode_policy": method.decode_policy,
        "modalities_used": enc.modalities_used, "input_notes": enc.notes, "layers": L, "kv_heads": kvH,
        "num_heads": num_heads,
        "kv_storage": "masked" if mask_only and compressed else
                      "ragged" if ledger is not None and ledger.ragged else "dense",
    }
    if enc.preprocessing:
        rec["preprocessing"] = enc.preprocessing          # what the model was fed (frames, sizes, audio s)
    if any(len(set(entries[i])) > 1 for i in owners):
        rec["kept_per_head"] = [[c - suffix for c in entries[i]] for i in owners]
    if ledger is not None and ledger.info:
        rec["method_info"] = {str(k): v for k, v in sorted(ledger.info.items())}
    if ledger is not None and ledger.record:
        rec.update(as_record(ledger.record))
    if L != len(entries) or any(k != n for k in cap):    # cache layers that hold other than n entries each
        rec.update(cache_layers=owners, capacity_per_layer=cap)
    # the budget's target: each layer keeps min(target_kept, what it holds uncompressed), as a share of the whole
    rec.update(_budget(method, rec, sum(min(target_kept, k) for k in cap) / sum(cap), n, mask_only))
    return rec


def _budget(method: Method, rec: dict, target: float, n: int, mask_only: bool) -> dict:
    """Budget conformance of one sample: the target, the fraction of the full cache's bytes held, whether entries
    and bytes are both within the rule (:func:`~avkv.kvstore.within_budget`), and the method's declaration."""
    held = within_budget(rec["kept_ratio"], target, n) and within_budget(rec["kv_bytes_ratio"], target, n)
    if method.is_noop():
        mode, reason = "full", "the full cache: nothing is compressed"
    else:
        mode = getattr(method, "budget_mode", "held")
        reason = getattr(method, "budget_reason", None)
    out = {"budget_target": target, "budget_achieved": rec["kv_bytes_ratio"], "budget_held": held,
           "budget_mode": mode}
    if reason:
        out["budget_reason"] = reason
    if not held and mode == "held" and not rec.get("budget_infeasible") and not mask_only:
        warn_once(("budget", method.name, round(target, 4)),
                  "%s holds %.3f of the cache's entries and %.3f of its bytes at budget %.3f; it claims to hold "
                  "the budget (budget_mode=held): the record has budget_held=false", method.name,
                  rec["kept_ratio"], rec["kv_bytes_ratio"], target)
    return out


__all__ = ["KeepLedger", "write_record"]
