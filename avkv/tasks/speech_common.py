"""What the speech tasks share: the ASR scorer (corpus WER / CER, AudioKV's ``max(100 - x, 0)``), reading
Kaldi-style ``key value`` files, and keeping data-given media paths inside the dataset root."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from avkv.metrics.text import edit_counts
from avkv.tasks.base import DatasetError, Doc, Prompt, Task, is_failed, record_field
from avkv.tasks.prompts import PromptSet


def inside(root: Path, rel: str, file: Path, where: str, field: str) -> Path:
    """``root / rel``, refused (naming the file, item and field) when it would leave ``root``."""
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts or not rel.strip():
        raise DatasetError(f"{file}: item {where} field '{field}' = {rel!r} is not a path inside {root}")
    return root / p


def read_kv(path: Path, what: str) -> dict[str, str]:
    """``<key> <value>`` lines (Kaldi ``wav.scp`` / ``text`` / ``utt2*``) in order; duplicates are errors."""
    if not path.is_file():
        raise DatasetError(f"{what} not found: {path}")
    out: dict[str, str] = {}
    for ln, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        key, _, value = line.strip().partition(" ")
        if not value.strip():
            value = line.strip().partition("\t")[2] if "\t" in line else ""
        if not value.strip():
            raise DatasetError(f"{path}: line {ln} (item {key!r}) has no value after the key")
        if key in out:
            raise DatasetError(f"{path}: line {ln} repeats key {key!r}")
        out[key] = value.strip()
    return out


class ASRTask(Task):
    """Speech recognition: ``prompts`` from the config, corpus error rate over the normalised words
    (``cer`` for Chinese: characters), AudioKV's ``acc_100_minus_<metric>`` clipped at 0, and the error rate per
    ``breakdown`` key (e.g. KeSpeech's sub-dialect)."""

    metric = "wer"
    higher_is_better = False
    breakdown = "source"

    def __init__(self, root: str | Path, limit: int | None = None, language: str = "en",
                 prompts: Any = None, max_new_tokens: int | None = 256, **kwargs: Any) -> None:
        super().__init__(root, limit)
        self.language = language
        self.metric = "cer" if language in ("zh", "yue") else "wer"
        self.prompts = PromptSet(prompts, "dataset.prompts")
        self.max_new_tokens = int(max_new_tokens) if max_new_tokens else 256

    def prompt(self, doc: Doc, family: str) -> Prompt:
        return Prompt(context=list(doc.media), question=self.prompts.text(family, **doc.meta),
                      max_new_tokens=self.max_new_tokens)

    def score(self, doc: Doc, prediction: str) -> dict:
        errors, n = edit_counts(doc.target, prediction or "", self.language)
        return {"score": 100.0 * errors / n if n else float(errors > 0) * 100.0, "parsed_ok": True,
                "errors": errors, "ref_words": n, self.breakdown: doc.meta.get(self.breakdown)}

    def aggregate(self, records: list[dict]) -> dict:
        return asr_aggregate(self, records, self.metric, self.breakdown)


def asr_aggregate(task: Task, records: list[dict], metric: str = "wer", breakdown: str = "source") -> dict:
    """Corpus error rate (Σ edits / Σ reference words, %) over the scored records, AudioKV's
    ``acc_100_minus_<metric>`` clipped at 0, and the rate per ``breakdown`` group (failed records counted in
    ``n_by_<breakdown>`` through what the task remembered of them)."""
    ok = [r for r in records if not is_failed(r) and record_field(r, "ref_words") is not None]

    def rate(rs: list[dict]) -> float | None:
        n = sum(int(record_field(r, "ref_words")) for r in rs)
        return 100.0 * sum(int(record_field(r, "errors")) for r in rs) / n if n else None

    total = rate(ok)
    groups: dict[str, list[dict]] = {}
    n_by: dict[str, int] = {}
    ok_ids = {id(r) for r in ok}
    for r in records:
        k = str(task.field(r, breakdown))
        n_by[k] = n_by.get(k, 0) + 1
        if id(r) in ok_ids:
            groups.setdefault(k, []).append(r)
    return {metric: total, f"acc_100_minus_{metric}": None if total is None else max(100.0 - total, 0.0),
            f"{metric}_by_{breakdown}": {k: rate(groups.get(k, [])) for k in sorted(n_by)},
            f"n_by_{breakdown}": dict(sorted(n_by.items())),
            "n": len(records), "n_scored": len(ok), "n_failed": sum(1 for r in records if is_failed(r)),
            "n_unparsed": 0}
