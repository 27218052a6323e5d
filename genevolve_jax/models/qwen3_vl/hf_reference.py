"""transformers' PyTorch Qwen3-VL as a parity oracle: tiny models with every weight randomised.

transformers' default init leaves norms at 1 and biases at 0, which hides transposed norms or a
missing bias; here every tensor is drawn afresh: norm weights ~ U(0.5, 1.5), biases ~ N(0, 0.1²),
matrices ~ N(0, 1/fan_in) so activations (and logits) stay O(1). Also builds inputs in the
processor's layout (placeholders, timestamps between video frames, random patch rows).

torch and transformers are imported lazily: only tests, the demo and export checks use this.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from genevolve_jax.models.qwen3_vl.config import Qwen3VLConfig


def hf_config(config: Qwen3VLConfig, attn_implementation: str = "eager"):
    import transformers
    d = {k: v for k, v in config.to_hf_dict().items() if k not in ("architectures", "model_type")}
    # The keyword sets the implementation of the text and vision sub-configs too (transformers 5.x).
    return transformers.Qwen3VLConfig(**d, attn_implementation=attn_implementation)


def random_hf_model(config: Qwen3VLConfig, seed: int = 0):
    """An eval-mode fp32 ``transformers.Qwen3VLForConditionalGeneration`` with randomised weights."""
    import torch
    import transformers
    torch.manual_seed(seed)
    model = transformers.Qwen3VLForConditionalGeneration(hf_config(config)).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif "norm" in name:
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
            elif p.ndim == 1:
                raise AssertionError(f"unexpected 1-D parameter {name}")
            elif "embed_tokens" in name or "pos_embed" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                fan_in = int(np.prod(p.shape[1:]))
                p.copy_(torch.randn(p.shape, generator=gen) / np.sqrt(fan_in))
    return model


def state_dict_numpy(model) -> dict[str, np.ndarray]:
    """The HF state dict as float32 numpy (tied lm_head left out, as checkpoints do)."""
    out = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


def random_pixels(config: Qwen3VLConfig, grid_thw, rng: np.random.Generator) -> np.ndarray:
    """Random patch rows [sum(t·h·w), C·T·P·P] as the processor lays them out (values in [-1, 1])."""
    n = int(sum(int(np.prod(g)) for g in np.asarray(grid_thw).reshape(-1, 3)))
    return rng.uniform(-1.0, 1.0, (n, config.vision.patch_dim)).astype(np.float32)


def placeholder_segment(config: Qwen3VLConfig, grid_thw, kind: str, rng: np.random.Generator) -> list[int]:
    """Token ids for one image (vision_start, n × image_pad, vision_end) or one video, laid out as
    Qwen3-VL's processor does (``processing.chat``): each temporal patch its own vision_start …
    vision_end block after its timestamp's text tokens, no pair around the whole video."""
    t, h, w = (int(x) for x in grid_thw)
    per_frame = h * w // config.vision.spatial_merge_size ** 2
    start, end = config.vision_start_token_id, config.vision_end_token_id
    if kind == "image":
        return [start] + [config.image_token_id] * (t * per_frame) + [end]
    out: list[int] = []
    for _ in range(t):
        out += text_tokens(config, int(rng.integers(1, 4)), rng)  # "<0.5 seconds>"
        out += [start] + [config.video_token_id] * per_frame + [end]
    return out


def text_tokens(config: Qwen3VLConfig, n: int, rng: np.random.Generator) -> list[int]:
    """Random ordinary token ids (never a special/placeholder id)."""
    special = min(config.image_token_id, config.video_token_id, config.vision_start_token_id,
                  config.vision_end_token_id)
    return rng.integers(0, min(special, config.text.vocab_size), n).tolist()


def pad_rows(rows: list[list[int]], side: list[str] | str, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Stack token rows into [B, L] ids and attention mask, padding each on its own side."""
    sides = [side] * len(rows) if isinstance(side, str) else side
    length = max(len(r) for r in rows)
    ids = np.full((len(rows), length), pad_id, np.int64)
    mask = np.zeros((len(rows), length), np.int64)
    for i, (r, s) in enumerate(zip(rows, sides)):
        sl = slice(length - len(r), length) if s == "left" else slice(0, len(r))
        ids[i, sl] = r
        mask[i, sl] = 1
    return ids, mask


def hf_logits(model, config: Qwen3VLConfig, input_ids: np.ndarray, attention_mask: np.ndarray | None = None, *,
              pixel_values=None, image_grid_thw=None, pixel_values_videos=None, video_grid_thw=None,
              position_ids: np.ndarray | None = None) -> np.ndarray:
    """transformers' logits [B, L, V] (float32 numpy) for the given inputs."""
    import torch
    from genevolve_jax.models.qwen3_vl.rope import token_types
    kw: dict[str, Any] = {"input_ids": torch.as_tensor(np.asarray(input_ids), dtype=torch.long)}
    if attention_mask is not None:
        kw["attention_mask"] = torch.as_tensor(np.asarray(attention_mask), dtype=torch.long)
    kw["mm_token_type_ids"] = torch.as_tensor(
        token_types(input_ids, image_token_id=config.image_token_id, video_token_id=config.video_token_id),
        dtype=torch.int)
    dtype = next(model.parameters()).dtype
    if pixel_values is not None:
        kw["pixel_values"] = torch.as_tensor(np.asarray(pixel_values, np.float32)).to(dtype)
        kw["image_grid_thw"] = torch.as_tensor(np.asarray(image_grid_thw), dtype=torch.long)
    if pixel_values_videos is not None:
        kw["pixel_values_videos"] = torch.as_tensor(np.asarray(pixel_values_videos, np.float32)).to(dtype)
        kw["video_grid_thw"] = torch.as_tensor(np.asarray(video_grid_thw), dtype=torch.long)
    if position_ids is None:
        # transformers' own rope index, padding-aware for text-only batches too (its forward would
        # otherwise number padded text rows 0..L-1, unlike its generate()).
        position_ids, _ = model.model.get_rope_index(
            kw["input_ids"], kw["mm_token_type_ids"], kw.get("image_grid_thw"), kw.get("video_grid_thw"),
            kw.get("attention_mask"))
    kw["position_ids"] = torch.as_tensor(np.asarray(position_ids), dtype=torch.long)
    model.model.rope_deltas = None  # a stale cached delta must not leak between calls
    with torch.no_grad():
        return model(**kw).logits.float().numpy()


def nnx_model_from_hf(model, config: Qwen3VLConfig | None = None):
    """Our Qwen3VLForConditionalGeneration holding the weights of a transformers model.

    Built abstractly (``nnx.eval_shape``) and filled through the key map, so no random init runs:
    eager per-parameter init costs tens of seconds of tiny compiles on CPU.
    """
    from flax import nnx

    from genevolve_jax.models.qwen3_vl import keymap
    from genevolve_jax.models.qwen3_vl.model import Qwen3VLForConditionalGeneration
    if config is None:
        config = Qwen3VLConfig.from_hf_dict(model.config.to_dict())
    ours = nnx.eval_shape(lambda: Qwen3VLForConditionalGeneration(config, rngs=nnx.Rngs(0)))
    keymap.load_hf_state_dict(ours, state_dict_numpy(model))
    return ours
