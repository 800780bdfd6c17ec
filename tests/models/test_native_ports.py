"""What every native port (avkv/models/native.py: MobileVLM, VideoLLaMA2) must do with its official checkpoint
layout: a save/load round trip under the official names, a deterministic tiny builder, a strict loader that names
every renamed, missing, extra or wrong-shape tensor, a vision tower from a separate folder, pickle weights only when
opted in. Port-specific loading rules (MobileVLM's legacy buffers and non-v2 towers, VideoLLaMA2's shared tensors)
are tested in the ports' own files."""
from __future__ import annotations

import shutil
from dataclasses import dataclass

import pytest
import torch

from avkv.models import mobilevlm, videollama2
from avkv.models.native import CheckpointKeyError, official_state_dict
from tests.conftest import tiny_model_dir


@dataclass(frozen=True)
class Port:
    tiny: str                   # tiny model config
    module: object              # the port's package (from_pretrained, build_tiny)
    renamed: tuple[str, str]    # a projector tensor and a name the module tree does not have
    reshaped: str               # a tensor whose shape the test breaks


PORTS = {
    "mobilevlm": Port("tiny_mobilevlm", mobilevlm,
                      ("model.mm_projector.peg.peg.0.weight", "model.mm_projector.peg.0.weight"),
                      "model.mm_projector.mlp.mlp.2.weight"),
    "videollama2_av": Port("tiny_videollama2_av", videollama2,
                           ("model.mm_projector.s1.b1.conv2.conv.weight",
                            "model.mm_projector.s1.b1.conv_2.conv.weight"),
                           "model.mm_projector.readout.0.weight"),
}


@pytest.fixture(params=list(PORTS))
def port(request):
    p = PORTS[request.param]
    return p, tiny_model_dir(p.tiny)


def rewrite(src, dst, edit):
    """A copy of checkpoint folder ``src`` whose tensors ``edit(state_dict)`` changed."""
    from safetensors.torch import load_file, save_file
    shutil.copytree(src, dst)
    sd = load_file(str(src / "model.safetensors"))
    edit(sd)
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_save_load_round_trip_and_deterministic_builder(port, tmp_path):
    p, tiny = port
    from safetensors.torch import load_file
    saved = load_file(str(tiny / "model.safetensors"))
    model = p.module.from_pretrained(tiny)
    assert model.load_report["tensors"] == len(saved) and model.load_report["vision_tower"] == "checkpoint"
    for k, v in official_state_dict(model).items():
        assert torch.equal(saved[k], v), k
    again = p.module.build_tiny(tmp_path / "again")            # fixed seed: the same bytes
    assert (again / "model.safetensors").read_bytes() == (tiny / "model.safetensors").read_bytes()
    toks = sorted(f.name for f in tiny.glob("tokenizer*"))
    assert toks and all((again / f).read_bytes() == (tiny / f).read_bytes() for f in toks)


def test_strict_loading_names_renamed_missing_and_extra_keys(port, tmp_path):
    p, tiny = port
    key, new = p.renamed
    bad = rewrite(tiny, tmp_path / "renamed", lambda sd: sd.__setitem__(new, sd.pop(key)))
    with pytest.raises(CheckpointKeyError) as e:
        p.module.from_pretrained(bad)
    msg = str(e.value)
    assert new in msg and "unexpected" in msg
    assert key in msg and "missing" in msg
    gone = "model.layers.1.mlp.down_proj.weight"
    bad2 = rewrite(tiny, tmp_path / "missing", lambda sd: sd.pop(gone))
    with pytest.raises(CheckpointKeyError, match="1 missing tensor name") as e:
        p.module.from_pretrained(bad2)
    assert gone in str(e.value) and "unexpected" not in str(e.value)
    extra = rewrite(tiny, tmp_path / "extra", lambda sd: sd.__setitem__("model.mm_projector.extra.weight",
                                                                         torch.zeros(1)))
    with pytest.raises(CheckpointKeyError, match="(?s)1 unexpected tensor name.*model.mm_projector.extra.weight"):
        p.module.from_pretrained(extra)


def test_strict_loading_names_a_shape_mismatch(port, tmp_path):
    p, tiny = port
    k = p.reshaped
    bad = rewrite(tiny, tmp_path / "shape", lambda sd: sd.__setitem__(k, sd[k][:, :-1].clone()))
    with pytest.raises(CheckpointKeyError, match=f"{k}: checkpoint .* vs model"):
        p.module.from_pretrained(bad)


def test_checkpoint_without_a_vision_tower_needs_vision_tower_path(port, tmp_path):
    p, tiny = port
    from safetensors.torch import load_file, save_file
    tower = "model.vision_tower.vision_tower."
    no_tower = rewrite(tiny, tmp_path / "no_tower",
                       lambda sd: [sd.pop(k) for k in [k for k in sd if k.startswith(tower)]])
    with pytest.raises(CheckpointKeyError, match="vision_tower_path"):
        p.module.from_pretrained(no_tower)
    # a CLIP / SigLIP folder as transformers 4.x saves it (vision_model.* names) fills the tower
    sd = load_file(str(tiny / "model.safetensors"))
    vdir = tmp_path / "tower"
    vdir.mkdir()
    save_file({k[len(tower):]: v for k, v in sd.items() if k.startswith(tower)}, str(vdir / "model.safetensors"))
    m = p.module.from_pretrained(no_tower, vision_tower_path=vdir)
    ref = p.module.from_pretrained(tiny)
    assert m.load_report["vision_tower"] == str(vdir)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), ref.state_dict().values()))


def test_pickle_weights_only_with_opt_in(port, tmp_path):
    p, tiny = port
    from safetensors.torch import load_file
    d = tmp_path / "bin"
    shutil.copytree(tiny, d)
    torch.save(load_file(str(d / "model.safetensors")), d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="allow_pickle_weights"):
        p.module.from_pretrained(d)
    m = p.module.from_pretrained(d, allow_pickle=True)
    ref = p.module.from_pretrained(tiny)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), ref.state_dict().values()))
