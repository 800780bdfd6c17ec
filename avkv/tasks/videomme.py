"""Video-MME (Fu et al., CVPR 2025): 900 videos (short < 2 min, medium 4-15 min, long 30-60 min), 2,700 four-option
questions over 6 domains, 30 sub-categories and 12 task types.

Official layout (HF ``lmms-lab/Video-MME``, the archives unpacked; ``root``)::

    videomme/test-00000-of-00001.parquet    one row per question: video_id ("001"), duration (short|medium|long),
                                            domain, sub_category, url, videoID (the YouTube id), question_id
                                            ("001-1"), task_type, question, options (["A. ...", "B. ...", ...]),
                                            answer (the letter)
    data/<videoID>.mp4                      (``video_dir``; lmms-eval also accepts .MP4 / .mkv)
    subtitle/<videoID>.srt                  (not read: the "w/o subs" setting the KV papers report)

Prompt: the benchmark's own "w/o subs" instruction (its README; lmms-eval ``videomme_doc_to_text``) with the
options one per line, as ``prompts`` in the dataset config (``{question}``, ``{options}``). The video's audio
track is not part of the official setting (``with_audio``: false). Scoring is lmms-eval's
``extract_characters_regex`` (strip the answer prefixes, kept with their two missing commas; a reply of more than
ten words without A-D is unparsed; else the first A-D letter) compared with ``answer``; accuracy overall and by
``duration``, ``domain`` and ``task_type``, in [0, 1] (lmms-eval prints percent).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterator

from avkv.tasks.base import DatasetError, Doc, Media, Prompt, Task, require
from avkv.tasks.common import aggregate_with_breakdowns
from avkv.tasks.prompts import PromptSet

DURATIONS = ("short", "medium", "long")
#: lmms-eval's list, verbatim in effect: two pairs of adjacent literals concatenate (no comma between them)
ANSWER_PREFIXES = ("The best answer is", "The correct answer is", "The answer is", "The answer",
                   "The best option isThe correct option is", "Best answer:Best option:")
VIDEO_EXTS = (".mp4", ".MP4", ".mkv")


def extract_letter(text: str | None) -> str:
    """lmms-eval's ``extract_characters_regex``: the predicted letter, or ``""`` when there is none."""
    s = (text or "").strip()
    for prefix in ANSWER_PREFIXES:
        s = s.replace(prefix, "")
    if len(s.split()) > 10 and not re.search("[ABCD]", s):
        return ""
    m = re.search(r"[ABCD]", s)
    return m[0] if m else ""


class VideoMME(Task):
    name = "videomme"
    metric = "accuracy"

    def __init__(self, root: str | Path, limit: int | None = None, index: str = "videomme/test-00000-of-00001.parquet",
                 video_dir: str | Path = "data", duration: str | list[str] | None = None, prompts: Any = None,
                 max_new_tokens: int = 16, **kwargs: Any) -> None:
        super().__init__(root, limit)
        self.index = self.root / index
        self.video_dir = Path(video_dir) if Path(video_dir).is_absolute() else self.root / video_dir
        durations = [duration] if isinstance(duration, str) else list(duration or DURATIONS)
        unknown = [d for d in durations if d not in DURATIONS]
        if unknown:
            raise ValueError(f"dataset.duration {unknown} is not a Video-MME duration; known: {', '.join(DURATIONS)}")
        self.durations = durations
        self.prompts = PromptSet(prompts, "dataset.prompts")
        self.max_new_tokens = int(max_new_tokens)

    def _rows(self) -> list[dict]:
        if not self.index.is_file():
            raise DatasetError(f"Video-MME index not found: {self.index}")
        import pyarrow.parquet as pq
        try:
            return pq.read_table(self.index).to_pylist()
        except Exception as e:  # noqa: BLE001 - pyarrow's errors do not name the file
            raise DatasetError(f"{self.index} is not a readable parquet file: {e}") from e

    def _video(self, vid: str) -> tuple[str, str | None]:
        for ext in VIDEO_EXTS:
            path, err = self.media_path(self.video_dir, f"{vid}{ext}", "field 'videoID'")
            if err or Path(path).is_file():
                return path, err
        return self.media_path(self.video_dir, f"{vid}.mp4", "field 'videoID'")

    def docs(self) -> Iterator[Doc]:
        n = 0
        for i, row in enumerate(self._rows()):
            where = f"row {i}" + (f" (question_id {row.get('question_id')})" if row.get("question_id") else "")
            qid = str(require(row, "question_id", self.index, where, str))
            duration = require(row, "duration", self.index, where, str)
            vid = require(row, "videoID", self.index, where, str)
            question = require(row, "question", self.index, where, str)
            options = require(row, "options", self.index, where, list)
            answer = require(row, "answer", self.index, where, str)
            if duration not in DURATIONS:
                raise DatasetError(f"{self.index}: item {where} field 'duration' {duration!r} is not one of "
                                   f"{', '.join(DURATIONS)}")
            if len(options) < 2 or not all(isinstance(o, str) for o in options):
                raise DatasetError(f"{self.index}: item {where} field 'options' must be a list of strings")
            letters = [o[:1] for o in options]
            if answer not in letters:
                raise DatasetError(f"{self.index}: item {where} field 'answer' {answer!r} is not an option letter "
                                   f"({', '.join(letters)})")
            if duration not in self.durations:
                continue
            path, err = self._video(vid)
            meta = {"duration": duration, "domain": row.get("domain"), "sub_category": row.get("sub_category"),
                    "task_type": row.get("task_type"), "video_id": row.get("video_id"), "videoID": vid}
            yield self.remember(Doc(id=qid, media=[Media("video", path)], question=question, target=answer,
                                    choices=list(options), meta=meta, origin=f"{self.index}: item {where}",
                                    error=err and f"{self.index}: item {where}: {err}"),
                                duration=duration, domain=meta["domain"], task_type=meta["task_type"])
            n += 1
            if self.limit is not None and n >= self.limit:
                return

    def prompt(self, doc: Doc, family: str) -> Prompt:
        text = self.prompts.text(family, question=doc.question, options="\n".join(doc.choices or []))
        return Prompt(context=[doc.media[0]], question=text, max_new_tokens=self.max_new_tokens)

    def score(self, doc: Doc, prediction: str) -> dict:
        letter = extract_letter(prediction)
        return {"score": float(letter == doc.target), "parsed_ok": bool(letter), "parsed": letter or None,
                "duration": doc.meta.get("duration"), "domain": doc.meta.get("domain"),
                "task_type": doc.meta.get("task_type")}

    def aggregate(self, records: list[dict]) -> dict:
        return aggregate_with_breakdowns(records, self.metric, ("duration", "domain", "task_type"), task=self)
