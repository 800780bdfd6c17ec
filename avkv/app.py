"""The Hydra application behind ``avkv run`` and ``python run.py``: one config, one run (``-m`` for sweeps).

Before Hydra composes, :func:`main` checks every override against the config tree
(:func:`avkv.config.check_overrides`: an unknown key or group option is one line naming the closest match), so a
typo never reaches Hydra's traceback; the values themselves are checked by :func:`avkv.config.validate` before
any dataset or model loads. A single run composes the config once (:mod:`avkv.compose_once`; ``hydra.main`` alone
composes it twice).
"""
from __future__ import annotations

import logging
import sys
from typing import Sequence

import hydra
from omegaconf import DictConfig

from avkv.config import CONFIG_DIR, ConfigError, OverrideError, register_resolvers, require_known_overrides

register_resolvers()


def _multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    try:
        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:
        return False


@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")
def hydra_main(cfg: DictConfig) -> None:
    from avkv.experiment import format_summary, run
    from avkv.models.base import CheckpointMissing, UnsafeCheckpoint
    from avkv.results import RunLocked
    from avkv.tasks.base import DatasetError
    logging.getLogger("avkv").setLevel(logging.INFO)
    try:
        summary = run(cfg)
    except RunLocked as e:
        print(f"avkv: {e}", file=sys.stderr)
        if _multirun():                  # a sweep goes on with its other points; this one is running elsewhere
            return
        sys.exit(2)
    except (ConfigError, DatasetError, CheckpointMissing, UnsafeCheckpoint) as e:   # names the key or file
        print(f"avkv: {e}", file=sys.stderr)
        sys.exit(2)
    print(format_summary(summary))


def main(argv: Sequence[str] | None = None, prog: str = "avkv run") -> int:
    """``avkv run [-m] key=value ...``: check the overrides, then hand them to Hydra."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        require_known_overrides(args)
    except OverrideError as e:
        for line in e.messages:
            print(f"{prog}: {line}", file=sys.stderr)
        return 2
    from avkv.experiment import mark_launcher
    mark_launcher()                 # a hydra/launcher=local sweep's children stop when this process is gone
    sys.argv = [prog.replace(" ", "-"), *args]
    if any(a in ("-m", "--multirun") for a in args):
        hydra_main()                # a sweep: Hydra composes the sweep config and each job's as always
    else:
        from avkv.compose_once import compose_once
        with compose_once():        # one composition, not Hydra's two (avkv/compose_once.py)
            hydra_main()
    return 0
