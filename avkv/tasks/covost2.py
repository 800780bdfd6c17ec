"""CoVoST 2 speech translation (Wang et al., 2021) over Common Voice clips: AudioKV's E2C (en→zh) and C2E (zh→en).

Official layout: the Common Voice release folder of the *source* language (``root``; CoVoST 2 uses
``cv-corpus-4-2019-12-10/<lang>``) with the CoVoST 2 TSV of the pair put beside it (``tsv_dir``, default ``root``)::

    clips/<path>.mp3                       the Common Voice clips
    validated.tsv                          Common Voice: client_id, path, sentence, ...
    covost_v2.<src>_<tgt>.tsv              CoVoST 2: path, translation, split (train|dev|test|train_covost), ...
                                           e.g. covost_v2.en_zh-CN.tsv, covost_v2.zh-CN_en.tsv

TSVs are read as fairseq's ``prep_covost_data.py`` reads them (tab-separated, no quoting, ``\\`` escapes); the
source transcript comes from ``validated.tsv`` (the CoVoST TSV's own ``sentence`` column when there is no
validated.tsv), the reference is ``translation``, the sample id is ``path`` without ``.mp3``, and only rows of
``split`` are kept. Scoring: sacrebleu corpus BLEU (tokenizer ``zh`` for a Chinese target, ``13a`` otherwise) and
corpus chrF; ``metric`` picks the headline (AudioKV: chrF for en→zh, BLEU for zh→en), in ``summary.json``. Per
sample: sentence BLEU and chrF, and ``score`` = the headline's sentence value / 100 (so ``avkv report``, which
averages per-sample scores, shows the mean sentence-level value, not the corpus one).
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Iterator

from avkv.metrics.translation import bleu_tokenizer, corpus_bleu, corpus_chrf, sentence_scores
from avkv.tasks.base import DatasetError, Doc, Media, Prompt, Task, is_failed
from avkv.tasks.prompts import PromptSet

LANG_NAMES = {"en": "English", "zh-CN": "Chinese", "zh": "Chinese"}


def read_tsv(path: Path, what: str) -> list[dict]:
    if not path.is_file():
        raise DatasetError(f"{what} not found: {path}")
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\")
        return [dict(r) for r in reader]


class CoVoST2(Task):
    name = "covost2"
    higher_is_better = True

    def __init__(self, root: str | Path, source_language: str = "en", target_language: str = "zh-CN",
                 split: str = "test", limit: int | None = None, tsv_dir: str | Path | None = None,
                 metric: str = "bleu", prompts: Any = None, max_new_tokens: int | None = 256,
                 name: str | None = None, **kwargs: Any) -> None:
        super().__init__(root, limit)
        if metric not in ("bleu", "chrf"):
            raise ValueError(f"dataset.metric must be bleu or chrf, got {metric!r}")
        self.metric = metric
        self.src, self.tgt, self.split = source_language, target_language, split
        self.tsv_dir = Path(tsv_dir) if tsv_dir else self.root
        self.prompts = PromptSet(prompts, "dataset.prompts")
        self.max_new_tokens = int(max_new_tokens) if max_new_tokens else 256
        self.tgt_lang = "zh" if target_language.startswith("zh") else target_language
        if name:
            self.name = name

    @property
    def tsv(self) -> Path:
        return self.tsv_dir / f"covost_v2.{self.src}_{self.tgt}.tsv"

    def docs(self) -> Iterator[Doc]:
        rows = read_tsv(self.tsv, "CoVoST 2 TSV")
        validated = self.root / "validated.tsv"
        sentences = {r.get("path"): r.get("sentence") for r in read_tsv(validated, "Common Voice validated.tsv")} \
            if validated.is_file() else {}
        seen: set[str] = set()
        n = 0
        for i, r in enumerate(rows, 2):
            where = f"line {i}"
            for key in ("path", "translation", "split"):
                if not (r.get(key) or "").strip():
                    raise DatasetError(f"{self.tsv}: {where} has no field '{key}'")
            if r["split"] != self.split:
                continue
            clip = r["path"].strip()
            if "/" in clip or "\\" in clip or clip in (".", "..") or clip.startswith("."):
                raise DatasetError(f"{self.tsv}: {where} field 'path' = {clip!r} is not a clip file name")
            sid = clip[:-4] if clip.endswith(".mp3") else clip
            if sid in seen:
                raise DatasetError(f"{self.tsv}: {where} field 'path' repeats {clip}")
            seen.add(sid)
            source = sentences.get(clip) or r.get("sentence") or ""
            yield Doc(id=sid, media=[Media("audio", str(self.root / "clips" / clip))], question="",
                      target=r["translation"], meta={"source_text": source, "source_language": self.src,
                                                     "target_language": self.tgt,
                                                     "source_language_name": LANG_NAMES.get(self.src, self.src),
                                                     "target_language_name": LANG_NAMES.get(self.tgt, self.tgt)})
            n += 1
            if self.limit is not None and n >= self.limit:
                return
        if not seen:
            raise DatasetError(f"{self.tsv} has no row of split {self.split!r}")

    def prompt(self, doc: Doc, family: str) -> Prompt:
        return Prompt(context=list(doc.media), question=self.prompts.text(family, **doc.meta),
                      max_new_tokens=self.max_new_tokens)

    def score(self, doc: Doc, prediction: str) -> dict:
        s = sentence_scores((prediction or "").strip(), doc.target, self.tgt_lang)
        # per-sample score in [0, 1] like every other task (the report multiplies by 100); the corpus BLEU / chrF
        # the paper prints are in summary.json (aggregate)
        return {"score": s[self.metric] / 100.0, "parsed_ok": True, "sentence_bleu": s["bleu"],
                "sentence_chrf": s["chrf"]}

    def aggregate(self, records: list[dict]) -> dict:
        ok = [r for r in records if not is_failed(r) and r.get("target") is not None]
        hyps = [(r.get("prediction") or "").strip() for r in ok]
        refs = [str(r["target"]) for r in ok]
        bleu = corpus_bleu(hyps, refs, self.tgt_lang) if ok else None
        chrf = corpus_chrf(hyps, refs) if ok else None
        return {self.metric: bleu if self.metric == "bleu" else chrf, "bleu": bleu, "chrf": chrf,
                "bleu_tokenizer": bleu_tokenizer(self.tgt_lang), "n": len(records), "n_scored": len(ok),
                "n_failed": sum(1 for r in records if is_failed(r)), "n_unparsed": 0}
