"""MVBench (Li et al., CVPR 2024): 20 temporal video MCQ tasks, 200 questions each.

Official layout (HF ``OpenGVLab/MVBench``; ``root`` holds both folders, ``video_dir`` overrides ``root/video``)::

    json/<task>.json     list of {video, question, candidates [str], answer (one of candidates)[, start, end]}
    video/<source>/...   per-task source folders (table ``TASKS``), e.g. video/star/Charades_v1_480/<id>.mp4;
                         Episodic Reasoning is a folder of 3 fps JPEG frames (video/tvqa/frames_fps3_hq/<clip>/)

The source folders, the clip bounds and the frame folder follow VideoLLaMA2's ``inference_video_mcqa_mvbench.py``.
Bound tasks carry ``start``/``end`` seconds (``Media.start``/``end``). Prompt (``prompts`` in the dataset config:
``{question}``, ``{options}``): VideoLLaMA2's for that family, lmms-eval's (``Question:..\\nOption:\\n(A) ..\\nOnly
give the best option.\\n``) for the others. Scores: the shared
letter extractor (``accuracy``; unparsed = wrong, counted) and VideoLLaMA2's regex with its fixed 'C' fallback
(``accuracy_videollama2``), per task and overall (micro, as VideoLLaMA2 prints, and the mean over tasks).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from avkv.metrics.text import extract_choice, option_letters, videollama2_mc_choice
from avkv.tasks.base import DatasetError, Doc, Media, Prompt, Task, is_failed, read_json, record_field, require
from avkv.tasks.common import aggregate_with_breakdowns, mc_fields
from avkv.tasks.prompts import PromptSet

# task name -> (json file stem, source folder under video/, data type, has start/end)
TASKS: dict[str, tuple[str, str, str, bool]] = {
    "Action Sequence": ("action_sequence", "star/Charades_v1_480", "video", True),
    "Action Prediction": ("action_prediction", "star/Charades_v1_480", "video", True),
    "Action Antonym": ("action_antonym", "ssv2_video", "video", False),
    "Fine-grained Action": ("fine_grained_action", "Moments_in_Time_Raw/videos", "video", False),
    "Unexpected Action": ("unexpected_action", "FunQA_test/test", "video", False),
    "Object Existence": ("object_existence", "clevrer/video_validation", "video", False),
    "Object Interaction": ("object_interaction", "star/Charades_v1_480", "video", True),
    "Object Shuffle": ("object_shuffle", "perception/videos", "video", False),
    "Moving Direction": ("moving_direction", "clevrer/video_validation", "video", False),
    "Action Localization": ("action_localization", "sta/sta_video", "video", True),
    "Scene Transition": ("scene_transition", "scene_qa/video", "video", False),
    "Action Count": ("action_count", "perception/videos", "video", False),
    "Moving Count": ("moving_count", "clevrer/video_validation", "video", False),
    "Moving Attribute": ("moving_attribute", "clevrer/video_validation", "video", False),
    "State Change": ("state_change", "perception/videos", "video", False),
    "Fine-grained Pose": ("fine_grained_pose", "nturgbd", "video", False),
    "Character Order": ("character_order", "perception/videos", "video", False),
    "Egocentric Navigation": ("egocentric_navigation", "vlnqa", "video", False),
    "Episodic Reasoning": ("episodic_reasoning", "tvqa/frames_fps3_hq", "frame", True),
    "Counterfactual Inference": ("counterfactual_inference", "clevrer/video_validation", "video", False),
}
STEMS = {v[0]: k for k, v in TASKS.items()}
#: AccKV's ten audio-bearing sub-tasks (their source videos carry sound)
ACCKV_TASKS = ["action_sequence", "action_prediction", "unexpected_action", "object_interaction", "object_shuffle",
               "action_localization", "scene_transition", "action_count", "state_change", "character_order"]
PRESETS = {"all": [v[0] for v in TASKS.values()], "acckv": ACCKV_TASKS}
FRAME_FPS = 3.0                       # the TVQA frame folders are sampled at 3 fps, first frame 00001.jpg


def resolve_tasks(tasks: str | list[str] | None) -> list[str]:
    """``all`` / ``acckv`` / a list of json stems or display names → json stems, in the official task order."""
    if tasks is None:
        tasks = "all"
    if isinstance(tasks, str):
        if tasks in PRESETS:
            return list(PRESETS[tasks])
        tasks = [tasks]
    out = []
    for t in tasks:
        stem = TASKS[t][0] if t in TASKS else t
        if stem not in STEMS:
            raise DatasetError(f"unknown MVBench task {t!r}; known: {', '.join(STEMS)} or a preset "
                               f"({', '.join(PRESETS)})")
        out.append(stem)
    return out


class MVBench(Task):
    name = "mvbench"
    metric = "accuracy"

    def __init__(self, root: str | Path, tasks: str | list[str] | None = "all", limit: int | None = None,
                 video_dir: str | Path | None = None, skip_missing_tasks: bool = False, prompts: Any = None,
                 **kwargs: Any) -> None:
        super().__init__(root, limit)
        self.prompts = PromptSet(prompts, "dataset.prompts")
        self.tasks = resolve_tasks(tasks)
        self.video_dir = Path(video_dir) if video_dir else self.root / "video"
        self.skip_missing_tasks = skip_missing_tasks

    def docs(self) -> Iterator[Doc]:
        n = 0
        for stem in self.tasks:
            name = STEMS[stem]
            _, folder, dtype, bound = TASKS[name]
            path = self.root / "json" / f"{stem}.json"
            if self.skip_missing_tasks and not path.exists():
                continue
            data = read_json(path, f"MVBench {name} index")
            if not isinstance(data, list):
                raise DatasetError(f"{path}: expected a JSON list of questions, got {type(data).__name__}")
            for i, item in enumerate(data):
                where = f"#{i}"
                video = require(item, "video", path, where, str)
                q = require(item, "question", path, where, str)
                cands = require(item, "candidates", path, where, list)
                ans = require(item, "answer", path, where, str)
                if len(cands) < 2 or not all(isinstance(c, str) for c in cands):
                    raise DatasetError(f"{path}: item {where} field 'candidates' must be a list of >= 2 strings")
                if ans not in cands:
                    raise DatasetError(f"{path}: item {where} field 'answer' {ans!r} is not one of the candidates")
                start = end = None
                if bound:
                    start = float(require(item, "start", path, where, (int, float)))
                    end = float(require(item, "end", path, where, (int, float)))
                vpath, err = self.media_path(self.video_dir / folder, video, "field 'video'")
                media = Media("video", vpath, start=start, end=end,
                              with_audio=stem in ACCKV_TASKS, frame_rate=FRAME_FPS if dtype == "frame" else None)
                meta = {"task": stem, "task_name": name, "data_type": dtype}
                if dtype == "frame":
                    meta["frame_fps"] = FRAME_FPS
                    meta["first_frame"] = 1
                yield self.remember(Doc(id=f"{stem}/{i}", media=[media], question=q, target=cands.index(ans),
                                        choices=list(cands), meta=meta, origin=f"{path}: item {where}",
                                        error=err and f"{path}: item {where}: {err}"), task=stem)
                n += 1
                if self.limit is not None and n >= self.limit:
                    return

    def prompt(self, doc: Doc, family: str) -> Prompt:
        text = self.prompts.text(family, **mc_fields(doc.question, doc.choices or []))
        return Prompt(context=list(doc.media), question=text, max_new_tokens=16)

    def score(self, doc: Doc, prediction: str) -> dict:
        choices = doc.choices or []
        idx = extract_choice(prediction, choices)
        vidx, vok = videollama2_mc_choice(prediction, choices)
        keys = option_letters(len(choices))
        return {"score": float(idx == doc.target), "parsed_ok": idx is not None,
                "parsed": keys[idx] if idx is not None else None,
                "score_videollama2": float(vidx == doc.target), "parsed_ok_videollama2": vok,
                "task": doc.meta.get("task")}

    def aggregate(self, records: list[dict]) -> dict:
        out = aggregate_with_breakdowns(records, "accuracy", ("task",), task=self)
        vl = aggregate_with_breakdowns(records, "accuracy_videollama2", ("task",), value_key="score_videollama2",
                                       task=self)
        out["accuracy_videollama2"] = vl["accuracy_videollama2"]
        out["accuracy_videollama2_by_task"] = vl["accuracy_videollama2_by_task"]
        out["n_fallback_videollama2"] = sum(1 for r in records if not is_failed(r)
                                            and record_field(r, "parsed_ok_videollama2") is False)
        per = [v for v in out["accuracy_by_task"].values() if v is not None]
        out["accuracy_task_mean"] = sum(per) / len(per) if per else None
        return out
