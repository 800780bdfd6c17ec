"""Method defaults live in one place: SnapKV's window, kernel, pooling and GQA reduction are written once
(``configs/scorer/snapkv.yaml``, equal to the SnapKV dataclass's defaults) and every method config that wraps SnapKV
composes them (``defaults: [/scorer@scorer: snapkv]``) or, inside a list (Composed), repeats exactly them."""
import dataclasses

import pytest
from omegaconf import OmegaConf

from avkv.config import CONFIG_DIR, compose
from avkv.methods.snapkv import SnapKV
from tests import discover

SNAPKV = "avkv.methods.snapkv.SnapKV"
FILE = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "scorer" / "snapkv.yaml"))


def nodes(x):
    """Every mapping inside a config (nested dicts and lists)."""
    if isinstance(x, dict):
        yield x
        for v in x.values():
            yield from nodes(v)
    elif isinstance(x, list):
        for v in x:
            yield from nodes(v)


def test_the_scorer_file_is_the_dataclass_defaults():
    defaults = {f.name: f.default for f in dataclasses.fields(SnapKV)}
    assert FILE["_target_"] == SNAPKV
    fields = {k: v for k, v in FILE.items() if k != "_target_"}
    assert fields and all(defaults[k] == v for k, v in fields.items()), (fields, defaults)


@pytest.mark.parametrize("name", discover.methods(controls=True))
def test_every_snapkv_in_a_method_config_has_the_defaults(name):
    cfg = OmegaConf.to_container(compose([f"method={name}"], validate_values=False).method, resolve=True)
    for node in nodes(cfg):
        if node.get("_target_") == SNAPKV:
            assert {k: node.get(k) for k in FILE if k != "_target_"} == \
                {k: v for k, v in FILE.items() if k != "_target_"}, name


def test_an_override_still_reaches_the_composed_scorer():
    assert compose(["method=adakv", "method.scorer.window=16"]).method.scorer.window == 16
    assert compose(["method=snapkv", "method.kernel=5"]).method.kernel == 5
