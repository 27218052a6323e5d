"""A rollout's images as the trainer sees them: decoded, checked against the sample's image
placeholders, and turned into patches and vision inputs.

The mask stage (train/rl/masking.py) calls :func:`prepare_images` before advantages, so a sample
whose images are unreadable or do not match its placeholders is masked before it counts in its
group; batch assembly (train/rl/batch_assembly.py) packs what it returned into per-row blocks. Both
stages import this module, so the earlier stage never depends on the later one.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from genevolve_jax.models.qwen3_vl.config import VisionConfig
from genevolve_jax.models.qwen3_vl.rope import get_rope_index
from genevolve_jax.models.qwen3_vl.vision import VisionInputs, vision_inputs
from genevolve_jax.processing.image import ImageProcessorConfig, load_image, preprocess_images
from genevolve_jax.train.rl.records import IMAGE_TOKEN_MISMATCH, IMAGE_UNREADABLE, RolloutSample


# --- images -----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ImageBatchSpec:
    """How a sample's images become trainer inputs. ``processor`` must be the rollout engine's
    (``JaxEngine.image_processor``): it fixed how many placeholders each image got."""
    image_token_id: int
    video_token_id: int
    vision: VisionConfig
    processor: ImageProcessorConfig = dataclasses.field(default_factory=ImageProcessorConfig)
    patch_multiple: int = 1024      # rl.patch_multiple

    def __post_init__(self):
        if isinstance(self.patch_multiple, bool) or not isinstance(self.patch_multiple, int) \
                or self.patch_multiple < 1:
            raise ValueError(f"rl.patch_multiple must be an int >= 1, got {self.patch_multiple!r}")
        v, p = self.vision, self.processor
        for name, want, got in (("patch_size", v.patch_size, p.patch_size),
                                ("temporal_patch_size", v.temporal_patch_size, p.temporal_patch_size),
                                ("merge_size", v.spatial_merge_size, p.merge_size)):
            if want != got:
                raise ValueError(f"image processor {name}={got} differs from the model's vision config ({want})")

    @classmethod
    def for_model(cls, config, processor: ImageProcessorConfig | None = None,
                  patch_multiple: int = 1024) -> "ImageBatchSpec":
        """From a Qwen3VLConfig; ``processor`` None is the default processor (as JaxEngine's)."""
        return cls(int(config.image_token_id), int(config.video_token_id), config.vision,
                   processor or ImageProcessorConfig(), patch_multiple)

    @property
    def merge2(self) -> int:
        return self.vision.spatial_merge_size ** 2

    @property
    def patch_bucket(self) -> int:
        """Patch budgets are multiples of this: rl.patch_multiple, and whole merge blocks."""
        return math.lcm(self.patch_multiple, self.merge2)


@dataclasses.dataclass(frozen=True)
class SampleImages:
    """A sample's decoded images: patches, the vision inputs of their grids and the grids."""
    pixels: np.ndarray        # [n, C·T·P·P] float32
    aux: VisionInputs         # of the sample's grids, [n] leading
    grid: np.ndarray          # [images, 3]


def mrope_positions(ids: Sequence[int], grid: np.ndarray, spec: ImageBatchSpec) -> np.ndarray | None:
    """[3, n] positions from the model's rope index, or None when the placeholders do not match the
    grids (a count or a run that is not whole images, or video placeholders)."""
    ids = np.asarray(ids, np.int64)
    if int((ids == spec.image_token_id).sum()) != int(np.prod(grid, axis=1).sum()) // spec.merge2:
        return None
    try:
        pos, _ = get_rope_index(ids[None], image_grid_thw=grid, spatial_merge_size=spec.vision.spatial_merge_size,
                                image_token_id=spec.image_token_id, video_token_id=spec.video_token_id)
    except ValueError:
        return None
    return pos[:, 0].astype(np.int32)


def prepare_images(sample: RolloutSample, spec: ImageBatchSpec | None) -> SampleImages | str | None:
    """The sample's decoded images; None when it has none (and needs none); else the mask reason
    ("image_unreadable: …" or "image_token_mismatch: …") when they cannot be trained on."""
    ids, mask = np.asarray(sample.token_ids), np.asarray(sample.loss_mask)
    if not sample.images:
        # Placeholders the policy did not write itself need pixels behind them.
        if spec is not None and ((ids == spec.image_token_id) & (mask == 0)).any():
            return f"{IMAGE_TOKEN_MISMATCH}: image placeholders but no images"
        return None
    if spec is None:
        raise ValueError(f"sample {sample.sample_id} carries {len(sample.images)} image(s): batch assembly needs "
                         "image_spec=ImageBatchSpec.for_model(model_config, engine.image_processor, "
                         "rl.patch_multiple)")
    try:
        pixels, grid = preprocess_images([load_image(x) for x in sample.images], spec.processor)
    except (OSError, ValueError) as exc:
        return f"{IMAGE_UNREADABLE}: {str(exc)[:200]} ({type(exc).__name__})"
    if mrope_positions(sample.token_ids, grid, spec) is None:
        return f"{IMAGE_TOKEN_MISMATCH}: placeholders do not match {len(sample.images)} image(s)"
    return SampleImages(np.asarray(pixels, np.float32), vision_inputs(grid, spec.vision), np.asarray(grid))
