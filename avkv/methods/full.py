"""Full cache: no compression. The reference every other method is compared against."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from avkv.methods.base import LayerView, Method, Selection


@dataclass
class Full(Method):
    """Keeps every prompt entry (``budget`` is ignored). The engine installs no hooks for it."""

    name = "full"
    uses_budget = False                # one run directory whatever the budget

    def is_noop(self) -> bool:
        return True

    def compress(self, view: LayerView) -> Selection:
        S = view.seq_len
        return Selection(indices=torch.arange(S, device=view.keys.device).expand(view.num_kv_heads, S))
