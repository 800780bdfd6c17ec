"""Shared fixtures: tiny checkpoints and dataset fixtures in .cache/ (built once, reused; same as `make assets`)."""
from __future__ import annotations

import functools
from pathlib import Path

import pytest

from avkv.config import ROOT
from tests import discover

CACHE = ROOT / ".cache"


def modalities(family: str) -> tuple[str, ...]:
    """What the adapter class of ``configs/model/tiny_<family>.yaml`` declares it takes."""
    return tuple(discover.adapter_class(f"tiny_{family}").modalities)


def _families() -> tuple[tuple[str, ...], tuple[str, ...]]:
    from avkv.models.native_adapter import NativeAdapter
    fams = discover.tiny_families(variants=False)
    native = tuple(f for f in fams if issubclass(discover.adapter_class(f"tiny_{f}"), NativeAdapter))
    return tuple(f for f in fams if f not in native and modalities(f)), native


#: the tiny families, from configs/model/tiny_*.yaml (tests/discover.py; variants such as ``_deep`` left out):
#: FAMILIES the transformers ones that take media; NATIVE_FAMILIES the native ports (avkv/models/native.py: no
#: transformers ``generate``, their own greedy ``adapter.generate``)
FAMILIES, NATIVE_FAMILIES = _families()
#: the vision-language families (images, no audio); image-only ones get :func:`family_prompt`'s two-image prompt
VLM_FAMILIES = tuple(f for f in FAMILIES if "image" in modalities(f) and "audio" not in modalities(f))


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
