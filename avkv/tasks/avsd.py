"""AVSD (DSTC7 Audio-Visual Scene-Aware Dialog): answer the last turn of a dialog about a Charades video.

Official layout (github.com/hudaAlamri/DSTC7-Audio-Visual-Scene-Aware-Dialog-AVSD-Challenge; videos from
Charades)::

    test_set4DSTC7-AVSD.json            {"dialogs": [{image_id, summary, caption,
                                                      dialog: [{question, answer}, ...]}]}
                                        (the released test set hides the last answer: "__UNDISCLOSED__")
    test_set4DSTC7-AVSD_multiref.json   the same dialogs with the last answer a list of references (6 in the
                                        official file); any dialogs file whose last answers are real works too
    Charades_v1_480/<image_id>.mp4      (``video_dir``; the test videos ship as Charades_vu17_test)

The prompt carries the earlier turns as dialog history in the context (after the video, so it is compressible
with the video) and the last question as the question; ``include_caption`` adds the human caption and summary
(DSTC7 allowed them; off by default since they describe the video). Score: coco-caption ROUGE-L against all
references (max precision / max recall, beta 1.2, as the DSTC evaluation computes it), averaged over dialogs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from avkv.metrics.text import rouge_l_coco
from avkv.tasks.base import DatasetError, Doc, Media, Prompt, Task, read_json, require
from avkv.tasks.common import aggregate_with_breakdowns, check_family

UNDISCLOSED = "__UNDISCLOSED__"
INSTRUCTION = "Answer the question about the video in one short sentence."


def _dialogs(path: Path) -> list:
    data = read_json(path, "AVSD dialogs file")
    if not isinstance(data, dict) or not isinstance(data.get("dialogs"), list):
        raise DatasetError(f"{path}: expected an object with a 'dialogs' list")
    return data["dialogs"]


class AVSD(Task):
    name = "avsd"
    metric = "rouge_l"

    def __init__(self, root: str | Path, limit: int | None = None, index: str = "test_set4DSTC7-AVSD.json",
                 references: str | None = "test_set4DSTC7-AVSD_multiref.json",
                 video_dir: str | Path = "Charades_v1_480", include_caption: bool = False,
                 max_history: int | None = None, **kwargs: Any) -> None:
        super().__init__(root, limit)
        self.index = self.root / index
        self.references = (self.root / references) if references else None
        self.video_dir = Path(video_dir) if Path(video_dir).is_absolute() else self.root / video_dir
        self.include_caption = include_caption
        self.max_history = max_history

    def _refs(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        if self.references is None:
            return out
        for i, d in enumerate(_dialogs(self.references)):
            where = f"#{i}"
            vid = str(require(d, "image_id", self.references, where, (str, int)))
            turns = require(d, "dialog", self.references, where, list)
            if not turns:
                raise DatasetError(f"{self.references}: item {where} (image_id {vid}) field 'dialog' is empty")
            ans = require(turns[-1], "answer", self.references, f"{where} (image_id {vid}) last turn", (str, list))
            out[vid] = [ans] if isinstance(ans, str) else [str(a) for a in ans]
        return out

    def docs(self) -> Iterator[Doc]:
        refs = self._refs()
        n = 0
        for i, d in enumerate(_dialogs(self.index)):
            where = f"#{i}"
            vid = str(require(d, "image_id", self.index, where, (str, int)))
            where = f"#{i} (image_id {vid})"
            turns = require(d, "dialog", self.index, where, list)
            if not turns:
                raise DatasetError(f"{self.index}: item {where} field 'dialog' is empty")
            hist = []
            for t, turn in enumerate(turns):
                q = require(turn, "question", self.index, f"{where} turn {t}", str)
                a = require(turn, "answer", self.index, f"{where} turn {t}", (str, list))
                hist.append((q, a if isinstance(a, str) else (a[0] if a else "")))
            last_q, last_a = hist[-1]
            targets = refs.get(vid)
            if targets is None:
                if self.references is not None and self.references.exists():
                    raise DatasetError(f"{self.references}: no dialog for image_id {vid} of {self.index}")
                if last_a == UNDISCLOSED:
                    raise DatasetError(f"{self.index}: item {where} last answer is {UNDISCLOSED} and no "
                                       f"references file is set (dataset.references)")
                targets = [last_a]
            path, err = self.media_path(self.video_dir, f"{vid}.mp4", "field 'image_id'")
            video = Media("video", path, with_audio=True)
            yield self.remember(Doc(id=vid, media=[video],
                      question=last_q, target=targets,
                      meta={"history": hist[:-1], "caption": d.get("caption"), "summary": d.get("summary"),
                            "turn": len(hist)}, origin=f"{self.index}: item {where}",
                      error=err and f"{self.index}: item {where}: {err}"), turn=len(hist))
            n += 1
            if self.limit is not None and n >= self.limit:
                return

    def prompt(self, doc: Doc, family: str) -> Prompt:
        check_family(family)
        video = doc.media[0]
        media = Media("audio", video.path) if family == "qwen2_audio" else video
        hist = doc.meta.get("history") or []
        if self.max_history is not None:
            hist = hist[len(hist) - self.max_history:] if self.max_history > 0 else []
        lines = []
        if self.include_caption:
            lines.append(f"Video caption: {doc.meta.get('caption') or ''}")
            lines.append(f"Video summary: {doc.meta.get('summary') or ''}")
        if hist:
            lines.append("Dialog history:")
            lines += [f"Q: {q}\nA: {a}" for q, a in hist]
        context: list = [media]
        if lines:
            context.append("\n".join(lines))
        return Prompt(context=context, question=f"Q: {doc.question}\n{INSTRUCTION}", max_new_tokens=64)

    def score(self, doc: Doc, prediction: str) -> dict:
        pred = prediction or ""
        return {"score": rouge_l_coco(pred, list(doc.target)), "parsed_ok": bool(pred.strip()), "parsed": pred,
                "turn": doc.meta.get("turn")}

    def aggregate(self, records: list[dict]) -> dict:
        return aggregate_with_breakdowns(records, self.metric, ("turn",), task=self)
