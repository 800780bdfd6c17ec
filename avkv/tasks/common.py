"""Helpers shared by the task modules: MC options, MC scoring and aggregation with breakdowns."""
from __future__ import annotations

from collections import defaultdict
from typing import Iterable, Sequence

from avkv.metrics.text import extract_choice, option_letters, render_options
from avkv.tasks.base import is_failed, record_field


def mc_fields(question: str, choices: Sequence[str]) -> dict:
    """The placeholders a multiple-choice prompt template may use: ``{question}`` and ``{options}`` (the choices
    as ``(A) red`` lines)."""
    return {"question": question, "options": render_options(choices, "paren")}


def mc_score(prediction: str | None, choices: Sequence[str], target: int) -> dict:
    idx = extract_choice(prediction, choices)
    keys = option_letters(len(choices))
    return {"score": float(idx is not None and idx == target), "parsed_ok": idx is not None,
            "parsed": keys[idx] if idx is not None else None, "target_letter": keys[target]}


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def aggregate_with_breakdowns(records: list[dict], metric: str, breakdowns: Iterable[str] = (),
                              value_key: str = "score", task=None) -> dict:
    """Mean of ``value_key`` over scored records (unparsed ones count as scored 0), plus per-key breakdowns.

    Failed samples (``error`` set: a missing or corrupt media file, ...) are left out of the means and counted
    in ``n_failed`` (and in their group's ``n_by_*`` when ``task`` remembers their keys); unparseable outputs are
    counted in ``n_unparsed`` (and scored 0 by the task).
    """
    ok = [r for r in records if not is_failed(r) and r.get(value_key) is not None]
    out: dict = {metric: _mean([float(r[value_key]) for r in ok]), "n": len(records),
                 "n_scored": len(ok), "n_failed": sum(1 for r in records if is_failed(r)),
                 "n_unparsed": sum(1 for r in records if not is_failed(r) and r.get("parsed_ok") is False)}
    ok_ids = {id(r) for r in ok}
    for key in breakdowns:
        groups: dict[str, list[float]] = defaultdict(list)
        counts: dict[str, int] = defaultdict(int)
        for r in records:
            g = task.field(r, key) if task is not None else record_field(r, key)
            g = "unknown" if g is None else str(g)
            counts[g] += 1
            if id(r) in ok_ids:
                groups[g].append(float(r[value_key]))
        out[f"{metric}_by_{key}"] = {g: _mean(groups.get(g, [])) for g in sorted(counts)}
        out[f"n_by_{key}"] = dict(sorted(counts.items()))
    return out
