"""Control: drop every media entry of the compressed chunk and keep every text entry (the budget is ignored)."""
from __future__ import annotations

from dataclasses import dataclass

from avkv.methods.base import TEXT, LayerView, Method, Selection


@dataclass
class DropMedia(Method):
    """The leak control of a trained proxy: with no image/video/audio entry left in the cache, a model that
    answers from the media is at chance; above chance, the answer leaks through the text (question, options).

    The engine compresses only when the budget is below 1, so run it with any ``budget < 1``; the entries
    it keeps (all text) are recorded as usual (``kept_by_modality``).
    """

    name = "drop_media"
    budget_mode = "achieved"
    budget_reason = "control: drops every media entry and keeps every text entry, whatever the budget"

    def compress(self, view: LayerView) -> Selection:
        keep = (view.modality == TEXT).nonzero().flatten()
        return Selection(indices=keep.expand(view.num_kv_heads, -1))
