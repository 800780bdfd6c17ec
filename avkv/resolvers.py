"""The ``${avkv.sweep:...}`` and ``${avkv.available:...}`` resolvers of the experiment presets.

They live here, below :mod:`avkv.config` (which registers them with its own) and :mod:`avkv.grid` (which
re-exports them), so neither module needs the other at import: no import circle.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from omegaconf import ListConfig, OmegaConf


def as_list(x: Any) -> list:
    if isinstance(x, (ListConfig, list, tuple)):
        return list(x)
    if isinstance(x, str):
        return [s.strip() for s in x.split(",") if s.strip()]
    return [x]


def sweep_string(values: Any) -> str:
    """``[a, b, 0.2]`` → ``"a,b,0.2"`` (Hydra's sweep syntax; a single value stays a plain override)."""
    items = as_list(values)
    if not items:
        raise ValueError("an empty sweep list")
    return ",".join(str(v) for v in items)


def available(values: Any, group: str = "method", config_dir: str | Path | None = None) -> str:
    """The names in ``values`` that have a config in group ``group``, as a sweep string (in the given order).

    Asks the running Hydra's config repository (every config source, as composition would); outside Hydra, or
    with ``config_dir``, looks for ``<config_dir>/<group>/<name>.yaml``.
    """
    names = as_list(values)
    options = None
    if config_dir is None:
        from hydra.core.global_hydra import GlobalHydra

        if GlobalHydra.instance().is_initialized():
            options = set(GlobalHydra.instance().config_loader().get_group_options(group))
    if options is None:
        root = Path(config_dir) if config_dir else _config_dir()
        options = {p.stem for p in (root / group).glob("*.yaml")}
    items = [v for v in names if str(v) in options]
    if not items:
        raise ValueError(f"none of {names} has a config in group {group!r}")
    return ",".join(str(v) for v in items)


def register(config_dir: Callable[[], Path]) -> None:
    """Register both resolvers (idempotent); ``config_dir`` gives the default ``configs/`` of ``available``."""
    global _CONFIG_DIR
    _CONFIG_DIR = config_dir
    for name, fn in (("avkv.sweep", sweep_string), ("avkv.available", available)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


_CONFIG_DIR: Callable[[], Path] | None = None


def _config_dir() -> Path:
    if _CONFIG_DIR is None:
        raise RuntimeError("avkv.resolvers.register was not called (avkv.config registers it)")
    return _CONFIG_DIR()
