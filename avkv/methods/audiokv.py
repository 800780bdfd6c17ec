"""AudioKV (arXiv 2604.06694): audio-critical heads + Spectral Score Smoothing (SSS).

Specification: ``shared/design/methods.md`` §5 (allocation equation and section structure [paper]; details [2nd]).

From the paper [paper/2nd]:
  * audio-critical heads are found offline on ASR data from how often a head's attention lands on the audio span of
    the word being transcribed; the head scores S_{l,h} are computed once per model (``scripts/calibrate_audiokv.py``
    writes them to a head-score file);
  * head-wise budgets b_{l,h} = w + r + B_score · S_{l,h} / Σ S, with B_score the pool left after the window w and
    the uniform base share r;
  * SSS: an FFT low-pass of the per-token score sequence with an energy-based cutoff (γ) and residual mixing (α):
    s' = α·lowpass(s) + (1−α)·s, plugged into a score-based eviction method.

Our reading [ours] (each a field):
  * w = ``window`` = 32, r = ``r_frac``·(B − w) with r_frac = 0.5, B_score = L·H_kv·(B − w − r) so the budgets sum to
    L·H_kv·B; integer budgets by the harness's apportioner (:func:`~avkv.methods.counts.apportion`: largest
    remainder, each within [w, n], the excess shared among the other heads);
  * token scores: SnapKV window scores (mean over the window queries, GQA mean), SSS instead of pooling;
  * SSS on the audio positions only (``sss_scope='audio'``; concatenated in order when the audio is interleaved with
    video), per head; DC excluded from the energy; α = 0.5, γ = 0.9 (values not published);
  * head scores per KV head (mean of the query heads of the group) from the file; a file made for another
    architecture (layer / head counts) is refused;
  * ``head_scores=None``: at :meth:`begin` the file is looked up as ``<head_scores_dir>/<model folder name>.json``
    (config default ``${paths.cache}/audiokv``, where ``scripts/calibrate_audiokv.py`` writes), then as
    ``<model folder>/audiokv_head_scores.json``; checkpoint folders may be read-only and tiny ones are rebuilt, so
    the scores live apart from them; ``allocation='uniform'`` runs SnapKV+SSS without a file.

Per-head counts differ, so the selection is ragged (padded indices + ``valid``); the record carries the per-head
budgets of each layer.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from avkv.methods.base import check_choice
from avkv.methods.base import AUDIO, LayerView, Method, Selection, reduce_gqa, window_scores
from avkv.methods.counts import apportion, ragged_topk
from avkv.methods.request import Request

HEAD_SCORE_FILENAME = "audiokv_head_scores.json"


def spectral_smooth(s: torch.Tensor, alpha: float = 0.5, gamma: float = 0.9) -> torch.Tensor:
    """Spectral Score Smoothing of score sequences ``s`` [..., n] along the last axis.

    z = rfft(s − mean); cutoff k_c = the smallest k ≥ 1 whose cumulated energy Σ_{1≤i≤k}|z_i|² reaches γ of the
    total (DC excluded); frequencies above k_c are zeroed; s_low = irfft(z) + mean; returns α·s_low + (1−α)·s.
    """
    n = s.shape[-1]
    if n < 3:
        return s
    x = s.double()
    mean = x.mean(-1, keepdim=True)
    z = torch.fft.rfft(x - mean, dim=-1)
    e = z.abs() ** 2
    e[..., 0] = 0
    tot = e.sum(-1, keepdim=True)
    cum = e.cumsum(-1)
    kc = (cum < gamma * tot).sum(-1, keepdim=True)                      # index of the first k reaching γ·total
    kc = kc.clamp(min=1)
    k = torch.arange(z.shape[-1], device=s.device)
    z = torch.where(k <= kc, z, torch.zeros_like(z))
    low = torch.fft.irfft(z, n=n, dim=-1) + mean
    low = torch.where(tot > 0, low, x)
    return (alpha * low + (1 - alpha) * x).to(s.dtype)


def load_head_scores(path: str | Path) -> dict:
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"AudioKV head-score file not found: {p}. Make it with "
                                "`python scripts/calibrate_audiokv.py --model <model config> ...` "
                                "(or set method.allocation=uniform)")
    d = json.loads(p.read_text())
    for key in ("scores", "num_layers", "num_heads", "num_kv_heads"):
        if key not in d:
            raise ValueError(f"{p}: head-score file lacks {key!r}")
    return d


def kv_head_scores(scores: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[L, H] query-head scores → [L, H_kv] by the mean within each GQA group."""
    L, H = scores.shape
    return scores.view(L, num_kv_heads, H // num_kv_heads).mean(-1)


def head_budgets(S: torch.Tensor, B: int, n: int, window: int, r_frac: float) -> torch.Tensor:
    """b_{l,h} = w + r + B_score · S_{l,h}/ΣS as integers summing to L·H_kv·B (within [w, n])."""
    L, Hk = S.shape
    B = min(B, n)
    w = min(window, B)
    r = r_frac * (B - w)
    total = L * Hk * B
    base = w + r
    pool = total - L * Hk * base                                        # = B_score
    weights = S.double().clamp_min(0)
    if float(weights.sum()) <= 0:
        weights = torch.ones_like(weights)
    real = base + pool * weights / weights.sum()
    return apportion(real, total, lo=w, hi=n)


@dataclass
class AudioKV(Method):
    """Head-wise budgets from offline audio-critical head scores + SnapKV scores smoothed by SSS.

    Reference: spec only (``shared/design/methods.md`` §5). Its token scores are SnapKV's window attention with SSS
    in place of pooling (the paper's choice; over the audio positions, or the prefix before the window with
    ``sss_scope=all``), so SnapKV's pooling fix (issue 13) does not change it.

    Parameters
    ----------
    window : int
        Observation window w (always kept, counts toward every head's budget) (32) [ours].
    r_frac : float
        Uniform base share r = r_frac·(B − w) (0.5) [ours].
    allocation : str
        ``head`` (from the head-score file) or ``uniform`` (every head B; SSS only).
    head_scores : str | None
        Path of the head-score JSON; None = look it up for the request's model (see ``head_scores_dir``).
    head_scores_dir : str | None
        Folder of per-model head-score files ``<model folder name>.json`` (config: ``${paths.cache}/audiokv``).
    sss : bool
        Spectral Score Smoothing on.
    alpha : float
        Residual mixing (0.5) [ours].
    gamma : float
        Energy kept by the cutoff (0.9) [ours].
    sss_scope : str
        ``audio`` (audio positions only) [ours] or ``all`` (the whole prefix).
    gqa : str
        Reduction of query-head scores within a KV group (``mean``).
    """

    name = "audiokv"
    ragged_heads: ClassVar[bool] = True           # its heads keep different counts
    window: int = 32
    r_frac: float = 0.5
    allocation: str = "head"
    head_scores: str | None = None
    head_scores_dir: str | None = None
    sss: bool = True
    alpha: float = 0.5
    gamma: float = 0.9
    sss_scope: str = "audio"
    gqa: str = "mean"

    _scores: dict | None = field(default=None, init=False, repr=False, compare=False)
    _scores_path: str | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_choice("allocation", self.allocation, ("head", "uniform"))
        check_choice("sss_scope", self.sss_scope, ("audio", "all"))
        if self.allocation == "head" and self.head_scores:
            self._load(self.head_scores)

    def _load(self, path) -> None:
        if self._scores_path != str(path):
            self._scores, self._scores_path = load_head_scores(path), str(path)

    def candidates(self, model_path: str | Path) -> list[Path]:
        """Where the head scores of the model in ``model_path`` are looked up, in order."""
        mp = Path(model_path)
        out = [Path(self.head_scores_dir).expanduser() / f"{mp.name}.json"] if self.head_scores_dir else []
        return out + [mp / HEAD_SCORE_FILENAME]

    def begin(self, request: Request) -> None:
        if self.allocation != "head" or self.head_scores:
            return
        mp = request.model_path
        if mp is None:
            raise ValueError("AudioKV: no head_scores given and the request names no model folder to find the "
                             "head scores for; pass method.head_scores=<file> or allocation=uniform")
        tried = self.candidates(mp)
        found = next((p for p in tried if p.exists()), None)
        if found is None:
            raise FileNotFoundError("AudioKV head-score file not found (tried " + ", ".join(map(str, tried)) +
                                    "). Make it with `python scripts/calibrate_audiokv.py --model <model config> "
                                    "...` (or set method.allocation=uniform)")
        self._load(found)

    # ------------------------------------------------------------------ pieces
    def token_scores(self, view: LayerView) -> torch.Tensor:
        """SnapKV window scores per KV head [kvH, S], SSS-smoothed over the audio span."""
        s = reduce_gqa(window_scores(view, self.window, reduce="mean"), view.num_kv_heads, self.gqa)
        if not self.sss:
            return s
        S = view.seq_len
        if self.sss_scope == "all":
            span = torch.arange(S - min(self.window, S), device=s.device)
        else:
            span = (view.modality.to(s.device) == AUDIO).nonzero().flatten()
        if span.numel() >= 3:
            s = s.clone()
            s[:, span] = spectral_smooth(s[:, span], self.alpha, self.gamma)
        return s

    def layer_budgets(self, view: LayerView) -> torch.Tensor:
        """Per-KV-head budgets of this layer [kvH] (computed once per request for all layers)."""
        Hk, L, S = view.num_kv_heads, view.num_layers, view.seq_len
        if self.allocation == "uniform":
            return torch.full((Hk,), max(1, min(view.n_keep, S)), dtype=torch.long)
        if self._scores is None:
            raise RuntimeError("AudioKV: head scores not loaded (begin() was not called with the model, and "
                               "no head_scores path was given)")
        st = view.scratch(self)
        key = (S, view.n_keep)
        if st.get("key") != key:
            d = self._scores
            if int(d["num_layers"]) != L or int(d["num_kv_heads"]) != Hk or int(d["num_heads"]) != view.num_heads:
                raise ValueError(f"AudioKV head scores {self._scores_path} are for L={d['num_layers']}, "
                                 f"H={d['num_heads']}, H_kv={d['num_kv_heads']}; this model has L={L}, "
                                 f"H={view.num_heads}, H_kv={Hk}")
            sc = kv_head_scores(torch.tensor(d["scores"], dtype=torch.float64), Hk)
            st["budgets"] = head_budgets(sc, view.n_keep, S, self.window, self.r_frac)
            st["key"] = key
        return st["budgets"][view.layer_idx]

    def compress(self, view: LayerView) -> Selection:
        s = self.token_scores(view)
        b = self.layer_budgets(view)
        idx, valid = ragged_topk(s, b, protect_last=self.window)
        return Selection(indices=idx, valid=valid, info={"head_budgets": b.tolist()})


# ------------------------------------------------------------------------------------ offline head scoring
# Used by scripts/calibrate_audiokv.py; kept here (model-free) so the scoring is unit-tested on synthetic attention.
def normalize_word(w: str) -> str:
    return "".join(ch for ch in w.lower() if ch.isalnum() or ch == "'")


def word_audio_span(t_start: float, t_end: float, delta: float, n_audio: int) -> tuple[int, int]:
    """Word time span [t_s, t_e] (s) → audio-token index span [⌊t_s/Δ⌋, ⌈t_e/Δ⌉] clipped to the audio tokens."""
    import math
    lo = max(0, min(n_audio - 1, int(math.floor(t_start / delta))))
    hi = max(lo, min(n_audio - 1, int(math.ceil(t_end / delta))))
    return lo, hi


def proportional_word_times(words: list[str], start: float, end: float) -> list[tuple[float, float]]:
    """Fallback word timing [ours] when no aligner output exists: the speech interval [start, end] split in
    proportion to each word's character count (plus one for the gap). Marked as approximate in the file."""
    lens = [len(w) + 1 for w in words]
    tot = float(sum(lens)) or 1.0
    out, t = [], start
    for n in lens:
        d = (end - start) * n / tot
        out.append((t, t + d))
        t += d
    return out


def step_word_index(prefix_texts: list[str]) -> list[int]:
    """For each generation step t, the index of the generated word its token belongs to, from the decoded text of
    tokens[:t+1]; -1 for a step that adds no alphanumeric character (whitespace, punctuation)."""
    res, prev = [], ""
    for text in prefix_texts:
        added = text[len(prev):] if text.startswith(prev) else text
        words = [w for w in (normalize_word(x) for x in text.split()) if w]
        res.append(len(words) - 1 if words and any(ch.isalnum() for ch in added) else -1)
        prev = text
    return res


def align_words(generated: list[str], reference: list[str]) -> dict[int, int]:
    """Generated word index → reference word index for words that match after normalisation (difflib)."""
    import difflib
    g = [normalize_word(w) for w in generated]
    r = [normalize_word(w) for w in reference]
    sm = difflib.SequenceMatcher(a=g, b=r, autojunk=False)
    out = {}
    for blk in sm.get_matching_blocks():
        for k in range(blk.size):
            out[blk.a + k] = blk.b + k
    return out


class HeadHitCounter:
    """Accumulates audio-span hits per (layer, query head): a step hits when the argmax of the head's attention
    restricted to the audio tokens lies within the current word's span ± ``tolerance`` (top-1 rule [ours])."""

    def __init__(self, num_layers: int, num_heads: int, tolerance: int = 1) -> None:
        self.hits = torch.zeros(num_layers, num_heads, dtype=torch.float64)
        self.steps = 0
        self.tolerance = tolerance

    def add(self, audio_attn: torch.Tensor, span: tuple[int, int]) -> None:
        """``audio_attn`` [L, H, n_audio]: one generation step's attention over the audio tokens."""
        am = audio_attn.argmax(-1)
        lo, hi = span[0] - self.tolerance, span[1] + self.tolerance
        self.hits += ((am >= lo) & (am <= hi)).to(torch.float64).cpu()
        self.steps += 1

    def scores(self) -> torch.Tensor:
        return self.hits / max(self.steps, 1)
