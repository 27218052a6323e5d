"""Tiny randomly initialised Qwen-Image pipelines for CPU tests and the embedded demo.

They are the real diffusers classes of the paper's renderer, only small:

- :class:`TinyQwenImageEditPlusPipeline` is ``diffusers.QwenImageEditPlusPipeline`` (the
  Qwen-Image-Edit-2511 pipeline: multi-reference edit) with a 2-layer QwenImageTransformer2DModel,
  a 4-channel AutoencoderKLQwenImage and a 2-layer Qwen2.5-VL text encoder (the diffusers test
  suite's sizes);
- the no-reference fallback is ``diffusers.QwenImagePipeline`` (Qwen-Image text-to-image) sharing
  the same tiny modules.

Nothing is downloaded: the tokenizer is a byte-level BPE vocabulary with no merges (every byte is
a token) plus the Qwen chat and vision special tokens, built here. Two snags of building the
processor offline are handled: Qwen2VLProcessor's constructor looks up a video processor class that
needs torchvision (we pass none and skip that check), and the pipeline resizes every reference to
~1 MP before the VAE (30 s per call on CPU), so the tiny edit pipeline lowers those module size
constants during its own calls.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator

_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                   "<|image_pad|>", "<|video_pad|>")

# Target pixel areas for the tiny edit pipeline's two reference resizes (condition image for the
# text encoder, VAE image for the latent stream); the real pipeline uses 384² and 1024².
TINY_CONDITION_AREA = 56 * 56
TINY_VAE_AREA = 32 * 32

_SIZE_LOCK = threading.Lock()


@contextlib.contextmanager
def _small_reference_sizes() -> Iterator[None]:
    """Lower diffusers' module-level reference sizes for the duration of one call. A lock makes
    concurrent tiny calls safe; a real pipeline in the same process should not run concurrently
    with a tiny one (they never share a process in our jobs)."""
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as edit_plus

    with _SIZE_LOCK:
        saved = edit_plus.CONDITION_IMAGE_SIZE, edit_plus.VAE_IMAGE_SIZE
        edit_plus.CONDITION_IMAGE_SIZE, edit_plus.VAE_IMAGE_SIZE = TINY_CONDITION_AREA, TINY_VAE_AREA
        try:
            yield
        finally:
            edit_plus.CONDITION_IMAGE_SIZE, edit_plus.VAE_IMAGE_SIZE = saved


def build_tiny_tokenizer():
    """A Qwen2Tokenizer over the 256 byte-level symbols plus the Qwen special tokens."""
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Tokenizer

    vocab = {sym: i for i, sym in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for tok in _SPECIAL_TOKENS:
        vocab[tok] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[])
    tokenizer.add_special_tokens({"additional_special_tokens": list(_SPECIAL_TOKENS[1:])})
    return tokenizer


def _processor_class():
    from transformers import Qwen2VLProcessor

    class OfflineQwen2VLProcessor(Qwen2VLProcessor):
        """Qwen2VLProcessor without a video processor (its class check needs torchvision)."""

        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    return OfflineQwen2VLProcessor


def _edit_pipeline_class():
    from diffusers import QwenImageEditPlusPipeline

    class TinyQwenImageEditPlusPipeline(QwenImageEditPlusPipeline):
        """QwenImageEditPlusPipeline with small reference resizes (see the module docstring)."""

        def __call__(self, *args, **kwargs):
            with _small_reference_sizes():
                return super().__call__(*args, **kwargs)

    return TinyQwenImageEditPlusPipeline


def build_tiny_components(seed: int = 0) -> dict:
    """The six modules of a tiny Qwen-Image-Edit pipeline, randomly initialised from ``seed``."""
    import torch
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = build_tiny_tokenizer()
    processor = _processor_class()(image_processor=Qwen2VLImageProcessorPil(), tokenizer=tokenizer,
                                   video_processor=None)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in _SPECIAL_TOKENS}
    vocab = len(tokenizer)
    text_config = Qwen2_5_VLConfig(
        text_config={"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": vocab,
                     "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
                     "rope_theta": 1e6, "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"]},
        vision_config={"depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2,
                       "out_hidden_size": 16},
        hidden_size=16, vocab_size=vocab,
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_token_id=ids["<|image_pad|>"],
    )
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        text_encoder = Qwen2_5_VLForConditionalGeneration(text_config).eval()
        transformer = QwenImageTransformer2DModel(
            patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
            num_attention_heads=3, joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4)).eval()
        z_dim = 4
        vae = AutoencoderKLQwenImage(
            base_dim=z_dim * 6, z_dim=z_dim, dim_mult=[1, 2, 4], num_res_blocks=1,
            temperal_downsample=[False, True], latents_mean=[0.0] * z_dim, latents_std=[1.0] * z_dim).eval()
    finally:  # building must not disturb the caller's torch RNG stream
        torch.random.set_rng_state(generator_state)
    return {"scheduler": FlowMatchEulerDiscreteScheduler(), "vae": vae, "text_encoder": text_encoder,
            "tokenizer": tokenizer, "processor": processor, "transformer": transformer}


def build_tiny_pipelines(seed: int = 0):
    """(tiny QwenImageEditPlusPipeline, tiny QwenImagePipeline) sharing one set of modules."""
    from diffusers import QwenImagePipeline

    comps = build_tiny_components(seed)
    edit = _edit_pipeline_class()(**comps)
    text = QwenImagePipeline(scheduler=comps["scheduler"], vae=comps["vae"], text_encoder=comps["text_encoder"],
                             tokenizer=comps["tokenizer"], transformer=comps["transformer"])
    for pipe in (edit, text):
        pipe.set_progress_bar_config(disable=True)
    return edit, text


def tiny_renderer(seed: int = 0, long_side: int = 32, num_inference_steps: int = 2, device: str = "cpu",
                  dtype: str = "float32", *, deferred: bool = False):
    """A DiffusersRenderer over the tiny pipelines with the paper's CFG settings and tiny sizes,
    placed on ``device`` in ``dtype`` (the same placement path as a real checkpoint). ``deferred``:
    the pipelines are built at the first render (a run's renderer), not now (a service's, which
    must be ready when it says so)."""
    from genevolve_jax.render.base import SamplingParams
    from genevolve_jax.render.diffusers_renderer import DiffusersRenderer, torch_dtype

    def load():
        edit, text = build_tiny_pipelines(seed)
        for pipe in (edit, text):  # shared modules: the second call is a no-op
            pipe.to(device)
            if dtype != "float32":
                pipe.to(torch_dtype(dtype))
        return edit, text

    params = SamplingParams(num_inference_steps=num_inference_steps, long_side=long_side, max_sequence_length=64)
    pipelines = {"load_pipelines": load} if deferred else dict(zip(("edit_pipeline", "text_pipeline"), load()))
    return DiffusersRenderer(**pipelines, params=params, device=device,
                             renderer_id=f"tiny-qwen-image-edit:{seed}:{dtype}",
                             num_threads=1 if device == "cpu" else None)
