"""What the tests run over, read from ``configs/`` and the classes they name (never a hand-kept list): adding
``configs/method/x.yaml`` puts method x under the end-to-end and budget-conformance tests (and, where its class
declares ``kvpress``, under the kvpress port tests), adding ``configs/model/tiny_y.yaml`` puts family y under the
tests that run every tiny family, with nothing else to edit.

Names are config stems; a family is a tiny model config's stem without ``tiny_``. A *variant* is a tiny config that
extends another's stem and names the same adapter class (``tiny_qwen2_5_omni_deep``: the Omni with 8 layers).
"""
from __future__ import annotations

import functools

from omegaconf import OmegaConf

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


def tiny_families(variants: bool = True) -> list[str]:
    """The tiny models as families (``tiny_qwen2_audio`` → ``qwen2_audio``), without the variants unless
    ``variants``."""
    models = tiny_models()
    if not variants:
        models = [m for m in models if not any(m.startswith(f"{o}_") and _target(m) == _target(o)
                                               for o in models if o != m)]
    return [m[len("tiny_"):] for m in models]


@functools.lru_cache(maxsize=None)
def _target(model: str) -> str | None:
    return OmegaConf.load(CONFIG_DIR / "model" / f"{model}.yaml").get("_target_")


def adapter_class(model: str) -> type:
    """The adapter class ``configs/model/<model>.yaml`` names (imported, no model loaded): its ``family`` and
    declared ``modalities``."""
    from hydra.utils import get_class
    return get_class(_target(model))


def datasets() -> list[str]:
    """Every ``configs/dataset/*.yaml``."""
    return _stems("dataset")


@functools.lru_cache(maxsize=None)
def method_class(name: str) -> type:
    """The class ``configs/method/<name>.yaml`` composes to (imported, nothing instantiated): its declared flags."""
    from hydra.utils import get_class

    from avkv.config import compose
    return get_class(compose([f"method={name}"]).method._target_)


def kvpress_ports() -> dict[str, str]:
    """Method config → the kvpress press its class declares it reproduces (``Method.kvpress``), for every
    ``configs/method/*.yaml`` whose class is a port."""
    return {m: method_class(m).kvpress for m in methods() if method_class(m).kvpress}
