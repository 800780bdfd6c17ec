"""Qwen2-VL-style video processor in plain torch, for machines without torchvision.

transformers' ``Qwen2VLVideoProcessor`` needs torchvision (there is no CPU build for our torch). This class
reproduces its preprocessing (smart resize to a multiple of patch×merge, bicubic antialiased resize, CLIP
normalisation, temporal padding, the same patch order) so the real ``Qwen2_5_VLProcessor`` /
``Qwen2_5OmniProcessor`` can be assembled around it. Resizing is not bit-identical to torchvision's; where
torchvision exists the adapters use the stock processor (:func:`stock_video_processor_available`).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
import transformers
import transformers.processing_utils as _processing_utils
from transformers.feature_extraction_utils import BatchFeature
from transformers.video_processing_utils import VideoProcessorMixin
from transformers.video_utils import VideoMetadata

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# ProcessorMixin checks attribute classes against `transformers.VideoProcessorMixin`, which is only exported at
# the top level when torchvision is importable (processing_utils looks it up on its own module handle).
for _mod in (transformers, _processing_utils.transformers_module):
    if "VideoProcessorMixin" not in vars(_mod):
        setattr(_mod, "VideoProcessorMixin", VideoProcessorMixin)


def stock_video_processor_available() -> bool:
    try:
        import torchvision  # noqa: F401
        return True
    except Exception:
        return False


def smart_resize(h: int, w: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    hb, wb = max(factor, round(h / factor) * factor), max(factor, round(w / factor) * factor)
    if hb * wb > max_pixels:
        beta = math.sqrt(h * w / max_pixels)
        hb, wb = max(factor, math.floor(h / beta / factor) * factor), max(factor, math.floor(w / beta / factor) * factor)
    elif hb * wb < min_pixels:
        beta = math.sqrt(min_pixels / (h * w))
        hb, wb = math.ceil(h * beta / factor) * factor, math.ceil(w * beta / factor) * factor
    return hb, wb


class TorchQwenVideoProcessor(VideoProcessorMixin):
    """Accepts one video or a list of videos as uint8 arrays [T,H,W,3]; returns Qwen's patchified tensors."""

    model_input_names = ["pixel_values_videos", "video_grid_thw"]

    def __init__(self, patch_size: int = 14, temporal_patch_size: int = 2, merge_size: int = 2,
                 min_pixels: int = 128 * 28 * 28, max_pixels: int = 768 * 28 * 28,
                 image_mean=CLIP_MEAN, image_std=CLIP_STD, fps: float = 2.0, **kwargs):
        for k in ("size", "do_resize", "resample", "do_rescale", "rescale_factor", "do_normalize",
                  "do_convert_rgb", "video_processor_type", "processor_class"):
            kwargs.pop(k, None)
        super().__init__(**kwargs)
        self.patch_size, self.temporal_patch_size, self.merge_size = patch_size, temporal_patch_size, merge_size
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.image_mean, self.image_std, self.fps = list(image_mean), list(image_std), fps

    def _one(self, v, metadata=None) -> tuple[torch.Tensor, list[int], VideoMetadata]:
        frames = torch.as_tensor(np.asarray(v))
        x = frames.permute(0, 3, 1, 2)                                           # T,C,H,W (a view of the frames)
        t, c, h, w = x.shape
        p, tp, m = self.patch_size, self.temporal_patch_size, self.merge_size
        rh, rw = smart_resize(h, w, p * m, self.min_pixels, self.max_pixels)
        if (rh, rw) != (h, w):          # torchvision's resize returns the input unchanged at the same size
            x = F.interpolate(x.float(), size=(rh, rw), mode="bicubic", antialias=True, align_corners=False)
        if pad := -t % self.temporal_patch_size:                  # repeat the last frame
            x = torch.cat([x, x[-1:].expand(pad, -1, -1, -1)])
        t = x.shape[0]
        gt, gh, gw = t // tp, rh // p, rw // p
        # patches first (one copy; of the uint8 frames when nothing was resized), then the float conversion,
        # rescale and normalisation in place on the result: per element the same float32 operations as
        # (x / 255 - mean) / std on the frames
        x = x.view(gt, tp, c, gh // m, m, p, gw // m, m, p).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
        x = x.reshape(gt * gh * gw, c * tp * p * p).float()
        if x.untyped_storage().data_ptr() == frames.untyped_storage().data_ptr():
            x = x.clone()               # float32 frames the reshape could view: never normalise the caller's array
        per_channel = x.view(gt * gh * gw, c, tp * p * p)
        per_channel.div_(255.0).sub_(torch.tensor(self.image_mean)[:, None]).div_(torch.tensor(self.image_std)[:, None])
        if metadata is None:
            meta = VideoMetadata(total_num_frames=t, fps=self.fps, frames_indices=list(range(t)))
        else:           # the caller's (official sampling): its sampled_fps sets the temporal position step
            meta = metadata if isinstance(metadata, VideoMetadata) else VideoMetadata(**metadata)
        return x, [gt, gh, gw], meta

    def __call__(self, videos, return_tensors=None, video_metadata=None, **kwargs):
        if isinstance(videos, (np.ndarray, torch.Tensor)) and np.ndim(videos) == 4:
            videos = [videos]
        videos = [v[0] if isinstance(v, (list, tuple)) and len(v) == 1 else v for v in videos]
        if video_metadata is not None and not isinstance(video_metadata, (list, tuple)):
            video_metadata = [video_metadata]
        metas = list(video_metadata) if video_metadata is not None else [None] * len(videos)
        if len(metas) != len(videos):
            raise ValueError(f"{len(videos)} videos but {len(metas)} video_metadata entries")
        outs = [self._one(v, m) for v, m in zip(videos, metas)]
        data = {"pixel_values_videos": outs[0][0] if len(outs) == 1 else torch.cat([o[0] for o in outs]),
                "video_grid_thw": torch.tensor([o[1] for o in outs])}
        if kwargs.get("return_metadata"):
            data["video_metadata"] = [o[2] for o in outs]
        return BatchFeature(data, tensor_type=return_tensors, skip_tensor_conversion=["video_metadata"])

    def get_num_of_video_patches(self, num_frames, height, width, videos_kwargs=None):
        rh, rw = smart_resize(height, width, self.patch_size * self.merge_size, self.min_pixels, self.max_pixels)
        t = num_frames + (-num_frames % self.temporal_patch_size)
        return t // self.temporal_patch_size * (rh // self.patch_size) * (rw // self.patch_size)


class TorchResizeVideoProcessor(VideoProcessorMixin):
    """A plain-torch stand-in for transformers' LLaVA-OneVision video processor (which needs torchvision): every
    frame resized to ``size`` (bicubic, antialiased; not bit-identical to torchvision), rescaled by 1/255 and
    normalised; ``pixel_values_videos`` is ``[videos, frames, 3, H, W]`` (videos of one call have as many frames)."""

    model_input_names = ["pixel_values_videos"]

    def __init__(self, size: dict | None = None, image_mean=CLIP_MEAN, image_std=CLIP_STD, **kwargs):
        for k in ("do_resize", "resample", "do_rescale", "rescale_factor", "do_normalize", "do_convert_rgb",
                  "video_processor_type", "processor_class", "crop_size", "do_center_crop", "do_sample_frames"):
            kwargs.pop(k, None)
        super().__init__(**kwargs)
        self.size = dict(size or {"height": 384, "width": 384})
        self.image_mean, self.image_std = list(image_mean), list(image_std)

    def _one(self, v) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(v)).permute(0, 3, 1, 2).float()          # T,C,H,W
        h, w = int(self.size["height"]), int(self.size["width"])
        if tuple(x.shape[-2:]) != (h, w):
            x = F.interpolate(x, size=(h, w), mode="bicubic", antialias=True, align_corners=False)
        mean = torch.tensor(self.image_mean).view(1, 3, 1, 1)
        std = torch.tensor(self.image_std).view(1, 3, 1, 1)
        return (x / 255.0 - mean) / std

    def __call__(self, videos, return_tensors=None, **kwargs):
        if isinstance(videos, (np.ndarray, torch.Tensor)) and np.ndim(videos) == 4:
            videos = [videos]
        videos = [v[0] if isinstance(v, (list, tuple)) and len(v) == 1 else v for v in videos]
        return BatchFeature({"pixel_values_videos": torch.stack([self._one(v) for v in videos])},
                            tensor_type=return_tensors)
