"""Composition of methods (kvpress 0.5.5 ``ComposedPress``): each stage compresses what the previous one kept."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import ClassVar, Sequence

import torch

from avkv.methods.base import LayerView, Method, Selection, sub_view
from avkv.methods.request import PrefillPlan, Request, one_plan


def _trailing_run(indices: torch.Tensor, S: int) -> int:
    """How many of the last entries of every row of ``indices`` [R, k] (sorted) are the last positions of [0, S)."""
    k = indices.shape[1]
    tail = torch.arange(S - k, S, device=indices.device)
    same = (indices == tail[None]).all(0)                                          # [k]
    run = 0
    for ok in reversed(same.tolist()):
        if not ok:
            break
        run += 1
    return run


@dataclass
class Composed(Method):
    """Apply ``methods`` one after the other on the same layer: stage i sees the entries stage i−1 kept.

    Parameters
    ----------
    methods : list of Method
        The stages, first to last. Every stage but the last must keep the same count on every KV head.
    keep : list of float, optional
        Fraction of the layer's entries each stage but the last keeps (the last keeps the budget); by default
        the stages share the reduction geometrically (each keeps (n_keep/S)^(1/m) of what it sees).

    kvpress composes presses that each hold their own compression ratio (the total is the product); here the run
    has one budget and ``keep`` says how the stages share it, so a composition holds the budget. Later stages see
    queries only for the last entries that every earlier stage kept in place (e.g. a protected window); a
    query-based scorer after a stage that dropped part of the window fails loudly.
    """

    name = "composed"
    kvpress: ClassVar[str | None] = "ComposedPress"
    methods: Sequence[Method] = field(default_factory=list)
    keep: Sequence[float] | None = None

    def __post_init__(self) -> None:
        from omegaconf import OmegaConf
        # Hydra keeps instantiated dataclasses inside a list as structured configs: turn them back into methods
        self.methods = [OmegaConf.to_object(m) if OmegaConf.is_config(m) else m for m in self.methods]
        if self.keep is not None:
            self.keep = [float(x) for x in self.keep]
        if len(self.methods) < 1:
            raise ValueError("composed needs at least one method")
        if self.keep is not None:
            if len(self.keep) != len(self.methods) - 1 or any(not 0 < float(x) <= 1 for x in self.keep):
                raise ValueError(f"keep needs {len(self.methods) - 1} fractions in (0, 1], got {list(self.keep)}")
        if any(m.deferred for m in self.methods):
            raise ValueError("composed cannot hold a deferred (cross-layer) method")

    @property
    def requires_attentions(self) -> bool:  # type: ignore[override]
        return any(m.requires_attentions for m in self.methods)

    @property
    def prunes_hidden_states(self) -> bool:  # type: ignore[override]
        return any(m.prunes_hidden_states for m in self.methods)

    @property
    def prefill_attention(self) -> bool:  # type: ignore[override]
        return any(m.prefill_attention for m in self.methods)

    def begin(self, request: Request) -> PrefillPlan | None:
        return one_plan([m.begin(request) for m in self.methods], self.name)

    def end(self) -> None:
        for m in self.methods:
            m.end()

    def _targets(self, S: int, n_keep: int) -> list[int]:
        m = len(self.methods)
        if self.keep is None:
            fr = [(n_keep / S) ** ((i + 1) / m) for i in range(m - 1)]
        else:
            fr = [float(x) for x in self.keep]
        out, prev = [], S
        for f in fr:
            prev = max(n_keep, min(prev, int(round(f * S))))
            out.append(prev)
        return out + [n_keep]

    def compress(self, view: LayerView) -> Selection:
        S = view.seq_len
        n_keep = max(1, min(view.n_keep, S))
        D = view.keys.shape[-1]
        idx = torch.arange(S, device=view.keys.device).expand(view.num_kv_heads, S)
        K, V, rewritten, valid, info = view.keys, view.values, False, None, {}
        for i, (method, target) in enumerate(zip(self.methods, self._targets(S, n_keep))):
            if i == 0:
                cur = replace(view, n_keep=target)
            else:
                run, Sc = _trailing_run(idx, S), idx.shape[1]

                def qf(a: int, b: int, run=run, Sc=Sc, i=i) -> torch.Tensor:
                    if b != Sc or b - a > run:
                        raise RuntimeError(f"composed stage {i}: queries exist only for the last {run} entries, "
                                           "the ones every earlier stage kept in place")
                    return view.query_fn(S - (b - a), S)
                cur = replace(sub_view(view, idx, target, query_fn=qf), keys=K, values=V,
                              value_norm_fn=lambda V=V: V.float().norm(dim=-1))
            sel = method.compress(cur)
            if sel.valid is not None and i < len(self.methods) - 1:
                raise TypeError(f"composed stage {i} ({method.name}) keeps different counts per head; only the "
                                "last stage may")
            g = sel.indices.to(idx.device)
            gd = g[..., None].expand(-1, -1, D)
            K = sel.keys if sel.keys is not None else K.gather(1, gd)
            V = sel.values if sel.values is not None else V.gather(1, gd)
            rewritten |= sel.keys is not None or sel.values is not None
            idx, valid = idx.gather(1, g), sel.valid
            info.update({f"{method.name}.{k}": v for k, v in sel.info.items()})
        return Selection(indices=idx, keys=K if rewritten else None, values=V if rewritten else None, valid=valid,
                         info=info)
