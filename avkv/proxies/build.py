"""Trained proxy checkpoints: tiny models of the real classes, trained on CPU on the synthetic AVQA-layout tasks
of :mod:`avkv.tasks.fixtures.proxy`, so CPU runs have an accuracy that KV compression really changes.

===========  ==========================================  ==============================================
proxy        class                                       checkpoint (committed)
===========  ==========================================  ==============================================
``video``    ``Qwen2_5_VLForConditionalGeneration``      ``avkv/models/proxy_checkpoints/proxy_video``
``audio``    ``Qwen2AudioForConditionalGeneration``      ``avkv/models/proxy_checkpoints/proxy_audio``
``av``       ``Qwen2_5OmniThinkerForConditionalGeneration``  ``avkv/models/proxy_checkpoints/proxy_av``
===========  ==========================================  ==============================================

Each starts from its family's tiny builder (``build_tiny``) at proxy sizes: 6 decoder layers (AV) or 4 (video,
audio), hidden 64, 4 query / 2 KV heads, small towers (a 1-block vision tower of width 32, a 2-layer audio encoder
of width 32), a 1024-token BPE tokenizer whose corpus includes the proxy prompts (whole-word tokens, so the media
dominate the prompt), and a processor whose pixel range and audio chunk fit the clips exactly.
``scripts/train_proxy.py`` trains them: 2-layer proxies first (the AV proxy; its towers and decoder warm-start the
other two, whose tensors have the same shapes under other names), then each grown to its depth (``--grow``);
``docs/proxies.md`` tells the story. ``configs/model/proxy_<name>.yaml`` loads them with ``from_pretrained`` through
the ordinary adapters.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from avkv.tasks.fixtures import proxy as tasks

CHECKPOINTS = Path(__file__).resolve().parents[1] / "models" / "proxy_checkpoints"
#: the MC instruction the proxies read (the ``default`` of ``configs/dataset/proxy_<name>.yaml``'s prompts ends with
#: it; ``tests/proxies/test_generator.py`` checks): part of the tokenizer corpus the checkpoints were built with
MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."
#: a larger BPE vocabulary than the tiny models' 640, so the proxies' fixed texts (system prompt, instruction,
#: questions, options) become whole-word tokens and the media dominate the prompt, as in real AV LLMs
VOCAB = 1024
SYSTEM_PROMPTS = ["You are a helpful assistant.",
                  "You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of perceiving "
                  "auditory and visual inputs, as well as generating text and speech."]


@dataclass(frozen=True)
class Proxy:
    name: str
    family: str
    adapter: str              # adapter class path (as in configs/model)
    builder: str              # the family's tiny builder
    build_kwargs: dict

    @property
    def spec(self) -> tasks.ProxySpec:
        return tasks.SPECS[self.name]

    @property
    def checkpoint(self) -> Path:
        return CHECKPOINTS / f"proxy_{self.name}"


def _pixels(spec: tasks.ProxySpec) -> dict:
    n = spec.height * spec.width
    return {"min_pixels": n, "max_pixels": n}


PROXIES = {
    "video": Proxy("video", "qwen2_5_vl", "avkv.models.qwen2_5_vl.Qwen25VLAdapter", "avkv.models.qwen2_5_vl.build_tiny",
                   dict(hidden=64, layers=4, vision_hidden=32, vision_depth=1, vocab_size=VOCAB,
                        **_pixels(tasks.SPECS["video"]))),
    "audio": Proxy("audio", "qwen2_audio", "avkv.models.qwen2_audio.Qwen2AudioAdapter",
                   "avkv.models.qwen2_audio.build_tiny",
                   dict(hidden=64, layers=4, audio_hidden=32, chunk_s=int(tasks.SPECS["audio"].audio_s),
                        vocab_size=VOCAB)),
    "av": Proxy("av", "qwen2_5_omni", "avkv.models.qwen2_5_omni.Qwen25OmniAdapter",
                "avkv.models.qwen2_5_omni.build_tiny",
                dict(hidden=64, layers=6, vision_hidden=32, vision_depth=1, audio_hidden=32,
                     chunk_s=int(tasks.SPECS["av"].audio_s), vocab_size=VOCAB, **_pixels(tasks.SPECS["av"]))),
}


def proxy_task(name: str, root: str | Path):
    """The AVQA task of proxy ``name`` on ``root``, with the prompt text of ``configs/dataset/proxy_<name>.yaml``
    (what a run of that config renders)."""
    from omegaconf import OmegaConf

    from avkv.config import CONFIG_DIR
    from avkv.tasks.avqa import AVQA
    prompts = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "dataset" / f"proxy_{name}.yaml").prompts)
    return AVQA(root=root, prompts=prompts)


def tokenizer_texts() -> list[str]:
    """Every string the proxies read, so the tokenizer spends few tokens on them."""
    from avkv.metrics.text import render_options
    rng = __import__("numpy").random.default_rng(0)
    texts = set(SYSTEM_PROMPTS) | {MC_INSTRUCTION, "system\nuser\nassistant\nAudio 1:"}
    for name in tasks.SPECS:
        for qtype in tasks.SPECS[name].types:
            it = tasks.make_item(rng, name, qtype)
            texts.add(it["question"])
            texts.add(render_options(it["choices"], "paren"))
    return sorted(texts)


def build_init(name: str, out_dir: str | Path, seed: int = 0, layers: int | None = None) -> None:
    """The untrained proxy (random weights), written with ``save_pretrained`` like every checkpoint; ``layers``
    overrides its decoder depth (the earlier, shallower phases of ``make proxies``)."""
    from hydra.utils import get_method
    p = PROXIES[name]
    kwargs = {**p.build_kwargs, **({"layers": layers} if layers else {})}
    get_method(p.builder)(out_dir, seed=seed, texts=tokenizer_texts(), **kwargs)
