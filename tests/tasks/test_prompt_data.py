"""Per-family prompt text is data (``configs/dataset/*.yaml`` ``prompts``), and the task layer names no family."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from avkv.config import CONFIG_DIR, compose
from avkv.schema import Media, Prompt
from tests.tasks.helpers import Family, adapter_classes

TASKS_DIR = Path(__file__).resolve().parents[2] / "avkv" / "tasks"
DATASETS = sorted(p.stem for p in (CONFIG_DIR / "dataset").glob("*.yaml"))


@pytest.mark.parametrize("name", DATASETS)
def test_prompt_keys_are_model_families(name):
    node = compose([f"dataset={name}"]).dataset.get("prompts")
    if node is None or isinstance(node, str):
        return
    keys = set(OmegaConf.to_container(node))
    unknown = keys - {"default"} - set(adapter_classes())
    assert not unknown, f"configs/dataset/{name}.yaml prompts name no model family: {sorted(unknown)}"


def test_no_task_module_names_a_family():
    families = set(adapter_classes())
    hits = []
    for path in sorted(TASKS_DIR.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in families:
                hits.append(f"{path.relative_to(TASKS_DIR)}:{node.lineno} {node.value!r}")
    assert not hits, "a task module names a model family (put the text in the dataset config): " + ", ".join(hits)


def test_fit_prompt_is_the_models_knowledge():
    video = Media("video", "clip.mp4", start=1.0, end=2.0, with_audio=True)
    silent = Media("video", "clip.mp4")
    p = Prompt(context=[video, "text", silent], question="q")
    heard = Family("qwen2_audio").fit_prompt(p).context
    assert heard[0] == Media("audio", "clip.mp4", start=1.0, end=2.0) and heard[1:] == ["text", silent]
    assert Family("qwen2_5_omni").fit_prompt(p) == p and Family("qwen2_5_vl").fit_prompt(p) == p
    with pytest.raises(ValueError, match="takes text only"):
        Family("qwen2").fit_prompt(p)
    assert Family("qwen2").fit_prompt(Prompt(context=["text"], question="q")).context == ["text"]


def test_a_model_that_can_take_none_of_the_media_refuses():
    speech = Prompt(context=[Media("audio", "utt.wav"), "text"], question="q")
    video = Prompt(context=[Media("video", "clip.mp4", with_audio=True)], question="q")
    with pytest.raises(ValueError, match="none of its media"):
        Family("qwen2_5_vl").fit_prompt(speech)          # a vision model on a speech set
    with pytest.raises(ValueError, match="none of its media"):
        Family("llava").fit_prompt(video)                # an image model on video
    # one medium it can take is enough: a vision model sees the video and leaves its audio track
    assert Family("qwen2_5_vl").fit_prompt(video) == video
    assert Family("qwen2_audio").fit_prompt(speech) == speech
