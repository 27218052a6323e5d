"""The tiny random Qwen-Image pipelines render deterministically from a seed on CPU."""
import asyncio

import numpy as np
import pytest
from PIL import Image

from genevolve_jax.render.base import RenderError, RenderRequest, SamplingParams
from genevolve_jax.render.diffusers_renderer import DiffusersRenderer
from genevolve_jax.render.tiny import TINY_CONDITION_AREA, tiny_renderer


@pytest.fixture(scope="module")
def renderer():
    return tiny_renderer(seed=0, long_side=32, num_inference_steps=2)


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    rng = np.random.default_rng(7)
    d = tmp_path_factory.mktemp("refs")
    paths = []
    for i, (h, w) in enumerate([(40, 60), (50, 30)]):  # first reference is landscape 3:2
        p = d / f"ref{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    return tuple(paths)


def test_pipelines_are_the_qwen_image_classes(renderer):
    from diffusers import QwenImageEditPlusPipeline, QwenImagePipeline

    assert isinstance(renderer.edit_pipeline, QwenImageEditPlusPipeline)
    assert isinstance(renderer.text_pipeline, QwenImagePipeline)


def test_same_seed_same_pixels_other_seed_other_pixels(renderer, refs):
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as edit_plus

    a = np.asarray(renderer.render_sync(RenderRequest("a red fox on a blue sign", refs, seed=11)))
    b = np.asarray(asyncio.run(renderer.render(RenderRequest("a red fox on a blue sign", refs, seed=11))))
    c = np.asarray(renderer.render_sync(RenderRequest("a red fox on a blue sign", refs, seed=12)))
    # long side 32 following the first reference's 3:2 aspect, in multiples of 16
    assert a.shape == (16, 32, 3)  # 32 x 21.3 -> 32 x 16
    np.testing.assert_array_equal(a, b)
    assert np.abs(a.astype(int) - c.astype(int)).max() > 0
    assert a.std() > 0  # an actual image, not a constant fill
    # the tiny pipeline's smaller reference sizes are restored after each call
    assert edit_plus.CONDITION_IMAGE_SIZE == 384 * 384 and edit_plus.VAE_IMAGE_SIZE == 1024 * 1024
    assert TINY_CONDITION_AREA < edit_plus.CONDITION_IMAGE_SIZE


def test_a_run_renderer_builds_its_pipelines_at_the_first_render_once(renderer, refs, monkeypatch):
    """build_renderer's tiny renderer (a run's) defers torch, diffusers and the pipelines to its
    first render: same id and same pixels as the eager one, built once under concurrent renders."""
    from concurrent.futures import ThreadPoolExecutor

    from genevolve_jax.config_loader import load_config
    from genevolve_jax.render import tiny
    from genevolve_jax.render.factory import build_renderer

    builds = []
    build = tiny.build_tiny_pipelines
    monkeypatch.setattr(tiny, "build_tiny_pipelines", lambda seed: builds.append(seed) or build(seed))

    cfg = load_config("tiny_cpu").render
    cfg.tiny.init_seed, cfg.tiny.long_side, cfg.tiny.num_inference_steps = 0, 32, 2
    deferred = build_renderer(cfg)
    assert deferred.renderer_id == renderer.renderer_id
    assert deferred.edit_pipeline is None and deferred.text_pipeline is None and builds == []  # nothing built yet
    requests = [RenderRequest("a red fox on a blue sign", refs, seed=11), RenderRequest("a lighthouse", (), seed=3)]
    with ThreadPoolExecutor(4) as pool:
        images = list(pool.map(deferred.render_sync, requests * 2))
    edit = deferred.edit_pipeline
    assert edit is not None and deferred.text_pipeline.transformer is edit.transformer   # one build, shared
    for request, image in zip(requests * 2, images):
        np.testing.assert_array_equal(np.asarray(image), np.asarray(renderer.render_sync(request)))
    deferred.render_sync(requests[0])
    assert builds == [0] and deferred.edit_pipeline is edit                        # built once, for seed 0


def test_no_reference_uses_text_to_image_fallback(renderer):
    img = renderer.render_sync(RenderRequest("a lighthouse at dusk", (), seed=3))
    again = renderer.render_sync(RenderRequest("a lighthouse at dusk", (), seed=3))
    assert img.size == (32, 32)
    np.testing.assert_array_equal(np.asarray(img), np.asarray(again))


def test_missing_pieces_fail_with_reasons(renderer, refs, tmp_path):
    edit_only = DiffusersRenderer(renderer.edit_pipeline, None, SamplingParams(num_inference_steps=1, long_side=32))
    with pytest.raises(RenderError, match="at least one reference"):
        edit_only.render_sync(RenderRequest("x", (), seed=0))
    with pytest.raises(RenderError, match="cannot be read"):
        edit_only.render_sync(RenderRequest("x", (str(tmp_path / "absent.png"),), seed=0))
    with pytest.raises(RenderError, match="empty prompt"):
        edit_only.render_sync(RenderRequest("  ", refs, seed=0))


@pytest.mark.gpu
def test_tiny_pipeline_on_cuda_in_bfloat16_is_seeded(refs):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA device here")
    gpu = tiny_renderer(seed=0, long_side=32, device="cuda:0", dtype="bfloat16")
    assert gpu.edit_pipeline.transformer.dtype == torch.bfloat16
    assert gpu.edit_pipeline.transformer.device.type == "cuda"
    a = np.asarray(gpu.render_sync(RenderRequest("a red fox", refs, seed=5)))
    b = np.asarray(gpu.render_sync(RenderRequest("a red fox", refs, seed=5)))
    assert a.shape == (16, 32, 3)
    np.testing.assert_array_equal(a, b)
