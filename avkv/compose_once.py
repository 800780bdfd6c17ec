"""One Hydra composition per ``run.py`` / ``avkv run`` instead of two.

``hydra.main`` composes the config twice for a single run: once to read ``hydra.mode`` (``Hydra.get_mode``, a
composition in MULTIRUN mode without the sweep checks) and once more for the run itself (RUN mode, with
``hydra.mode=RUN`` appended when no config set a mode). Each composition reads and merges the whole config tree
(0.15–0.8 s on a 2-core machine, more under load), so the first one is pure start-up cost.

:func:`compose_once` (used by :func:`avkv.app.main` when the command line has no ``-m``) makes the probe compose in
RUN mode, with the checks a run applies, and keeps that config; the run's composition then reuses it, applying the
``hydra.mode=RUN`` Hydra appended in the same way Hydra's override would (the value, and the line in
``hydra.overrides.hydra``). Whenever the RUN-mode probe fails (a sweep override, a missing group: Hydra reports
those itself) or a config sets ``hydra.mode: MULTIRUN``, the probe falls back to Hydra's own composition, and any
composition that is not exactly the run's first (a sweep's jobs, ``--cfg``) goes to Hydra unchanged.
``tests/test_compose_once.py`` checks the composed config is the one Hydra composes by itself.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

#: the override Hydra's ``_run_app`` appends to a run's overrides when no config set ``hydra.mode``
_RUN_MODE_OVERRIDE = "hydra.mode=RUN"


@contextmanager
def compose_once() -> Iterator[dict]:
    """While active, Hydra's mode probe composes the run's config and the run's own composition reuses it.
    Yields counters (``compositions``: the compositions done, ``reused``: those served from the probe)."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra.types import RunMode

    original = ConfigLoaderImpl.load_configuration
    kept: dict = {}
    stats = {"compositions": 0, "reused": 0}

    def compose(self, config_name, overrides, run_mode, from_shell=True, validate_sweep_overrides=True):
        stats["compositions"] += 1
        return original(self, config_name=config_name, overrides=overrides, run_mode=run_mode,
                        from_shell=from_shell, validate_sweep_overrides=validate_sweep_overrides)

    def load_configuration(self, config_name, overrides, run_mode, from_shell=True, validate_sweep_overrides=True):
        overrides = list(overrides)
        probe = run_mode == RunMode.MULTIRUN and not validate_sweep_overrides
        if probe and not kept.get("used"):                       # Hydra.get_mode: only cfg.hydra.mode is read
            kept["used"] = True
            try:
                cfg = compose(self, config_name, overrides, RunMode.RUN, from_shell, True)
            except Exception:  # noqa: BLE001 - Hydra's own probe below decides (and reports) as before
                cfg = None
            if cfg is not None and cfg.hydra.mode in (None, RunMode.RUN):
                kept.update(loader=self, name=config_name, overrides=overrides, from_shell=from_shell, cfg=cfg)
                return cfg
            return compose(self, config_name, overrides, run_mode, from_shell, validate_sweep_overrides)
        cfg = kept.pop("cfg", None)
        if cfg is not None and run_mode == RunMode.RUN and validate_sweep_overrides and self is kept["loader"] \
                and config_name == kept["name"] and from_shell == kept["from_shell"]:
            extra = overrides[len(kept["overrides"]):]
            if overrides[:len(kept["overrides"])] == kept["overrides"] and extra in ([], [_RUN_MODE_OVERRIDE]):
                if extra:                                        # what Hydra's hydra.mode=RUN override does
                    cfg.hydra.mode = RunMode.RUN
                    cfg.hydra.overrides.hydra.append(_RUN_MODE_OVERRIDE)
                stats["reused"] += 1
                return cfg
        return compose(self, config_name, overrides, run_mode, from_shell, validate_sweep_overrides)

    ConfigLoaderImpl.load_configuration = load_configuration
    try:
        yield stats
    finally:
        ConfigLoaderImpl.load_configuration = original
