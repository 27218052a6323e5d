"""Image/video preprocessing against transformers' Qwen3-VL processors.

Images: bit-for-bit equality with transformers' PIL image processor (the one transformers uses
when torchvision is absent) configured as Qwen3-VL checkpoints ship it. Videos: transformers' video
processor class needs torchvision, so its torch-only pieces (smart_resize, frame sampling,
patchify) are loaded from its source file and compared exactly, and the whole pipeline is checked
against an independent float64 reference.
"""
import importlib.util
import os
import re
import sys
import types

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as hf_pil
from transformers.video_utils import VideoMetadata

from genevolve_jax.processing import image as image_processing


def _hf_image_processor(min_pixels=image_processing.IMAGE_MIN_PIXELS, max_pixels=image_processing.IMAGE_MAX_PIXELS):
    return hf_pil.Qwen2VLImageProcessorPil(size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
                                           patch_size=16, temporal_patch_size=2, merge_size=2,
                                           image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])


@pytest.fixture(scope="module")
def hf_video_module():
    """transformers' Qwen3-VL video processing module, imported from source (its public name is a
    torchvision placeholder here); only torch-only functions are used."""
    import transformers.models.qwen3_vl as pkg
    path = os.path.join(os.path.dirname(pkg.__file__), "video_processing_qwen3_vl.py")
    name = "transformers.models.qwen3_vl._video_processing_source"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _assert_same_as_transformers(images, hf=None, cfg=None):
    hf = hf or _hf_image_processor()
    ref = hf(images=[Image.fromarray(i) if isinstance(i, np.ndarray) else i for i in images], return_tensors="np")
    ours = image_processing.preprocess_images(images, cfg)
    np.testing.assert_array_equal(ours.image_grid_thw, ref["image_grid_thw"])
    assert ours.pixel_values.dtype == ref["pixel_values"].dtype == np.float32
    np.testing.assert_array_equal(ours.pixel_values, ref["pixel_values"])
    return ours


@pytest.mark.parametrize("height,width", [
    (40, 1000),     # extreme landscape
    (2000, 33),     # extreme portrait
    (64, 64),       # below min_pixels: grown
    (7, 300),       # rounds a side to zero before growing
    (257, 383),     # odd sizes
    (512, 512),     # exactly on the grid
])
def test_images_bit_for_bit(height, width):
    rng = np.random.default_rng(height * 7919 + width)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    ours = _assert_same_as_transformers([image])
    t, h, w = ours.image_grid_thw[0]
    assert t == 1 and h % 2 == 0 and w % 2 == 0 and h * w * 256 >= image_processing.IMAGE_MIN_PIXELS


def test_batch_of_differently_sized_and_moded_images_bit_for_bit():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (90, 130, 3), dtype=np.uint8)
    gray = Image.fromarray(rng.integers(0, 256, (50, 70), dtype=np.uint8), mode="L")
    rgba = Image.fromarray(rng.integers(0, 256, (120, 45, 4), dtype=np.uint8), mode="RGBA")
    ours = _assert_same_as_transformers([rgb, gray, rgba])
    assert len(ours.image_grid_thw) == 3


def test_max_pixels_shrink_branch_bit_for_bit():
    """A small max_pixels exercises the downscale branch without a 16-megapixel image."""
    rng = np.random.default_rng(1)
    cfg = image_processing.ImageProcessorConfig(min_pixels=32 * 32, max_pixels=128 * 128)
    hf = _hf_image_processor(32 * 32, 128 * 128)
    for size in [(300, 200), (1000, 41), (129, 129)]:
        image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        ours = _assert_same_as_transformers([image], hf, cfg)
        t, h, w = ours.image_grid_thw[0]
        # within budget, except where a side is already clamped to one merge block (factor)
        assert h * w * 256 <= 128 * 128 or min(h, w) == 2


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(height=st.integers(1, 700), width=st.integers(1, 700), seed=st.integers(0, 2 ** 16))
def test_hypothesis_sizes_bit_for_bit(height, width, seed):
    if max(height, width) / min(height, width) > image_processing.MAX_ASPECT_RATIO:
        with pytest.raises(ValueError, match="aspect ratio"):
            image_processing.smart_resize(height, width)
        return
    image = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    _assert_same_as_transformers([image])


@given(height=st.integers(1, 20000), width=st.integers(1, 20000))
@settings(max_examples=300, deadline=None)
def test_smart_resize_equals_transformers(height, width):
    try:
        want = hf_pil.smart_resize(height, width, factor=32, min_pixels=image_processing.IMAGE_MIN_PIXELS,
                                   max_pixels=image_processing.IMAGE_MAX_PIXELS)
    except ValueError:
        with pytest.raises(ValueError):
            image_processing.smart_resize(height, width)
        return
    assert image_processing.smart_resize(height, width) == want
    assert image_processing.image_grid(height, width) == (1, want[0] // 16, want[1] // 16)


def test_patch_rows_are_merge_blocks_of_conv_patches():
    """Row k of pixel_values is the (C, T, P, P) patch at the k-th position of merge-block order."""
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)
    cfg = image_processing.ImageProcessorConfig(min_pixels=64 * 96, max_pixels=64 * 96)
    patches, grid = image_processing.preprocess_image(image, cfg)
    assert tuple(grid) == (1, 4, 6)
    chw = (image.astype(np.float64) / 255 - 0.5) / 0.5
    k = 0
    for br in range(2):
        for bc in range(3):
            for r in range(2):
                for c in range(2):
                    y, x = (2 * br + r) * 16, (2 * bc + c) * 16
                    patch = chw[y:y + 16, x:x + 16].transpose(2, 0, 1)  # C, P, P
                    want = np.stack([patch, patch], axis=1)            # C, T, P, P
                    np.testing.assert_allclose(patches[k], want.reshape(-1), atol=1e-6)
                    k += 1


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="aspect ratio"):
        image_processing.preprocess_images([np.zeros((2, 500, 3), np.uint8)])
    with pytest.raises(ValueError, match="image 1: .*uint8"):
        image_processing.preprocess_images([np.zeros((40, 40, 3), np.uint8), np.zeros((40, 40, 3), np.float32)])
    with pytest.raises(ValueError, match="shape"):
        image_processing.preprocess_images([np.zeros((40, 40, 2), np.uint8)])
    with pytest.raises(ValueError, match="min_pixels"):
        image_processing.ImageProcessorConfig(min_pixels=100, max_pixels=10)
    with pytest.raises(ValueError, match="patch_size"):
        image_processing.ImageProcessorConfig(patch_size=0)
    with pytest.raises(ValueError, match="VideoProcessorConfig.fps"):
        image_processing.VideoProcessorConfig(fps=0)


# --- video -----------------------------------------------------------------------------------------
def _reference_video(frames: np.ndarray, height: int, width: int, tp=2, p=16, m=2) -> np.ndarray:
    """float64, written with explicit loops: resize, normalise, pad with the last frame, cut patches."""
    resized = np.stack([np.array(Image.fromarray(f).resize((width, height), Image.Resampling.BICUBIC))
                        for f in frames]).astype(np.float64)
    x = (resized / 255.0 - 0.5) / 0.5                                   # T, H, W, C
    while len(x) % tp:
        x = np.concatenate([x, x[-1:]])
    rows = []
    for t in range(len(x) // tp):
        for br in range(height // (p * m)):
            for bc in range(width // (p * m)):
                for r in range(m):
                    for c in range(m):
                        y, xx = (br * m + r) * p, (bc * m + c) * p
                        block = x[t * tp:(t + 1) * tp, y:y + p, xx:xx + p, :]   # T, P, P, C
                        rows.append(block.transpose(3, 0, 1, 2).reshape(-1))      # C, T, P, P
    return np.stack(rows)


@pytest.mark.parametrize("n_frames,height,width", [(2, 48, 80), (3, 100, 60), (5, 20, 700), (4, 10, 10)])
def test_video_against_float64_reference_and_transformers_pieces(n_frames, height, width, hf_video_module):
    rng = np.random.default_rng(n_frames * 1000 + height)
    frames = rng.integers(0, 256, (n_frames, height, width, 3), dtype=np.uint8)
    cfg = image_processing.VideoProcessorConfig()
    patches, grid = image_processing.preprocess_video(list(frames), cfg)
    new_h, new_w = hf_video_module.smart_resize(n_frames, height, width, temporal_factor=2, factor=32,
                                                min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    assert tuple(grid) == ((n_frames + 1) // 2, new_h // 16, new_w // 16)
    np.testing.assert_allclose(patches, _reference_video(frames, new_h, new_w), atol=2e-6, rtol=0)
    # transformers' own arithmetic on the same resized frames: fused normalise, then its patchify.
    resized = np.stack([image_processing.resize_bicubic(f, new_h, new_w) for f in frames])
    video = torch.from_numpy(resized).permute(0, 3, 1, 2)[None].to(torch.float32)
    mean = torch.tensor([0.5] * 3) * (1.0 / (1 / 255))
    std = torch.tensor([0.5] * 3) * (1.0 / (1 / 255))
    video = (video - mean[:, None, None]) / std[:, None, None]
    stub = types.SimpleNamespace()
    ref, t, h, w = hf_video_module.Qwen3VLVideoProcessor.patchify(stub, video, patch_size=16, merge_size=2,
                                                                temporal_patch_size=2)
    assert (t, h, w) == tuple(grid)
    np.testing.assert_array_equal(patches, ref[0].numpy())


@given(n=st.integers(2, 64), height=st.integers(1, 3000), width=st.integers(1, 3000),
       cap=st.booleans())
@settings(max_examples=200, deadline=None)
def test_video_frame_size_equals_transformers(n, height, width, cap, hf_video_module):
    cfg = image_processing.VideoProcessorConfig(cap_pixels_per_frame=cap)
    max_pixels = cfg.max_pixels
    if cap:  # the formula of transformers' Qwen3VLVideoProcessor.resize
        max_pixels = max(min(768 * 32 * 32, cfg.max_pixels // n), int(cfg.min_pixels * 1.05)) * n
    try:
        want = hf_video_module.smart_resize(n, height, width, 2, 32, cfg.min_pixels, max_pixels)
    except ValueError:
        with pytest.raises(ValueError):
            image_processing.video_frame_size(n, height, width, cfg)
        return
    assert image_processing.video_frame_size(n, height, width, cfg) == want


@pytest.mark.parametrize("total,fps", [(100, 30.0), (7, 24.0), (3000, 25.0), (1, 10.0), (50, None)])
def test_frame_sampling_and_timestamps_equal_transformers(total, fps, hf_video_module):
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

    class Placeholders(Qwen3VLProcessor):
        """transformers' video placeholder text (``replace_video_token``) without sub-processors."""

        def __init__(self):
            self.video_token, self.vision_start_token, self.vision_end_token = "V", "<s>", "</s>"
            self.video_processor = types.SimpleNamespace(merge_size=2, temporal_patch_size=2)

    stub = types.SimpleNamespace(fps=2, min_frames=4, max_frames=768)
    want = hf_video_module.Qwen3VLVideoProcessor.sample_frames(stub, VideoMetadata(total_num_frames=total, fps=fps))
    got = image_processing.sample_frame_indices(total, fps)
    np.testing.assert_array_equal(got, want)
    # The timestamps as the prompt shows them, one per temporal patch: "<1.2 seconds><s>V…</s>".
    video_fps = fps or 24.0
    ours = image_processing.frame_timestamps(got, video_fps)
    meta = VideoMetadata(total_num_frames=total, fps=fps, frames_indices=[int(i) for i in want])
    text = Placeholders().replace_video_token({"video_grid_thw": np.asarray([[len(ours), 2, 2]]),
                                               "video_metadata": [meta]}, 0)
    assert re.findall(r"<([0-9.]+) seconds>", text) == [f"{t:.1f}" for t in ours]


def test_video_errors():
    with pytest.raises(ValueError, match="video 0: a video needs at least temporal_patch_size=2 frames"):
        image_processing.preprocess_videos([[np.zeros((64, 64, 3), np.uint8)]])
    with pytest.raises(ValueError, match="frame 1 has size"):
        image_processing.preprocess_video([np.zeros((64, 64, 3), np.uint8), np.zeros((64, 32, 3), np.uint8)])
