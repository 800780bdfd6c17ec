"""MileBench (Song et al. 2024): 29 long-context multi-image datasets, as MileBench's own scripts run them.

Official layout (HF ``FreedomIntelligence/MileBench``, the six tarballs unpacked; ``root`` = ``data/MileBench``)::

    <Dataset>/<Dataset>.json       {"meta_data": {dataset, split, num_sample, task_instruction: [str],
                                                  question_type: "multi-choice"|"open-ended"},
                                    "data": [{sample_id, task_instruction_id,
                                              task_instance: {context ({image#k}/{table#k} slots), images_path,
                                                              choice_list (MC only)},
                                              response, image_quantity_level: Few|Medium|Many}]}
    <Dataset>/<Dataset>-adv.json   the adversarial variant (``adv=true``)
    <Dataset>/images/...           ``images_path`` entries are relative to it

Prompt (``utils.py`` ``MileBenchDataset``): the instruction picked by ``task_instruction_id``; for MC the context
gets ``"\\nChoice list: \\n"`` + ``"A. opt"`` lines (GPR1200: bare options) + ``"\\nYour answer is: "``; the slots
become images. **Truncation** keeps the instruction and walks the context backwards, text fragments and images
(``n_tokens_per_image`` each), until ``max_context_len - len(instruction)`` tokens; earlier images are dropped. It
depends only on the tokenizer, ``max_context_len`` and ``n_tokens_per_image`` — so it is identical for every
method of a sweep on one model — and is recorded per sample (``meta.truncation``). Pass the model's tokenizer
folder as ``tokenizer`` (e.g. ``dataset.tokenizer=${model.path}``); without one a whitespace token count is used
and recorded as such.

Scoring (``evaluate.py``, ``scorer_version``: ``current`` = commit b2979ac, the copy LOOK-M ships and the KV papers'
numbers come from; ``initial`` = 730e930): needle datasets — processed gold is a token of the processed answer;
MMCoQA — a substring; open-ended — ROUGE-L F of ``rouge==1.0.1``; multi-choice — ``match_choice`` with its quirks
(an empty answer picks C; current: keys past Z are AA, AB, ... and a two-character answer may be a key;
initial: keys ``chr(65 + i)``). The image-quantity breakdown is by the number of images (current) or the stored
``image_quantity_level`` (initial — whose open-ended branch files every sample under the level of the *last*
sample of the file, a quirk kept). Roll-up: per dataset (and by ``image_quantity_level``), then the mean per group
(Realistic Temporal / Realistic Semantic / Diagnostic) and over all datasets run, in percent as ``score.py``.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterator

from avkv.metrics.text import (MILEBENCH_VERSIONS, milebench_image_level, milebench_score_mc,
                               milebench_score_needle, milebench_score_open)
from avkv.tasks.base import DatasetError, Doc, Media, Prompt, Task, is_failed, read_json, require
from avkv.tasks.prompts import PromptSet

GROUPS: dict[str, list[str]] = {
    "Realistic Temporal": ["ActionLocalization", "ActionPrediction", "ActionSequence", "CharacterOrder",
                           "CounterfactualInference", "EgocentricNavigation", "MovingAttribute", "MovingDirection",
                           "ObjectExistence", "ObjectInteraction", "ObjectShuffle", "SceneTransition",
                           "StateChange"],
    "Realistic Semantic": ["ALFRED", "CLEVR-Change", "DocVQA", "IEdit", "MMCoQA", "MultiModalQA", "nuscenes",
                           "OCR-VQA", "SlideVQA", "Spot-the-Diff", "TQA", "WebQA", "WikiVQA"],
    "Diagnostic": ["GPR1200", "ImageNeedleInAHaystack", "TextNeedleInAHaystack"],
}
DATASETS = [d for g in GROUPS.values() for d in g]
GROUP_OF = {d: g for g, ds in GROUPS.items() for d in ds}
PRESETS = {
    "all": DATASETS,
    "realistic_temporal": GROUPS["Realistic Temporal"], "realistic_semantic": GROUPS["Realistic Semantic"],
    "diagnostic": GROUPS["Diagnostic"],
    # the subsets the KV papers report
    "flowmm": ["ALFRED", "IEdit", "Spot-the-Diff", "MMCoQA", "CLEVR-Change", "TextNeedleInAHaystack",
               "ImageNeedleInAHaystack"],
    "madakv": ["TextNeedleInAHaystack", "IEdit", "MMCoQA", "Spot-the-Diff", "ALFRED"],
}
IMAGE = "<ImageHere>"
LEVELS = ("Few", "Medium", "Many")


def resolve_datasets(tasks: str | list[str] | None) -> list[str]:
    if tasks is None:
        tasks = "all"
    if isinstance(tasks, str):
        tasks = PRESETS.get(tasks, [tasks])
    unknown = [t for t in tasks if t not in GROUP_OF]
    if unknown:
        raise DatasetError(f"unknown MileBench dataset(s) {unknown}; known: {', '.join(DATASETS)} or a preset "
                           f"({', '.join(PRESETS)})")
    return list(tasks)


class _Tokens:
    """encode/decode for the truncation: the model's tokenizer, or whitespace-delimited pieces (lossless)."""

    def __init__(self, tokenizer: str | Path | None) -> None:
        self.name = "whitespace"
        self.tok = None
        if tokenizer:
            from transformers import AutoTokenizer
            self.tok = AutoTokenizer.from_pretrained(str(tokenizer))
            self.name = str(tokenizer)

    def encode(self, text: str) -> list:
        if self.tok is None:
            return re.findall(r"\s*\S+\s*|\s+", text) if text else []
        return self.tok(text, add_special_tokens=False, split_special_tokens=True).input_ids

    def decode(self, ids: list) -> str:
        return "".join(ids) if self.tok is None else self.tok.decode(ids)


def truncate(instruction: str, context: str, images: list[str], max_context_len: int, n_tokens_per_image: int,
             tokens: _Tokens) -> tuple[list, dict]:
    """MileBench's left truncation. Returns (segments, info): the final prompt as text pieces (str) and images
    (``Media``) in order, ``instruction + "\\n"`` first; info records what was kept."""
    budget = max_context_len - len(tokens.encode(instruction))
    pending = list(images)
    chunks: list[list] = []
    kept: list[str] = []
    used = 0
    image_first = False
    truncated_text = False
    for fragment in context.split(IMAGE)[::-1]:
        ids = tokens.encode(fragment)
        if len(ids) + used > budget:
            if not chunks:                                   # nothing kept yet: keep the tail of this fragment
                chunks.insert(0, ids[-budget:])
                truncated_text = True
            break
        image_first = False
        chunks.insert(0, ids)
        used += len(ids)
        if n_tokens_per_image + used > budget:
            break
        if pending:
            image_first = True
            kept.insert(0, pending.pop(-1))
            used += n_tokens_per_image
    texts = [tokens.decode(c) for c in chunks]
    segments: list = [instruction + "\n"]
    img_iter = iter(Media("image", p) for p in kept)
    if image_first:
        segments.append(next(img_iter))
    for k, t in enumerate(texts):
        segments.append(t)
        if k < len(texts) - 1:
            segments.append(next(img_iter))
    info = {"images_total": len(images), "images_kept": len(kept), "context_tokens": used,
            "budget_tokens": budget, "truncated": len(kept) < len(images) or truncated_text
            or len(chunks) < len(context.split(IMAGE)), "max_context_len": max_context_len,
            "n_tokens_per_image": n_tokens_per_image, "tokenizer": tokens.name}
    return segments, info


class MileBench(Task):
    name = "milebench"
    metric = "score"

    def __init__(self, root: str | Path, tasks: str | list[str] | None = "all", limit: int | None = None,
                 adv: bool = False, max_context_len: int = 4096, n_tokens_per_image: int = 576,
                 tokenizer: str | Path | None = None, max_new_tokens: int = 512,
                 skip_missing_tasks: bool = False, scorer_version: str = "current", prompts: Any = None,
                 **kwargs: Any) -> None:
        super().__init__(root, limit)
        self.prompts = PromptSet(prompts, "dataset.prompts")      # MileBench's text is its own; families refused
        if scorer_version not in MILEBENCH_VERSIONS:
            raise ValueError(f"dataset.scorer_version {scorer_version!r} is not a MileBench evaluate.py version; "
                             f"known: {', '.join(MILEBENCH_VERSIONS)}")
        self.scorer_version = scorer_version
        self.datasets = resolve_datasets(tasks)
        self.adv = adv
        self.max_context_len = int(max_context_len)
        self.n_tokens_per_image = int(n_tokens_per_image)
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.skip_missing_tasks = skip_missing_tasks
        self._tokens: _Tokens | None = None

    def index_path(self, dataset: str) -> Path:
        return self.root / dataset / (f"{dataset}-adv.json" if self.adv else f"{dataset}.json")

    def docs(self) -> Iterator[Doc]:
        if self._tokens is None:
            self._tokens = _Tokens(self.tokenizer)
        n = 0
        for ds in self.datasets:
            path = self.index_path(ds)
            if self.skip_missing_tasks and not path.exists():
                continue
            data = read_json(path, f"MileBench {ds} file")
            meta = require(data, "meta_data", path, "(top level)", dict)
            instructions = require(meta, "task_instruction", path, "meta_data", (list, str))
            if isinstance(instructions, str):
                instructions = [instructions]
            qtype = require(meta, "question_type", path, "meta_data", str)
            kind = self.kind(ds, qtype)
            if kind is None:
                raise DatasetError(f"{path}: meta_data field 'question_type' {qtype!r} is neither multi-choice "
                                   f"nor open-ended")
            items = require(data, "data", path, "(top level)", list)
            last_level = items[-1].get("image_quantity_level") if items and isinstance(items[-1], dict) else None
            for i, item in enumerate(items):
                sid = require(item, "sample_id", path, f"#{i}", (int, str))
                where = f"#{i} (sample_id {sid})"
                inst_id = require(item, "task_instruction_id", path, where, (int, str))
                inst = require(item, "task_instance", path, where, dict)
                context = require(inst, "context", path, f"{where} task_instance", str)
                images = require(inst, "images_path", path, f"{where} task_instance", list)
                gold = str(require(item, "response", path, where, (str, int, float)))
                level = require(item, "image_quantity_level", path, where, str)
                if not 0 <= int(inst_id) < len(instructions):
                    raise DatasetError(f"{path}: item {where} field 'task_instruction_id' = {inst_id} is outside "
                                       f"the {len(instructions)} instructions")
                choices = None
                if "choice_list" in inst:
                    choices = [str(c) for c in require(inst, "choice_list", path, f"{where} task_instance", list)]
                    choice_str = "\nChoice list: \n" + "\n".join(
                        ("" if ds == "GPR1200" else f"{chr(65 + k)}. ") + c for k, c in enumerate(choices))
                    context = context + choice_str + "\nYour answer is: "
                if kind == "mc":
                    if choices is None:
                        raise DatasetError(f"{path}: item {where} (multi-choice) has no field 'choice_list'")
                    from avkv.metrics.text import milebench_process
                    if milebench_process(gold) not in [milebench_process(c) for c in choices]:
                        raise DatasetError(f"{path}: item {where} field 'response' {gold!r} is not in choice_list")
                for k in range(len(images)):
                    context = context.replace("{image#%d}" % (k + 1), IMAGE).replace("{table#%d}" % (k + 1), IMAGE)
                paths, errs = [], []
                for k, p in enumerate(images):
                    full, err = self.media_path(self.root / ds / "images", p, f"task_instance field 'images_path' #{k}")
                    paths.append(full)
                    if err:
                        errs.append(err)
                segments, info = truncate(instructions[int(inst_id)], context, paths, self.max_context_len,
                                          self.n_tokens_per_image, self._tokens)
                media = [s for s in segments if isinstance(s, Media)]
                seg_meta: list = []
                for s in segments:
                    seg_meta.append(len([m for m in seg_meta if isinstance(m, int)]) if isinstance(s, Media) else s)
                question = seg_meta[-1] if isinstance(seg_meta[-1], str) else ""
                doc = Doc(id=f"{ds}/{sid}", media=media, question=question, target=gold, choices=choices,
                          meta={"dataset": ds, "group": GROUP_OF[ds], "kind": kind, "image_quantity_level": level,
                                "segments": seg_meta, "truncation": info, "sample_id": sid,
                                "n_images": len(images), "file_last_level": last_level},
                          origin=f"{path}: item {where}",
                          error=f"{path}: item {where}: {'; '.join(errs)}" if errs else None)
                level_scored = self.scored_level(doc)
                doc.meta["image_quantity_level_scored"] = level_scored
                yield self.remember(doc, dataset=ds, image_quantity_level=level_scored)
                n += 1
                if self.limit is not None and n >= self.limit:
                    return

    @staticmethod
    def kind(dataset: str, question_type: str) -> str | None:
        if "NeedleInAHaystack" in dataset:
            return "needle"
        if "MMCoQA" in dataset:
            return "substring"
        return {"open-ended": "open", "multi-choice": "mc"}.get(question_type)

    def scored_level(self, doc: Doc) -> str:
        """The image-quantity level ``evaluate.py`` files this sample under, for ``scorer_version``."""
        m = doc.meta
        if self.scorer_version == "current":
            return milebench_image_level(int(m["n_images"]))
        if m["kind"] == "open" and m.get("file_last_level"):   # initial evaluate_rouge: the loop variable's level
            return str(m["file_last_level"])
        return str(m["image_quantity_level"])

    def prompt(self, doc: Doc, family: str) -> Prompt:
        segs = doc.meta["segments"]
        context: list = []
        for s in segs[:-1]:
            context.append(doc.media[s] if isinstance(s, int) else s)
        last = segs[-1]
        if isinstance(last, int):                         # cannot happen (the context ends with text), but be safe
            context.append(doc.media[last])
            last = ""
        # merge adjacent text pieces (the instruction line and the first fragment) as one string
        merged: list = []
        for c in context:
            if isinstance(c, str) and not c:
                continue                                  # the empty text between two adjacent images
            if isinstance(c, str) and merged and isinstance(merged[-1], str):
                merged[-1] += c
            else:
                merged.append(c)
        return Prompt(context=merged, question=last, max_new_tokens=self.max_new_tokens)

    def score(self, doc: Doc, prediction: str) -> dict:
        kind = doc.meta["kind"]
        pred = prediction if prediction is not None else ""
        out = {"dataset": doc.meta["dataset"], "group": doc.meta["group"],
               "image_quantity_level": doc.meta.get("image_quantity_level_scored") or self.scored_level(doc),
               "image_quantity_level_stored": doc.meta["image_quantity_level"],
               "scorer_version": self.scorer_version, "truncation": doc.meta.get("truncation")}
        if kind == "mc":
            s, picked, ok = milebench_score_mc(pred, doc.target, doc.choices or [], self.scorer_version)
            return dict(out, score=s, parsed=picked, parsed_ok=ok)
        if kind == "open":
            s = milebench_score_open(pred, doc.target)
        else:
            s = milebench_score_needle(pred, doc.target, whole_token=(kind == "needle"))
        return dict(out, score=s, parsed=pred, parsed_ok=bool(pred.strip()))

    def aggregate(self, records: list[dict]) -> dict:
        ok = [r for r in records if not is_failed(r) and r.get("score") is not None]
        per: dict[str, list[float]] = {}
        per_level: dict[str, dict[str, list[float]]] = {}
        for r in ok:
            ds = str(self.field(r, "dataset"))
            per.setdefault(ds, []).append(float(r["score"]))
            per_level.setdefault(ds, {lv: [] for lv in LEVELS}).setdefault(
                str(self.field(r, "image_quantity_level")), []).append(float(r["score"]))

        def pct(xs: list[float]) -> float | None:
            return 100.0 * sum(xs) / len(xs) if xs else None

        by_ds = {ds: pct(v) for ds, v in per.items()}
        by_group = {}
        for g, names in GROUPS.items():
            vals = [by_ds[d] for d in names if by_ds.get(d) is not None]
            by_group[g] = sum(vals) / len(vals) if vals else None
        vals = [v for v in by_ds.values() if v is not None]
        levels_all: dict[str, list[float]] = {lv: [] for lv in LEVELS}
        for lv_map in per_level.values():
            for lv, xs in lv_map.items():
                levels_all.setdefault(lv, []).extend(xs)
        return {"score": sum(vals) / len(vals) if vals else None, "scorer_version": self.scorer_version,
                "score_by_dataset": dict(sorted(by_ds.items())),
                "score_by_group": by_group,
                "score_by_image_quantity_level": {lv: pct(xs) for lv, xs in levels_all.items()},
                "score_by_dataset_and_level": {ds: {lv: pct(xs) for lv, xs in m.items()}
                                               for ds, m in sorted(per_level.items())},
                "n_by_dataset": {ds: sum(1 for r in records if str(self.field(r, "dataset")) == ds)
                                 for ds in sorted({str(self.field(r, "dataset")) for r in records})},
                "n": len(records), "n_scored": len(ok), "n_failed": sum(1 for r in records if is_failed(r)),
                "n_unparsed": sum(1 for r in records if not is_failed(r) and r.get("parsed_ok") is False)}
