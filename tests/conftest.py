"""Shared fixtures: tiny checkpoints and dataset fixtures in .cache/ (built once, reused; same as `make assets`)."""
from __future__ import annotations

import functools
from pathlib import Path

import pytest

from avkv.config import ROOT
from tests import discover

CACHE = ROOT / ".cache"
#: the transformers vision-language families added for the papers' tables (issue 19); image-only ones get
#: :func:`family_prompt`'s two-image prompt
VLM_FAMILIES = ("llava", "qwen2_vl", "llava_onevision", "internvl")
#: the native ports (avkv/models/native.py): no transformers ``generate``, their own greedy ``adapter.generate``
NATIVE_FAMILIES = ("mobilevlm", "videollama2_av")
#: tiny models that are not in FAMILIES, and why
NOT_IN_FAMILIES = {"qwen2": "text only: the engine tests need media positions",
                   "qwen2_5_omni_deep": "qwen2_5_omni again with 8 layers (the depth-dependent methods' model)",
                   **{f: "a native port (NATIVE_FAMILIES)" for f in NATIVE_FAMILIES}}
#: the transformers media families: every configs/model/tiny_<family>.yaml (tests/discover.py) but the above, so a
#: new family's tiny config puts it under the engine tests with no edit here
FAMILIES = tuple(sorted(f for f in discover.tiny_families() if f not in NOT_IN_FAMILIES))


@functools.lru_cache(maxsize=None)
def tiny_model_dir(name: str) -> Path:
    """Path of a tiny checkpoint, written on first use by the builder its config names."""
    from transformers.utils import logging as hf_logging

    from avkv.models.tiny import ensure_tiny
    hf_logging.disable_progress_bar()
    return ensure_tiny(ROOT / "configs" / "model" / f"{name}.yaml", CACHE / "models")[0]


@functools.lru_cache(maxsize=None)
def fixtures_dir() -> Path:
    from avkv.tasks import fixtures
    out = CACHE / "fixtures"
    fixtures.build(out)
    return out


@functools.lru_cache(maxsize=None)
def adapter(family: str, attn: str = "sdpa"):
    """A loaded tiny adapter (cached per session; tests must not mutate its model)."""
    from avkv.config import compose, instantiate
    tiny_model_dir(f"tiny_{family}")
    cfg = compose([f"model=tiny_{family}", f"model.attn_implementation={attn}"])
    return instantiate(cfg.model, device="cpu")


@pytest.fixture(scope="session")
def fixture_root() -> Path:
    return fixtures_dir()


def av_prompt(question: str = "What colour is the moving square? Answer with the letter."):
    """A prompt on the first AVQA fixture video (video with its audio track)."""
    from avkv.tasks.base import Media, Prompt
    video = sorted((fixtures_dir() / "avqa" / "videos").glob("*.mp4"))[0]
    return Prompt(context=[Media("video", str(video), with_audio=True)], question=question)


def image_prompt(question: str = "What colour is the moving square? Answer with the letter."):
    """A prompt with two MileBench fixture images interleaved with text (for families without video input)."""
    from avkv.tasks.base import Media, Prompt
    imgs = sorted((fixtures_dir() / "milebench" / "ALFRED" / "images" / "0").glob("*.jpg"))[:2]
    return Prompt(context=["First image: ", Media("image", str(imgs[0])), " second image: ",
                           Media("image", str(imgs[1])), "\n"], question=question)


def family_prompt(ad, question: str = "What colour is the moving square? Answer with the letter."):
    """:func:`av_prompt` for families that take video or audio, :func:`image_prompt` for image-only ones."""
    return av_prompt(question) if {"video", "audio"} & set(ad.modalities) else image_prompt(question)
