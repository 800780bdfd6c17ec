"""The plain-torch Qwen video processor against a reference written from Qwen2-VL's preprocessing: frames
(bicubic-antialiased resize only when the smart-resized size differs), rescaled by 1/255, CLIP-normalised, the last
frame repeated to a multiple of the temporal patch, then one row per patch in the order t, h-block, w-block,
h-in-block, w-in-block, each row laid out channel, temporal, y, x. Bit-identical, not close."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from avkv.models.video_processing import CLIP_MEAN, CLIP_STD, TorchQwenVideoProcessor, smart_resize


def reference(frames: np.ndarray, patch=14, tp=2, merge=2, min_pixels=56 * 56, max_pixels=112 * 112):
    x = torch.from_numpy(np.asarray(frames)).float().permute(0, 3, 1, 2)        # T, C, H, W
    T, C, H, W = x.shape
    rh, rw = smart_resize(H, W, patch * merge, min_pixels, max_pixels)
    if (rh, rw) != (H, W):
        x = F.interpolate(x, size=(rh, rw), mode="bicubic", antialias=True, align_corners=False)
    x = (x / 255.0 - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    while x.shape[0] % tp:
        x = torch.cat([x, x[-1:]])
    gt, gh, gw = x.shape[0] // tp, rh // patch, rw // patch
    rows = []
    for t in range(gt):
        for bh in range(gh // merge):
            for bw in range(gw // merge):
                for ih in range(merge):
                    for iw in range(merge):
                        y0, x0 = (bh * merge + ih) * patch, (bw * merge + iw) * patch
                        block = x[t * tp:(t + 1) * tp, :, y0:y0 + patch, x0:x0 + patch]      # tp, C, p, p
                        rows.append(block.permute(1, 0, 2, 3).reshape(-1))
    return torch.stack(rows), [gt, gh, gw]


def frames(t, h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (t, h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("shape,pixels", [
    ((4, 112, 112), (112 * 112, 112 * 112)),      # same size: no resize
    ((3, 112, 112), (112 * 112, 112 * 112)),      # odd frame count: the last frame repeated
    ((4, 90, 130), (56 * 56, 112 * 112)),         # resized
    ((5, 60, 61), (56 * 56, 112 * 112)),          # resized, padded
])
def test_matches_the_reference_bit_for_bit(shape, pixels):
    vp = TorchQwenVideoProcessor(min_pixels=pixels[0], max_pixels=pixels[1])
    v = frames(*shape)
    before = v.copy()
    out = vp(videos=[v], return_tensors="pt")
    ref, grid = reference(v, min_pixels=pixels[0], max_pixels=pixels[1])
    assert out["video_grid_thw"].tolist() == [grid]
    assert out["pixel_values_videos"].dtype == torch.float32
    assert torch.equal(out["pixel_values_videos"], ref)
    assert np.array_equal(v, before)                  # the caller's frames are untouched


def test_several_videos_are_concatenated_in_order():
    vp = TorchQwenVideoProcessor(min_pixels=56 * 56, max_pixels=112 * 112)
    a, b = frames(4, 112, 112, seed=1), frames(3, 84, 84, seed=2)
    out = vp(videos=[a, b], return_tensors="pt")
    ra, ga = reference(a)
    rb, gb = reference(b)
    assert out["video_grid_thw"].tolist() == [ga, gb]
    assert torch.equal(out["pixel_values_videos"], torch.cat([ra, rb]))


def test_float_frames_are_not_normalised_in_place():
    """The processor normalises in place on its own buffer: float32 frames (which ``torch.as_tensor`` shares with
    the caller) stay as they were."""
    vp = TorchQwenVideoProcessor(min_pixels=112 * 112, max_pixels=112 * 112)
    v = frames(2, 112, 112).astype(np.float32)
    before = v.copy()
    out = vp(videos=[v], return_tensors="pt")
    assert np.array_equal(v, before)
    assert torch.equal(out["pixel_values_videos"], reference(v.astype(np.uint8))[0])
