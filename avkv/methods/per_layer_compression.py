"""Fixed per-layer compression ratios around any scorer (kvpress 0.5.5 ``PerLayerCompressionPress``)."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import ClassVar, Sequence

from avkv.methods.allocation import Wrapper
from avkv.methods.base import LayerView, ScoreMethod, Selection
from avkv.methods.snapkv import SnapKV


@dataclass
class PerLayerCompression(Wrapper):
    """Layer l keeps ``max(1, int(S·(1 − ratios[l])))`` entries (kvpress's count), selected by the scorer.

    Parameters
    ----------
    scorer : ScoreMethod
        SnapKV by default.
    ratios : list of float
        Compression ratio (fraction removed) per decoder layer, each in [0, 1): one per layer of the model, or a
        single value for every layer.

    The ratios are the configuration, so the run's budget does not apply: the method declares
    ``budget_mode=achieved`` and the record carries what it held. For per-layer budgets that follow the run's
    budget use ``LayerAllocation`` (``schedule: weights``) instead.
    """

    name = "per_layer_compression"
    kvpress: ClassVar[str | None] = "PerLayerCompressionPress"
    scorer: ScoreMethod = field(default_factory=SnapKV)
    ratios: Sequence[float] = (0.5,)

    @property
    def budget_mode(self) -> str:  # type: ignore[override]
        return "achieved"

    @property
    def budget_reason(self) -> str | None:  # type: ignore[override]
        return "per-layer compression ratios fixed by the config (kvpress PerLayerCompressionPress)"

    def __post_init__(self) -> None:
        if not self.ratios or any(not 0 <= float(r) < 1 for r in self.ratios):
            raise ValueError(f"ratios must be compression ratios in [0, 1), got {list(self.ratios)}")

    def compress(self, view: LayerView) -> Selection:
        if len(self.ratios) not in (1, view.num_layers):
            raise ValueError(f"ratios has {len(self.ratios)} entries for a model of {view.num_layers} layers")
        r = float(self.ratios[view.layer_idx if len(self.ratios) > 1 else 0])
        S = view.seq_len
        n = max(1, int(S * (1.0 - r)))
        sel = self.scorer.compress(replace(view, n_keep=n))
        sel.info.setdefault("layer_budget", n)
        return sel
