"""One image decoder (processing.image.load_image) for the engine's prefill, batch assembly and the
multi-host exchange: a transparent PNG, a palette PNG with a transparent colour, a grayscale JPEG
(and an LA and a 16-bit grayscale PNG), all random, give the pixel values of transformers' Qwen2-VL
image processor, the same pixel values in the engine's prefill and in the trainer's batch (read
from the files, or after crossing hosts as bytes), and the engine's sampled log-probs are the
trainer's forward over that batch."""
import dataclasses
import pickle

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image
from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as hf_pil

from genevolve_jax.models.hf_io import model_from_state_dict, random_state_dict
from genevolve_jax.processing.image import ImageProcessorConfig, load_image, preprocess_images
from genevolve_jax.processing.tokenizer import default_tokenizer, special_token_ids
from genevolve_jax.rollout.config import default_engine_config
from genevolve_jax.rollout.engine import GenerationRequest, SamplingParams
from genevolve_jax.rollout.jax_engine import JaxEngine
from genevolve_jax.sharding.multihost import portable_samples
from genevolve_jax.train.losses.config import default_loss_config
from genevolve_jax.train.losses.step_losses import policy_logprobs
from genevolve_jax.train.rl.batch_assembly import assemble_evolve_batch
from genevolve_jax.train.rl.records import RolloutSample
from genevolve_jax.train.rl.sample_images import ImageBatchSpec
from tests.fixtures.engines import two_layer_config

PROCESSOR = ImageProcessorConfig(min_pixels=32 * 32, max_pixels=96 * 96)


def random_images(tmp, rng) -> dict[str, str]:
    """Files of each kind, random sizes and pixels; alpha with fully transparent, opaque and partial
    pixels, and a palette whose transparent index is in use."""
    def size():
        return int(rng.integers(40, 120)), int(rng.integers(40, 120))

    h, w = size()
    rgba = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
    rgba[: h // 3, :, 3] = 0
    rgba[h // 3: 2 * h // 3, :, 3] = 255
    paths = {"rgba_png": tmp / "rgba.png"}
    Image.fromarray(rgba, "RGBA").save(paths["rgba_png"])

    h, w = size()
    palette = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L").convert("P")
    palette.putpalette(rng.integers(0, 256, 768, dtype=np.uint8).tobytes())
    clear = int(np.asarray(palette)[h // 2, w // 2])
    paths["palette_png"] = tmp / "palette.png"
    palette.save(paths["palette_png"], transparency=clear)

    h, w = size()
    paths["gray_jpeg"] = tmp / "gray.jpg"
    Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L").save(paths["gray_jpeg"],
                                                                          quality=int(rng.integers(60, 95)))
    h, w = size()
    paths["la_png"] = tmp / "la.png"
    Image.fromarray(rng.integers(0, 256, (h, w, 2), dtype=np.uint8), "LA").save(paths["la_png"])
    h, w = size()
    paths["gray16_png"] = tmp / "gray16.png"
    Image.fromarray(rng.integers(0, 2 ** 16, (h, w), dtype=np.uint16)).save(paths["gray16_png"])
    return {k: str(v) for k, v in paths.items()}


def test_decoding_equals_transformers_processor(tmp_path):
    paths = random_images(tmp_path, np.random.default_rng(41))
    with Image.open(paths["palette_png"]) as im:
        assert im.mode == "P" and "transparency" in im.info
    with Image.open(paths["gray16_png"]) as im:
        assert im.mode.startswith("I")
    hf = hf_pil.Qwen2VLImageProcessorPil(size={"shortest_edge": PROCESSOR.min_pixels,
                                               "longest_edge": PROCESSOR.max_pixels},
                                         patch_size=16, temporal_patch_size=2, merge_size=2,
                                         image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    for kind, path in paths.items():
        ours = preprocess_images([load_image(path)], PROCESSOR)
        with open(path, "rb") as f:   # from bytes as from the path
            np.testing.assert_array_equal(preprocess_images([load_image(f.read())], PROCESSOR).pixel_values,
                                          ours.pixel_values, err_msg=kind)
        with Image.open(path) as im:
            ref = hf(images=[im], return_tensors="np")
        np.testing.assert_array_equal(ours.image_grid_thw, ref["image_grid_thw"], err_msg=kind)
        np.testing.assert_array_equal(ours.pixel_values, ref["pixel_values"], err_msg=kind)
        assert load_image(path).mode == "RGB"
    # Transparent pixels are white: not the colour under them that convert("RGB") shows.
    rgba = np.asarray(Image.open(paths["rgba_png"]))
    clear = rgba[..., 3] == 0
    assert (np.asarray(load_image(paths["rgba_png"]))[clear] == 255).all()
    assert (np.asarray(Image.open(paths["rgba_png"]).convert("RGB"))[clear] != 255).any()


@pytest.fixture(scope="module")
def engine_and_model():
    tok = default_tokenizer()
    cfg = two_layer_config(tok)
    model = model_from_state_dict(cfg, random_state_dict(cfg, seed=8))
    ecfg = default_engine_config()
    ecfg.max_slots, ecfg.max_seq_len, ecfg.steps_per_sync, ecfg.min_prefill_bucket = 1, 256, 4, 256
    engine = JaxEngine(model, tok, ecfg, image_processor=PROCESSOR)
    yield tok, cfg, model, engine
    engine.close()


def test_engine_prefill_and_trainer_batch_see_the_same_pixels(tmp_path, engine_and_model):
    tok, cfg, model, engine = engine_and_model
    rng = np.random.default_rng(43)
    paths = list(random_images(tmp_path, rng).values())
    first = len(special_token_ids(tok))
    prompt = rng.integers(first, len(tok), 5).tolist()
    for p in paths:
        prompt += ([cfg.vision_start_token_id] + [cfg.image_token_id] * engine.num_image_tokens(p)
                   + [cfg.vision_end_token_id] + rng.integers(first, len(tok), 3).tolist())
    result = engine.generate([GenerationRequest(prompt, SamplingParams(max_new_tokens=4, temperature=0.7,
                                                                       top_p=1.0, seed=5), images=paths)])[0]
    assert result.finish_reason == "length", result.error
    sample = RolloutSample("s", 0, prompt + list(result.token_ids), [0] * len(prompt) + [1] * 4,
                           [0.0] * len(prompt) + list(result.logprobs), 0.5, True, prompt_length=len(prompt),
                           images=paths)
    spec = ImageBatchSpec.for_model(cfg, PROCESSOR, patch_multiple=32)
    loss_cfg = default_loss_config()
    loss_cfg.logprob.rl_temperature = 0.7

    def batch_of(s):
        return assemble_evolve_batch([s], [0.5], seq_len=256, loss_cfg=loss_cfg, image_spec=spec)

    engine_pixels = engine.image_inputs(paths).pixel_values
    n = engine_pixels.shape[0]
    batch = batch_of(sample)
    np.testing.assert_array_equal(batch["row_pixel_values"][0, :n], engine_pixels)
    # Across hosts the files travel as bytes and are decoded on arrival: the same pixels.
    moved = pickle.loads(pickle.dumps(portable_samples([sample])))[0]
    assert all(isinstance(x, Image.Image) for x in moved.images)
    np.testing.assert_array_equal(batch_of(moved)["row_pixel_values"][0, :n], engine_pixels)

    # The prefill reads those pixels: the sampled tokens' log-probs are the trainer's forward over
    # the batch (fp32). Alpha dropped (convert("RGB")), the same forward disagrees.
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda st, b: policy_logprobs(nnx.merge(graphdef, st), b, loss_cfg))
    mask = batch["loss_mask"] > 0
    got = np.asarray(forward(state, batch))[mask]
    np.testing.assert_allclose(got, batch["sampler_logprobs"][mask], rtol=0, atol=1e-4)
    dropped = dataclasses.replace(sample, images=[Image.open(p).convert("RGB") for p in paths])
    blind = np.asarray(forward(state, batch_of(dropped)))[mask]
    assert np.abs(blind - batch["sampler_logprobs"][mask]).max() > 1e-3
