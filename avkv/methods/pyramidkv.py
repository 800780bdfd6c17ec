"""PyramidKV (Cai et al., 2024, arXiv 2406.02069): SnapKV scores with budgets that shrink linearly with depth."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from avkv.methods.allocation import LayerAllocation
from avkv.methods.base import Method
from avkv.methods.snapkv import SnapKV


@dataclass
class PyramidKV(LayerAllocation):
    """Pyramidal information funnelling: lower layers keep more entries, higher layers fewer; the mean over
    layers is the budget. Selection inside a layer is SnapKV's (window attention, pooled, top-k per KV head).

    Parameters
    ----------
    scorer : Method
        Per-layer selection; SnapKV with w=32, kernel 7, max pooling (the AdaKV-code defaults we use for the
        whole SnapKV family, ``shared/design/methods.md`` §6). Any other method composes (e.g. H2O).
    beta : float
        The last layer keeps (B − w)/β prefix entries; 20 as in KVCache-Factory.

    Reference: the PyramidKV code (``Zefan-Cai/KVCache-Factory``) for the schedule, and SnapKV's own reference
    (SnapKV code, kvpress ``SnapKVPress``: prefix-only pooling, zero padding counted) for the scores; the parity
    suite measures it against kvpress 0.5.5 ``PyramidKVPress``, whose schedule counts the window inside
    ``n·(1−ratio)`` and falls back to uniform budgets below the window (``docs/methods.md``).

    Needs only the window queries and the keys, so it runs under SDPA. The schedule is
    :func:`~avkv.methods.allocation.pyramid_budgets` (mean exactly B; KVCache-Factory's integer flooring keeps
    slightly more). Each record carries the layer's budget as ``layer_budget``.
    """

    name = "pyramidkv"
    kvpress: ClassVar[str | None] = "PyramidKVPress"
    scorer: Method = field(default_factory=SnapKV)
    schedule: str = "pyramid"
    beta: float = 20.0
