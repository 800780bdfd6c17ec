"""AVQA (Yang et al., ACM MM 2022): audio-visual multiple-choice QA on VGGSound-derived clips.

Official layout (``root``)::

    val_qa.json            JSON list: id, video_name, video_id, question_text, multi_choice (4 str),
                           answer (int index into multi_choice), question_relation (Audio|Visual|Both),
                           question_type (Which, Come From, Happening, Where, Why, Before Next, When, Used For)
    train_qa.json          same schema
    videos/<video_name>.mp4

Source: github.com/AlyssaYoung/AVQA (annotations ``data/annotation/{train,val}_qa.json``), videos from
mn.cs.tsinghua.edu.cn/avqa. The paper's baselines are classifiers, so there is no official LLM prompt: options are
rendered as letters with an instruction to answer with the letter (``prompts`` in the dataset config, per model
family: ``{question}`` and ``{options}``), the letter is parsed with the shared MC extractor, and accuracy is reported with breakdowns by ``question_relation`` and ``question_type``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from avkv.tasks.base import DatasetError, Doc, Media, Prompt, Task, read_json, require
from avkv.tasks.common import aggregate_with_breakdowns, mc_fields, mc_score
from avkv.tasks.prompts import PromptSet


class AVQA(Task):
    name = "avqa"
    metric = "accuracy"

    def __init__(self, root: str | Path, split: str = "val", limit: int | None = None,
                 video_dir: str | Path | None = None, prompts: Any = None, **kwargs: Any) -> None:
        super().__init__(root, limit)
        self.prompts = PromptSet(prompts, "dataset.prompts")
        self.split = split
        self.video_dir = Path(video_dir) if video_dir else self.root / "videos"
        self.index = self.root / f"{split}_qa.json"

    def docs(self) -> Iterator[Doc]:
        data = read_json(self.index, "AVQA index")
        if not isinstance(data, list):
            raise DatasetError(f"{self.index}: expected a JSON list of questions, got {type(data).__name__}")
        docs = []
        for i, item in enumerate(data):
            where = f"#{i}" + (f" (id {item.get('id')})" if isinstance(item, dict) and "id" in item else "")
            qid = str(require(item, "id", self.index, where, (int, str)))
            name = require(item, "video_name", self.index, where, str)
            q = require(item, "question_text", self.index, where, str)
            choices = require(item, "multi_choice", self.index, where, list)
            ans = require(item, "answer", self.index, where, int)
            rel = require(item, "question_relation", self.index, where, str)
            qtype = require(item, "question_type", self.index, where, str)
            if len(choices) < 2 or not all(isinstance(c, str) for c in choices):
                raise DatasetError(f"{self.index}: item {where} field 'multi_choice' must be a list of strings")
            if not 0 <= ans < len(choices):
                raise DatasetError(f"{self.index}: item {where} field 'answer' = {ans} is outside "
                                   f"0..{len(choices) - 1}")
            path, err = self.media_path(self.video_dir, f"{name}.mp4", "field 'video_name'")
            video = Media("video", path, with_audio=True)
            docs.append(self.remember(Doc(id=qid, media=[video],
                            question=q, target=ans, choices=list(choices),
                            meta={"question_relation": rel, "question_type": qtype, "video_name": name,
                                  "video_id": item.get("video_id")}, origin=f"{self.index}: item {where}",
                            error=err and f"{self.index}: item {where}: {err}"),
                            question_relation=rel, question_type=qtype))
            if self.limit is not None and len(docs) >= self.limit:
                break
        yield from docs

    def prompt(self, doc: Doc, family: str) -> Prompt:
        # the video with its audio track: the adapter gives the model what it can take (ModelAdapter.fit_prompt)
        return Prompt(context=[doc.media[0]],
                      question=self.prompts.text(family, **mc_fields(doc.question, doc.choices or [])),
                      max_new_tokens=16)

    def score(self, doc: Doc, prediction: str) -> dict:
        out = mc_score(prediction, doc.choices or [], int(doc.target))
        out["question_relation"] = doc.meta.get("question_relation")
        out["question_type"] = doc.meta.get("question_type")
        return out

    def aggregate(self, records: list[dict]) -> dict:
        return aggregate_with_breakdowns(records, self.metric, ("question_relation", "question_type"), task=self)
