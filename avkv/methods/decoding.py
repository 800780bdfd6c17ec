"""Decoding-time compression (kvpress 0.5.5 ``DecodingPress`` / ``PrefillDecodingPress``): besides the prefill,
compress the growing cache back to its size every ``interval`` decode steps."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import ClassVar

import torch

from avkv.methods.allocation import Wrapper
from avkv.methods.base import LayerView, ScoreMethod, Selection
from avkv.methods.request import PrefillPlan, Request
from avkv.methods.snapkv import SnapKV


@dataclass
class Decoding(Wrapper):
    """The scorer compresses the prefill to the budget; during decoding the cache grows for ``interval`` steps and
    is then compressed back to the size it had after the prefill (a saw-tooth around the budget), the scorer
    seeing the queries of the decode tokens since the last compression.

    Parameters
    ----------
    scorer : ScoreMethod
        SnapKV by default (its window queries are the buffered decode queries). Scorers that read positions or the
        modality (ExpectedAttention, FINCH) are not meaningful during decoding.
    interval : int
        Decode steps between compressions (``compression_interval``, 512).
    buffer : int
        Decode queries kept for the scorer (``hidden_states_buffer_size``, 256); the buffer is emptied at each
        compression, as kvpress does. Both ``interval`` and ``buffer`` must cover the scorer's window (kvpress
        silently uses a shorter window).

    Differences from kvpress: ``DecodingPress`` alone leaves the prefill uncompressed and holds an absolute
    ``target_size``; here the run's budget sets both the prefill and the decode size (kvpress's
    ``PrefillDecodingPress`` with the same target). The record's budget is the one after the prefill; between
    compressions the cache holds up to ``interval`` more entries per head.
    """

    name = "decoding"
    kvpress: ClassVar[str | None] = "DecodingPress"
    scorer: ScoreMethod = field(default_factory=SnapKV)
    interval: int = 512
    buffer: int = 256

    def __post_init__(self) -> None:
        if self.interval < 1:
            raise ValueError(f"interval must be >= 1, got {self.interval}")
        w = getattr(self.scorer, "window", 0) or 0
        if w > min(self.interval, self.buffer):
            raise ValueError(f"decoding: the scorer's window ({w}) needs that many buffered decode queries, but "
                             f"interval={self.interval} and buffer={self.buffer}")
        self._steps: dict[int, int] = {}
        self._queries: dict[int, list[torch.Tensor]] = {}

    @property
    def decode_policy(self) -> str:  # type: ignore[override]
        return "fixed"

    def begin(self, request: Request) -> PrefillPlan | None:
        self._steps, self._queries = {}, {}
        return super().begin(request)

    def compress(self, view: LayerView) -> Selection:
        return self.scorer.compress(view)

    def decode_step(self, view: LayerView) -> Selection | None:
        i = view.layer_idx
        buf = self._queries.setdefault(i, [])
        buf.append(view.queries(view.seq_len - 1, view.seq_len))
        if self.buffer > 0:
            del buf[: max(0, len(buf) - self.buffer)]
        else:
            buf.clear()
        self._steps[i] = self._steps.get(i, 0) + 1
        if self._steps[i] < self.interval or view.seq_len <= view.n_keep:
            return None
        q = torch.cat(buf, dim=1) if buf else None
        S = view.seq_len

        def query_fn(a: int, b: int) -> torch.Tensor:
            if q is None or b != S or b - a > q.shape[1]:
                raise RuntimeError(f"decoding: only the last {0 if q is None else q.shape[1]} decode queries are "
                                   "buffered")
            return q[:, q.shape[1] - (b - a):]
        sel = self.scorer.compress(replace(view, query_fn=query_fn))
        self._steps[i], self._queries[i] = 0, []
        return sel
