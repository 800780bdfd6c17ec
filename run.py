"""avkv entry point: ``python run.py method=snapkv budget=0.2`` (Hydra; ``-m`` for sweeps)."""
import logging
import sys

import hydra
from omegaconf import DictConfig

from avkv.config import CONFIG_DIR, ConfigError, register_resolvers

register_resolvers()


def _multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    try:
        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:
        return False


@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
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


if __name__ == "__main__":
    from avkv.experiment import mark_launcher
    mark_launcher()                 # a hydra/launcher=local sweep's children stop when this process is gone
    main()
