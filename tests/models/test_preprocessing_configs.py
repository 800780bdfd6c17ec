"""Every real-model config names its preprocessing source; the Qwen ones default to the official mode with the
packages' defaults spelled out; the tiny and proxy configs keep the fixed_frames path their checkpoints use."""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from avkv.config import ROOT
from avkv.models import media_io

CONFIGS = sorted((ROOT / "configs" / "model").glob("*.yaml"))


@pytest.mark.parametrize("path", [p for p in CONFIGS if "hub_id" in p.read_text()], ids=lambda p: p.stem)
def test_real_model_configs_document_their_preprocessing(path):
    cfg = OmegaConf.load(path)
    src = cfg.get("preprocessing_source")
    assert src and any(s in src for s in ("==", " 0.", "commit", " at ")), f"{path.name}: no source version"
    if cfg["_target_"].startswith("avkv.models.qwen"):
        assert cfg.preprocessing == "official"
        off = OmegaConf.to_container(cfg.official)
        assert set(off) <= set(media_io.OFFICIAL_DEFAULTS)
        assert all(media_io.OFFICIAL_DEFAULTS[k] == v for k, v in off.items()), "official block != package defaults"
    if "videollama2" in cfg["_target_"]:
        assert cfg.dtype == "float16"


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.stem.startswith(("tiny_qwen", "proxy_"))],
                         ids=lambda p: p.stem)
def test_tiny_and_proxy_configs_keep_fixed_frames(path):
    assert OmegaConf.load(path).preprocessing == "fixed_frames"


def test_bad_preprocessing_values_name_the_key(tmp_path):
    from avkv.config import compose, instantiate
    from tests.conftest import tiny_model_dir
    tiny_model_dir("tiny_qwen2_audio")
    with pytest.raises(Exception, match="model.preprocessing"):
        instantiate(compose(["model=tiny_qwen2_audio", "model.preprocessing=offical"]).model, device="cpu")
    with pytest.raises(Exception, match="model.official"):
        instantiate(compose(["model=tiny_qwen2_audio", "+model.official={fsp: 2}"]).model, device="cpu")
