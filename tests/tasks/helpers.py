"""Task tests through the joint where a task meets a model (``experiment.build_prompt``), without loading one.

:class:`Family` stands in for a loaded adapter: the family name and modalities of the adapter class a
``configs/model`` file names, and the real :meth:`ModelAdapter.fit_prompt`. :func:`prompts` reads a dataset
config's per-family prompt text, so a test builds a task with the same data a run uses.
"""
from __future__ import annotations

import functools

from omegaconf import OmegaConf

from avkv.config import CONFIG_DIR, compose
from avkv.experiment import build_prompt
from avkv.models.base import ModelAdapter


@functools.lru_cache(maxsize=None)
def adapter_classes() -> dict[str, type]:
    """model family -> adapter class, from every ``configs/model/*.yaml``."""
    from hydra.utils import get_class
    out = {}
    for p in sorted((CONFIG_DIR / "model").glob("*.yaml")):
        target = OmegaConf.load(p).get("_target_")
        if target:
            cls = get_class(target)
            out.setdefault(cls.family, cls)
    return out


class Family:
    """An adapter's family and modalities, with the adapter's own ``fit_prompt``."""

    fit_prompt = ModelAdapter.fit_prompt

    def __init__(self, family: str) -> None:
        cls = adapter_classes()[family]
        self.family, self.modalities = family, tuple(cls.modalities)


def prompts(dataset: str) -> dict:
    """The ``prompts`` mapping of ``configs/dataset/<dataset>.yaml`` (with its defaults applied)."""
    return OmegaConf.to_container(compose([f"dataset={dataset}"]).dataset.prompts)


def prompt(task, doc, family: str):
    """``doc``'s prompt for ``family``, as a run builds it."""
    return build_prompt(task, Family(family), doc)
