"""MUSIC-AVQA (Li et al., CVPR 2022): open-vocabulary audio-visual QA on music performance videos.

Official layout (github.com/GeWu-Lab/MUSIC-AVQA ``data/json_update``; videos from the project page)::

    json_update/avqa-{train,val,test}.json    list of {video_id (8-digit str), question_id, type (JSON-encoded
                                              ["Audio"|"Visual"|"Audio-Visual", "Counting"|...]),
                                              question_content (template), templ_values (JSON-encoded list),
                                              question_deleted, anser (sic: the answer)}
    videos/<video_id>.mp4

The question is filled as the official loader does (``dataloader_avst.py``: split on spaces, drop the last
character, replace each token containing ``<`` by the next ``templ_values`` entry); the final ``?`` is put back
for the prompt (``prompts`` in the dataset config, ``{question}``: VideoLLaMA2 asks the question as-is; the other
families get a short-answer instruction).
Scores: ``accuracy`` = clean normalised match (case, punctuation, articles, ``_``, digits → words) and
``accuracy_videollama2`` = VideoLLaMA2's ``pred.rstrip(' .').upper() == answer.upper()``; breakdowns by the
official nine types and by modality (Audio / Visual / Audio-Visual).
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Any, Iterator

from avkv.metrics.text import normalize_short_answer, videollama2_exact_match
from avkv.tasks.base import DatasetError, Doc, Media, Prompt, Task, read_json, require
from avkv.tasks.common import aggregate_with_breakdowns
from avkv.tasks.prompts import PromptSet

def fill_question(template: str, values: list[str]) -> str:
    """The official template filling (``net_grd_avst/dataloader_avst.py``), with the final ``?`` kept."""
    words = template.rstrip().split(" ")
    last = words[-1][-1:] if words and words[-1] else ""
    words[-1] = words[-1][:-1]
    p = 0
    for i, w in enumerate(words):
        if "<" in w:
            if p >= len(values):
                raise IndexError(f"template {template!r} has more placeholders than templ_values {values}")
            words[i] = values[p]
            p += 1
    return " ".join(words) + (last if last == "?" else "")


def _literal(value: Any, path: Path, where: str, field: str) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError) as e:
        raise DatasetError(f"{path}: item {where} field '{field}' is not a JSON/Python literal: {value!r}") from e


class MusicAVQA(Task):
    name = "music_avqa"
    metric = "accuracy"

    def __init__(self, root: str | Path, split: str = "test", limit: int | None = None,
                 video_dir: str | Path | None = None, skip_deleted: bool = False, prompts: Any = None,
                 **kwargs: Any) -> None:
        super().__init__(root, limit)
        self.prompts = PromptSet(prompts, "dataset.prompts")
        self.split = split
        self.video_dir = Path(video_dir) if video_dir else self.root / "videos"
        self.index = self.root / "json_update" / f"avqa-{split}.json"
        self.skip_deleted = skip_deleted

    def docs(self) -> Iterator[Doc]:
        data = read_json(self.index, "MUSIC-AVQA index")
        if not isinstance(data, list):
            raise DatasetError(f"{self.index}: expected a JSON list of questions, got {type(data).__name__}")
        n = 0
        for i, item in enumerate(data):
            where = f"#{i}" + (f" (question_id {item.get('question_id')})" if isinstance(item, dict)
                               and "question_id" in item else "")
            vid = require(item, "video_id", self.index, where, (str, int))
            qid = require(item, "question_id", self.index, where, (int, str))
            typ = _literal(require(item, "type", self.index, where, (str, list)), self.index, where, "type")
            template = require(item, "question_content", self.index, where, str)
            values = _literal(require(item, "templ_values", self.index, where, (str, list)), self.index, where,
                              "templ_values")
            answer = require(item, "anser", self.index, where, str)
            if not (isinstance(typ, list) and len(typ) == 2):
                raise DatasetError(f"{self.index}: item {where} field 'type' must encode a 2-list, got {typ!r}")
            if not isinstance(values, list):
                raise DatasetError(f"{self.index}: item {where} field 'templ_values' must encode a list")
            if self.skip_deleted and item.get("question_deleted") in (1, "1", True):
                continue
            try:
                question = fill_question(template, [str(v) for v in values])
            except IndexError as e:
                raise DatasetError(f"{self.index}: item {where} field 'templ_values': {e}") from e
            path, err = self.media_path(self.video_dir, f"{vid}.mp4", "field 'video_id'")
            yield self.remember(Doc(id=str(qid), media=[Media("video", path, with_audio=True)],
                                    question=question, target=answer,
                                    meta={"type": f"{typ[0]}/{typ[1]}", "modality": typ[0], "video_id": str(vid)},
                                    origin=f"{self.index}: item {where}",
                                    error=err and f"{self.index}: item {where}: {err}"),
                                type=f"{typ[0]}/{typ[1]}", modality=typ[0])
            n += 1
            if self.limit is not None and n >= self.limit:
                return

    def prompt(self, doc: Doc, family: str) -> Prompt:
        return Prompt(context=[doc.media[0]], question=self.prompts.text(family, question=doc.question),
                      max_new_tokens=32)

    def score(self, doc: Doc, prediction: str) -> dict:
        pred = prediction or ""
        return {"score": float(normalize_short_answer(pred) == normalize_short_answer(doc.target)),
                "parsed_ok": bool(pred.strip()), "parsed": normalize_short_answer(pred),
                "score_videollama2": float(videollama2_exact_match(pred, doc.target)),
                "type": doc.meta.get("type"), "modality": doc.meta.get("modality")}

    def aggregate(self, records: list[dict]) -> dict:
        out = aggregate_with_breakdowns(records, "accuracy", ("type", "modality"), task=self)
        vl = aggregate_with_breakdowns(records, "accuracy_videollama2", ("type", "modality"),
                                       value_key="score_videollama2", task=self)
        for k in ("accuracy_videollama2", "accuracy_videollama2_by_type", "accuracy_videollama2_by_modality"):
            out[k] = vl[k]
        return out
