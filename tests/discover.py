"""What the tests run over, read from ``configs/`` (never a hand-kept list): adding ``configs/method/x.yaml`` puts
method x under the end-to-end and budget-conformance tests, adding ``configs/model/tiny_y.yaml`` puts family y
under the tests that run every tiny family, with nothing else to edit.

Names are config stems; a family is a tiny model config's stem without ``tiny_``.
"""
from __future__ import annotations

from avkv.config import CONFIG_DIR

#: method configs that are controls, not compression methods (the full cache keeps everything at every budget)
CONTROLS = ("full",)


def _stems(group: str, prefix: str = "") -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob(f"{prefix}*.yaml"))


def methods(controls: bool = False) -> list[str]:
    """Every ``configs/method/*.yaml`` (without the controls unless ``controls``)."""
    return [m for m in _stems("method") if controls or m not in CONTROLS]


def tiny_models() -> list[str]:
    """Every ``configs/model/tiny_*.yaml``."""
    return _stems("model", "tiny_")


def tiny_families() -> list[str]:
    """The tiny models as families (``tiny_qwen2_audio`` → ``qwen2_audio``)."""
    return [m[len("tiny_"):] for m in tiny_models()]


def datasets() -> list[str]:
    """Every ``configs/dataset/*.yaml``."""
    return _stems("dataset")
