"""AVSD (DSTC7/DSTC10 Audio-Visual Scene-Aware Dialog): answer the last turn of a dialog about a Charades video.

Official layout (github.com/hudaAlamri/DSTC7-Audio-Visual-Scene-Aware-Dialog-AVSD-Challenge; videos from
Charades)::

    test_set4DSTC7-AVSD.json            {"dialogs": [{image_id, summary, caption,
                                                      dialog: [{question, answer}, ...]}]}
                                        (the released test set hides the last answer: "__UNDISCLOSED__")
    test_set4DSTC7-AVSD_multiref.json   the references, in either format:
                                        - the official DSTC7 package's COCO-caption file {images: [{name:
                                          "<image_id>_<turn>", id}], annotations: [{image_id, id, caption}]}
                                          (6 captions per image; image i is the i-th dialog of the test file);
                                        - a dialogs file whose last answer is a list of references (DSTC10
                                          style: test_set4DSTC10-AVSD_multiref+reason.json, which can also
                                          be the index) or a real string (train/valid files)
    Charades_v1_480/<image_id>.mp4      (``video_dir``; the test videos ship as Charades_vu17_test)

The prompt carries the earlier turns as dialog history in the context (after the video, so it is compressible
with the video) and the last question as the question (``prompts`` in the dataset config: ``{question}``); ``include_caption`` adds the human caption and summary
(DSTC7 allowed them; off by default since they describe the video). Score (``scorer_version``): ``dstc7`` — the
DSTC7 package: the hypothesis passes its stopword filter (every one-character token dropped), then coco-caption
ROUGE-L (PTB tokens, max precision / max recall over the references, beta 1.2), averaged over dialogs;
``dstc10`` — the DSTC10 package (``dstc10avsd_eval``): hypothesis and references lose only their "," and "."
tokens (Unicode whitespace squashed), then the same ROUGE-L; ``coco`` — no filter. The PTB tokenizer is a
Java-free emulation (recorded per sample).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from avkv.metrics.ptb import TOKENIZER_NAME
from avkv.metrics.text import AVSD_SCORER_VERSIONS, rouge_l_coco
from avkv.tasks.base import DatasetError, Doc, Media, Prompt, Task, read_json, require
from avkv.tasks.common import aggregate_with_breakdowns
from avkv.tasks.prompts import PromptSet

UNDISCLOSED = "__UNDISCLOSED__"


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
                 max_history: int | None = None, scorer_version: str = "dstc7", prompts: Any = None,
                 **kwargs: Any) -> None:
        super().__init__(root, limit)
        self.prompts = PromptSet(prompts, "dataset.prompts")
        if scorer_version not in AVSD_SCORER_VERSIONS:
            raise ValueError(f"dataset.scorer_version {scorer_version!r} is not an AVSD scorer; known: "
                             f"{', '.join(AVSD_SCORER_VERSIONS)}")
        self.scorer_version = scorer_version
        self.index = self.root / index
        self.references = (self.root / references) if references else None
        self.video_dir = Path(video_dir) if Path(video_dir).is_absolute() else self.root / video_dir
        self.include_caption = include_caption
        self.max_history = max_history

    def _refs(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        if self.references is None:
            return out
        data = read_json(self.references, "AVSD references file")
        if isinstance(data, dict) and "annotations" in data and "images" in data:
            return self._coco_refs(data)
        if not isinstance(data, dict) or not isinstance(data.get("dialogs"), list):
            raise DatasetError(f"{self.references}: expected a dialogs file ('dialogs') or the DSTC7 COCO-caption "
                               f"references file ('images' + 'annotations')")
        for i, d in enumerate(data["dialogs"]):
            where = f"#{i}"
            vid = str(require(d, "image_id", self.references, where, (str, int)))
            turns = require(d, "dialog", self.references, where, list)
            if not turns:
                raise DatasetError(f"{self.references}: item {where} (image_id {vid}) field 'dialog' is empty")
            ans = require(turns[-1], "answer", self.references, f"{where} (image_id {vid}) last turn", (str, list))
            out[vid] = self._check_refs([ans] if isinstance(ans, str) else [str(a) for a in ans],
                                        f"{where} (image_id {vid}) last turn field 'answer'")
        return out

    def _coco_refs(self, data: dict) -> dict[str, list[str]]:
        """The DSTC7 package's multiref file: image ``name`` is ``<image_id>_<turn>``, its captions are the refs."""
        path = self.references
        if not isinstance(data["images"], list) or not isinstance(data["annotations"], list):
            raise DatasetError(f"{path}: fields 'images' and 'annotations' must be lists")
        caps: dict[int, list[str]] = {}
        for i, a in enumerate(data["annotations"]):
            img = require(a, "image_id", path, f"annotations #{i}", int)
            caps.setdefault(img, []).append(require(a, "caption", path, f"annotations #{i} (image_id {img})", str))
        out: dict[str, list[str]] = {}
        for i, im in enumerate(data["images"]):
            name = require(im, "name", path, f"images #{i}", str)
            img = require(im, "id", path, f"images #{i} (name {name})", int)
            vid, sep, turn = name.rpartition("_")
            if not sep or not vid or not turn.isdigit():
                raise DatasetError(f"{path}: images #{i} field 'name' {name!r} is not '<image_id>_<turn>'")
            if vid in out:
                raise DatasetError(f"{path}: images #{i} field 'name' {name!r} repeats image_id {vid}")
            if img not in caps:
                raise DatasetError(f"{path}: images #{i} (name {name}) has no caption in 'annotations'")
            out[vid] = self._check_refs(caps[img], f"images #{i} (name {name}) captions")
        return out

    def _check_refs(self, refs: list[str], where: str) -> list[str]:
        # upstream scores an empty reference as one empty token (an empty hypothesis would match it): refuse it
        if not refs or any(not r.strip() for r in refs):
            raise DatasetError(f"{self.references}: item {where} has an empty reference")
        return refs

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
        context: list = [doc.media[0]]           # the adapter fits the video to the model (fit_prompt)
        if lines:
            context.append("\n".join(lines))
        return Prompt(context=context, question=self.prompts.text(family, question=doc.question),
                      max_new_tokens=64)

    def score(self, doc: Doc, prediction: str) -> dict:
        pred = prediction or ""
        return {"score": rouge_l_coco(pred, list(doc.target), version=self.scorer_version),
                "parsed_ok": bool(pred.strip()), "parsed": pred, "turn": doc.meta.get("turn"),
                "scorer_version": self.scorer_version, "tokenizer": TOKENIZER_NAME}

    def aggregate(self, records: list[dict]) -> dict:
        out = aggregate_with_breakdowns(records, self.metric, ("turn",), task=self)
        out["scorer_version"] = self.scorer_version
        out["tokenizer"] = TOKENIZER_NAME
        return out
