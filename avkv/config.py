"""Hydra/OmegaConf helpers: the repo-root resolver and config → objects."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = ROOT / "configs"

#: keys of a model/dataset config group that describe the entry and are not constructor arguments
META_KEYS = ("name", "tiny_builder", "hub_id", "families", "notes", "preprocessing_source")


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("avkv_root"):
        OmegaConf.register_new_resolver("avkv_root", lambda: str(ROOT))
    from avkv.grid import register_resolvers as _sweep_resolvers  # ${avkv.sweep:...} in experiment presets
    _sweep_resolvers()


def constructor_args(node: DictConfig | dict) -> dict:
    """A group's config minus descriptive keys, resolved to plain Python."""
    d = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    return {k: v for k, v in d.items() if k not in META_KEYS}


def instantiate(node: DictConfig | dict, **extra: Any) -> Any:
    from hydra.utils import instantiate as _inst
    return _inst(constructor_args(node), **extra)


def compose(overrides: list[str] | None = None) -> DictConfig:
    """Compose ``configs/config.yaml`` with overrides outside a Hydra app (tests, notebooks)."""
    from hydra import compose as _compose, initialize_config_dir
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return _compose(config_name="config", overrides=list(overrides or []))


register_resolvers()
