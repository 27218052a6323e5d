"""Batch assembly for the evolve step: samples and their advantages → the train step's rows.

One rollout becomes one row (right-padded, the same layout as ``data.packing``): the student
sequence (prompt + its own turns + observations) with next-token targets, the policy-token mask,
the sampler's log-probs, its group advantage, validity and, when a bundle was retrieved for its
request, a teacher row: the same policy and observation tokens after a prompt whose system prompt
carries the decision guide. ``teacher_index[b, t]`` is the teacher-row position that predicts the
same token as student position t, so the teacher's log-probs are gathered into student positions
inside the step (teacher and student prompts differ in length).

Images (``agent.observation_pixels``): a sample lists the files behind its image placeholders, in
order. :func:`prepare_images` decodes them and checks them against the placeholders; the mask
stage (train/masking.py) calls it before advantages, so a sample whose images are unreadable or
do not match is masked before it counts in its group. When any trainable row has images, the
batch gains per-row image blocks (``row_pixel_values`` [B, P, C·T·P·P] and the host-computed
vision inputs of its grids, ``row_vision_*``) and MRoPE position ids from the model's rope index
for student and teacher rows. The blocks are batch-major, so gradient accumulation splits them
with the rows, and P is rounded up to ``rl.patch_multiple`` so that steps reuse compiles.
Text-only batches have exactly the text layout.
"""
from __future__ import annotations

import dataclasses
import io
import math
from typing import Mapping, Sequence

import numpy as np
from PIL import Image

from genevolve_jax.data import packing
from genevolve_jax.models.qwen3_vl.config import VisionConfig
from genevolve_jax.models.qwen3_vl.rope import get_rope_index
from genevolve_jax.models.qwen3_vl.vision import VisionInputs, vision_inputs
from genevolve_jax.processing.image import ImageProcessorConfig, preprocess_images
from genevolve_jax.train.batch_layout import ROW_IMAGE_FIELDS
from genevolve_jax.train.records import IMAGE_TOKEN_MISMATCH, IMAGE_UNREADABLE, RolloutSample


def _bucket(n: int, multiple: int) -> int:
    return max(multiple, -(-n // multiple) * multiple)


def _row(ids, mask, length, pad_id, fields=None, positions=None) -> dict:
    t = packing.Trajectory(np.asarray(ids, np.int32), np.asarray(mask, np.float32), position_ids=positions,
                           token_fields={k: np.asarray(v, np.float32) for k, v in (fields or {}).items()})
    batch, _ = packing.pack([t], length, pad_id=pad_id, overflow="error", num_rows=1)
    return batch


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


def _open_image(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    source = io.BytesIO(image) if isinstance(image, (bytes, bytearray)) else image
    with Image.open(source) as im:
        im.load()
        return im.copy()


def _mrope_positions(ids: Sequence[int], grid: np.ndarray, spec: ImageBatchSpec) -> np.ndarray | None:
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
        pixels, grid = preprocess_images([_open_image(x) for x in sample.images], spec.processor)
    except (OSError, ValueError) as exc:
        return f"{IMAGE_UNREADABLE}: {str(exc)[:200]} ({type(exc).__name__})"
    if _mrope_positions(sample.token_ids, grid, spec) is None:
        return f"{IMAGE_TOKEN_MISMATCH}: placeholders do not match {len(sample.images)} image(s)"
    return SampleImages(np.asarray(pixels, np.float32), vision_inputs(grid, spec.vision), np.asarray(grid))


def _image_blocks(blocks: Sequence[SampleImages | None], rows: int, spec: ImageBatchSpec,
                  patch_budget: int | None) -> dict[str, np.ndarray]:
    """The ``row_*`` fields: each row's patches and vision inputs, zero-padded to the budget."""
    longest = max(b.pixels.shape[0] for b in blocks if b is not None)
    budget = patch_budget or _bucket(longest, spec.patch_bucket)
    if longest > budget or budget % spec.merge2:
        raise ValueError(f"patch budget {budget} must be a multiple of {spec.merge2} holding {longest} patches")
    dim = spec.vision.patch_dim
    out = {"row_pixel_values": np.zeros((rows, budget, dim), np.float32),
           "row_vision_pos_indices": np.zeros((rows, budget, 4), np.int32),
           "row_vision_pos_weights": np.zeros((rows, budget, 4), np.float32),
           "row_vision_rope_positions": np.zeros((rows, budget, 2), np.int32),
           "row_vision_segment_ids": np.zeros((rows, budget), np.int32)}
    for r, b in enumerate(blocks):
        if b is None:
            continue
        n = b.pixels.shape[0]
        out["row_pixel_values"][r, :n] = b.pixels
        out["row_vision_pos_indices"][r, :n] = b.aux.pos_indices
        out["row_vision_pos_weights"][r, :n] = b.aux.pos_weights
        out["row_vision_rope_positions"][r, :n] = b.aux.rope_positions
        out["row_vision_segment_ids"][r, :n] = b.aux.segment_ids + 1   # 0 marks padding
    assert set(out) == set(ROW_IMAGE_FIELDS)
    return out


def assemble_evolve_batch(samples: Sequence[RolloutSample], advantages: Sequence[float], *, pad_id: int = 0,
                          length_multiple: int = 64, num_rows: int | None = None,
                          seq_len: int | None = None, image_spec: ImageBatchSpec | None = None,
                          images: Mapping[str, SampleImages] | None = None,
                          patch_budget: int | None = None, old_logprobs: bool = True) -> dict[str, np.ndarray]:
    """Rows for the evolve loss. Row and token counts are rounded up (``num_rows``,
    ``length_multiple``) so that steps share compiled shapes; padding rows are invalid.

    ``images`` maps sample ids to their :func:`prepare_images` result (the mask stage's); samples
    of trainable rows not in it are prepared here, and one that cannot be trained on raises: the
    mask stage, not assembly, decides what trains. The per-row patch count is rounded up to
    ``image_spec.patch_multiple`` (or fixed by ``patch_budget``). ``old_logprobs`` False leaves π_old
    out of the batch (an on-policy step takes it from its own forward); the sampler's log-probs
    are always there as ``sampler_logprobs`` for the mismatch check."""
    if len(samples) != len(advantages):
        raise ValueError(f"{len(samples)} samples but {len(advantages)} advantages")
    if not samples:
        raise ValueError("assemble_evolve_batch needs at least one sample")
    rows = num_rows or len(samples)
    if rows < len(samples):
        raise ValueError(f"num_rows {rows} < {len(samples)} samples")
    blocks: list[SampleImages | None] = []
    for s in samples:
        got = (images or {}).get(s.sample_id) if s.valid else None
        if got is None and s.valid:
            got = prepare_images(s, image_spec)
        if isinstance(got, str):
            raise ValueError(f"sample {s.sample_id} cannot be trained on ({got}): mask it before assembly "
                             "(train/masking.py)")
        blocks.append(got)
    teacher = [s.teacher_ids() for s in samples]
    longest = max(max(len(s.token_ids) for s in samples), max(len(t[0]) for t in teacher))
    length = seq_len or _bucket(longest, length_multiple)
    if longest > length:
        raise ValueError(f"a sample has {longest} tokens, more than seq_len {length}")
    out = {k: [] for k in ("input_ids", "targets", "loss_mask", "segment_ids", "position_ids", "sampler_logprobs",
                           "teacher_input_ids", "teacher_targets", "teacher_segment_ids",
                           "teacher_position_ids", "teacher_index")}
    for s, (t_ids, t_mask), img in zip(samples, teacher, blocks):
        positions = teacher_positions = None
        if img is not None:
            positions = _mrope_positions(s.token_ids, img.grid, image_spec)
            teacher_positions = _mrope_positions(t_ids, img.grid, image_spec)
            if teacher_positions is None:
                raise ValueError(f"sample {s.sample_id}: its teacher prompt adds image placeholders; the teacher "
                                 "stage must not attach such a guide")
        b = _row(s.token_ids, s.loss_mask, length, pad_id, {"sampler_logprobs": s.logprobs}, positions)
        tb = _row(t_ids, t_mask, length, pad_id, positions=teacher_positions)
        for k in ("input_ids", "targets", "loss_mask", "segment_ids", "position_ids", "sampler_logprobs"):
            out[k].append(b[k][0])
        for k in ("input_ids", "targets", "segment_ids", "position_ids"):
            out[f"teacher_{k}"].append(tb[k][0])
        # Student position t predicts token t+1; for t+1 ≥ prompt_length the same token sits at
        # teacher position t + shift. Off-mask positions read position 0 (masked out anyway).
        shift = len(t_ids) - len(s.token_ids)
        idx = np.arange(length, dtype=np.int32) + shift
        idx = np.where((b["loss_mask"][0] > 0) & (idx >= 0) & (idx < length), idx, 0)
        out["teacher_index"].append(idx.astype(np.int32))
    batch = {k: np.stack(v) for k, v in out.items()}
    batch["sampler_logprobs"] = batch["sampler_logprobs"].astype(np.float32)
    if old_logprobs:
        batch["old_logprobs"] = batch["sampler_logprobs"].copy()
    batch["advantages"] = np.asarray(advantages, np.float32)
    batch["sample_valid"] = np.asarray([s.valid for s in samples], np.float32)
    batch["has_bundle"] = np.asarray([s.has_bundle for s in samples], np.float32)
    if rows > len(samples):
        pad = rows - len(samples)
        for k, v in batch.items():
            filler = np.zeros((pad,) + v.shape[1:], v.dtype)
            if k in ("input_ids", "teacher_input_ids"):
                filler[:] = pad_id
            batch[k] = np.concatenate([v, filler], axis=0)
    if any(b is not None for b in blocks):
        batch.update(_image_blocks(blocks, rows, image_spec, patch_budget))
    return batch
