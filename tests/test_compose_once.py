"""A single run composes the config once (avkv/compose_once.py), and the config is the one hydra.main composes by
itself (twice): the same values, the same hydra node (mode, overrides, run dir, job name, choices)."""
from __future__ import annotations

import sys

import hydra
import pytest
from omegaconf import OmegaConf

from avkv.compose_once import compose_once
from avkv.config import CONFIG_DIR, register_resolvers


def _hydra_run(argv: list[str], once: bool, tmp_path) -> tuple[str, dict]:
    """Run a hydra.main app on avkv's config with ``argv``; the composed config (unresolved YAML, runtime.cwd and
    output_dir dropped) and the counters."""
    from hydra.core.hydra_config import HydraConfig
    register_resolvers()
    seen = {}

    @hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")
    def app(cfg):
        seen["cfg"] = OmegaConf.to_yaml(cfg, resolve=False)
        h = OmegaConf.to_container(HydraConfig.get(), resolve=False)
        h["runtime"].pop("output_dir", None)
        h["runtime"].pop("cwd", None)
        seen["hydra"] = OmegaConf.to_yaml(OmegaConf.create(h))
        seen["mode"] = str(HydraConfig.get().mode)

    old = sys.argv
    sys.argv = ["run.py", *argv, f"hydra.run.dir={tmp_path / 'h'}"]
    try:
        if once:
            with compose_once() as stats:
                app()
        else:
            stats = {}
            app()
    finally:
        sys.argv = old
    return seen, stats


@pytest.mark.parametrize("argv", [[], ["method=h2o", "budget=0.3", "model.num_frames=4"],
                                  ["hydra.mode=RUN", "seed=3"], ["experiment=budget_curves", "smoke=tiny"]])
def test_one_composition_gives_hydras_config(argv, tmp_path):
    twice, _ = _hydra_run(argv, once=False, tmp_path=tmp_path)
    once, stats = _hydra_run(argv, once=True, tmp_path=tmp_path)
    assert stats == {"compositions": 1, "reused": 1}
    assert once["mode"] == twice["mode"] == "RunMode.RUN"
    assert once["cfg"] == twice["cfg"]
    assert once["hydra"] == twice["hydra"]


def test_a_config_that_asks_for_multirun_still_gets_hydras_composition(tmp_path):
    """hydra.mode=MULTIRUN without -m: the RUN-mode probe sees it, Hydra's own probe and sweep compositions run and
    nothing is reused; the job's config is the one Hydra composes by itself."""
    argv = ["hydra.mode=MULTIRUN", f"hydra.sweep.dir={tmp_path / 's'}", "seed=2"]
    twice, _ = _hydra_run(argv, once=False, tmp_path=tmp_path)
    once, stats = _hydra_run(argv, once=True, tmp_path=tmp_path)
    assert stats["reused"] == 0
    assert once["mode"] == twice["mode"] == "RunMode.MULTIRUN"
    assert once["cfg"] == twice["cfg"]
