"""InternVL 2.5 / 3 in the transformers format (``InternVLForConditionalGeneration``; InternViT, pixel-shuffle MLP
projector, 1-D RoPE decoder).

Real checkpoints: an HF-format folder (``model_type: internvl``; e.g. ``OpenGVLab/InternVL3-8B-hf``). The
InternVL2.5-8B FlowMM evaluates is published in the remote-code format (``OpenGVLab/InternVL2_5-8B``, InternLM2
decoder); avkv does not run remote code, so that checkpoint must first be converted to the transformers format
(transformers' InternVL conversion script, which rewrites InternLM2 as a Llama decoder). The checkpoint's processor
tiles each image (dynamic 448 px tiles plus a thumbnail, 256 tokens each) and its chat template is used.

Each image is the processor's context token (``<IMG_CONTEXT>\\n``) and each video its ``<video>\\n`` tag at its place
in the prompt (:mod:`avkv.models.hf_vlm`). The processor writes a video as ``FrameK: <img>…</img>`` image runs with
the image placeholder, so the adapter marks the runs of video items as video positions (frame = run, spatial =
place in the run) by walking the ``<img>`` runs in prompt order.
"""
from __future__ import annotations

from pathlib import Path

import torch

from avkv.models.hf_vlm import TagAdapter
from avkv.schema import IMAGE, VIDEO, Prompt


class InternVLAdapter(TagAdapter):
    family = "internvl"
    modalities = ("image", "video")

    def _load(self):
        from transformers import InternVLForConditionalGeneration
        model = InternVLForConditionalGeneration.from_pretrained(self.path, **self._from_pretrained_kwargs())
        proc = load_processor(self.path, self.trust_remote_code, **self.processor_kwargs)
        self.placeholder_tokens = {"image": proc.image_token}
        self.media_tags = {"image": proc.image_token + "\n", "video": proc.video_token + "\n"}
        return model.to(self.device), proc

    def encode_decoded(self, prompt: Prompt, decoded: list, media_s: float = 0.0):
        enc = super().encode_decoded(prompt, decoded, media_s)
        kinds = [m.kind for m in prompt.context if not isinstance(m, str) and m.kind in self.media_tags]
        if "video" not in kinds:
            return enc
        ids = enc.input_ids[0]
        starts = (ids == self.processor.start_image_token_id).nonzero().flatten().tolist()
        ends = (ids == self.processor.end_image_token_id).nonzero().flatten().tolist()
        frames = enc.inputs["pixel_values"].shape[0]
        runs = iter(zip(starts, ends))
        frame, spatial = torch.full_like(enc.modality, -1), torch.full_like(enc.modality, -1)
        n_frames = [int(d["frames"].shape[0]) for m, d in zip(prompt.context, decoded)
                    if not isinstance(m, str) and m.kind == "video"]
        video_i, t_offset = 0, 0
        for kind in kinds:
            n_runs = n_frames[video_i] if kind == "video" else 1
            for k in range(n_runs):
                a, b = next(runs)
                if kind == "video":
                    enc.modality[a + 1:b] = VIDEO
                    frame[a + 1:b] = t_offset + k
                    spatial[a + 1:b] = torch.arange(b - a - 1)
            if kind == "video":
                t_offset += n_runs
                video_i += 1
        if next(runs, None) is not None or not frames:
            raise ValueError("internvl: the <img> runs do not match the prompt's media items")
        enc.layout = {"video_frame": frame, "video_spatial": spatial}
        enc.modalities_used = sorted({"image" if c == IMAGE else "video" for c in enc.modality.unique().tolist()
                                      if c in (IMAGE, VIDEO)})
        return enc

    def _video_layout(self, inputs: dict, modality: torch.Tensor) -> dict:
        return {}


def load_processor(path: Path, trust_remote_code: bool = False, **kwargs):
    """The checkpoint's processor; without torchvision it is assembled from its parts with a torch video processor."""
    import json

    from transformers import AutoProcessor, AutoTokenizer, InternVLProcessor
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    from avkv.models.video_processing import TorchResizeVideoProcessor, stock_video_processor_available
    if stock_video_processor_available():
        return AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
    f = Path(path) / "processor_config.json"
    cfg = {k: v for k, v in (json.loads(f.read_text()) if f.is_file() else {}).items() if k == "image_seq_length"}
    tmpl = Path(path) / "chat_template.jinja"
    return InternVLProcessor(image_processor=GotOcr2ImageProcessorPil.from_pretrained(path, **kwargs),
                             tokenizer=AutoTokenizer.from_pretrained(path),
                             video_processor=TorchResizeVideoProcessor.from_pretrained(path, **kwargs),
                             chat_template=tmpl.read_text() if tmpl.is_file() else None, **cfg)


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def build_tiny(out_dir: str | Path, seed: int = 0, hidden: int = 64, vision_hidden: int = 32, image_size: int = 224,
               vocab_size: int = 640, layers: int = 2) -> None:
    """Tiny random InternVL: a Qwen2 decoder of ``layers`` layers (hidden 64, 4 heads / 2 KV heads; InternVL 2.5/3
    use InternLM2-as-Llama or Qwen2.5 decoders, both the Llama attention recipe), a 2-layer InternViT on
    ``image_size`` px tiles (patch 14, pixel shuffle 0.5: 64 tokens per tile), dynamic tiling up to 4 tiles plus the
    thumbnail, ImageNet normalisation."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLProcessor, \
        PreTrainedTokenizerFast
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    from avkv.models.tiny import atomic_dir, chat_template, train_tokenizer
    from avkv.models.video_processing import TorchResizeVideoProcessor
    torch.manual_seed(seed)
    template = chat_template("internvl")
    names = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
             "video_token": "<video>"}
    tok = PreTrainedTokenizerFast(tokenizer_object=train_tokenizer(vocab_size, extra_specials=list(names.values())),
                                  eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=template,
                                  extra_special_tokens=names)
    t = tok.convert_tokens_to_ids
    seq = (image_size // 14) ** 2 // 4
    cfg = InternVLConfig(
        vision_config=dict(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_hidden_layers=2,
                           num_attention_heads=2, image_size=[image_size, image_size], patch_size=[14, 14]),
        text_config=dict(model_type="qwen2", vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096, bos_token_id=t("<|endoftext|>"), eos_token_id=t("<|im_end|>"),
                         pad_token_id=t("<|endoftext|>")),
        image_token_id=t("<IMG_CONTEXT>"), image_seq_length=seq, downsample_ratio=0.5, vision_feature_layer=-1,
        tie_word_embeddings=False)
    model = InternVLForConditionalGeneration(cfg).eval()
    model.generation_config.eos_token_id = t("<|im_end|>")
    size = {"height": image_size, "width": image_size}
    ip = GotOcr2ImageProcessorPil(size=size, crop_to_patches=True, min_patches=1, max_patches=4,
                                  image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)
    vp = TorchResizeVideoProcessor(size=size, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)
    proc = InternVLProcessor(image_processor=ip, tokenizer=tok, video_processor=vp, image_seq_length=seq,
                             chat_template=template)
    with atomic_dir(out_dir) as d:
        model.save_pretrained(d)
        proc.save_pretrained(d)
        proc.video_processor.save_pretrained(d)
