"""transformers' logits for our Qwen3-VL's inputs, for comparing the two implementations.

``genevolve demo`` reloads its export with transformers and compares logits through
:func:`hf_logits`; the parity tests do the same on random models (tests/fixtures/hf_qwen3_vl.py).
torch is imported lazily: only callers that have it installed use this.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from genevolve_jax.models.qwen3_vl.config import Qwen3VLConfig


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
