"""AdaKV (Feng et al., 2024, arXiv 2407.11550): head-adaptive budgets on top of SnapKV scores."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from avkv.methods.allocation import HeadAllocation
from avkv.methods.base import ScoreMethod
from avkv.methods.snapkv import SnapKV


@dataclass
class AdaKV(HeadAllocation):
    """Ada-SnapKV: the KV heads of a layer compete for the layer's budget through a global top-k of their
    SnapKV scores, with a floor so no head starves.

    Parameters
    ----------
    scorer : ScoreMethod
        SnapKV with w=32, kernel 7, max pooling, mean over window rows (AdaKV's code defaults).
    floor : float
        α: each head keeps at least α·(B − w) prefix entries; 0.2 as KVCache-Factory (the AdaKV README example
        uses 0.5).

    Reference: the AdaKV code (``FFY0/AdaKV``, Ada-SnapKV) for the allocation; the scores are SnapKV's, pooled as
    the SnapKV code and kvpress pool them (prefix only, zero padding counted). The parity suite measures it against
    kvpress 0.5.5 ``AdaKVPress(SnapKVPress)``, whose safeguard counts the window (``docs/methods.md``).

    Heads end up with different counts. The selection is padded to the longest head with a ``valid`` mask, so
    the stored cache is [kvH, max_h count, D]: the record reports the logical kept ratio (valid entries) and
    the bytes actually allocated (padding included). FlashAttention-2 cannot take the per-head mask; the
    reference implementation uses a flattened varlen cache instead. Runs under SDPA and eager.
    """

    name = "adakv"
    kvpress: ClassVar[str | None] = "AdaKVPress"
    scorer: ScoreMethod = field(default_factory=SnapKV)
    floor: float = 0.2
