"""avkv entry point: ``python run.py method=snapkv budget=0.2`` (Hydra; ``-m`` for sweeps)."""
import logging

import hydra
from omegaconf import DictConfig

from avkv.config import CONFIG_DIR, register_resolvers

register_resolvers()


@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from avkv.experiment import format_summary, run
    logging.getLogger("avkv").setLevel(logging.INFO)
    summary = run(cfg)
    print(format_summary(summary))


if __name__ == "__main__":
    main()
