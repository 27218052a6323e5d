"""Batch assembly for the evolve step, and the evolve loss function that the sharded step runs.

One rollout becomes one row (right-padded, the same layout as ``data.packing``): the student
sequence (prompt + its own turns + observations) with next-token targets, the policy-token mask,
the sampler's log-probs, its group advantage, validity and, when a bundle was retrieved for its
request, a teacher row: the same policy and observation tokens after a prompt whose system prompt
carries the decision guide. ``teacher_index[b, t]`` is the teacher-row position that predicts the
same token as student position t, so the teacher's log-probs are gathered into student positions
inside the step (teacher and student prompts differ in length).

The loss function (``evolve_loss_fn``) is pure and jittable: policy forward → fused log-probs and
entropy; teacher forward on the guided row under stop-gradient → fused log-probs; GRPO + λ·SDL.
The reference log-probs come in the batch (``ref_logprobs``), from :func:`reference_logprobs_fn`,
a separate jitted forward of the frozen reference params.

Images (``agent.observation_pixels``): a sample lists the files behind its image placeholders, in
order. When any trainable row has images, the batch gains per-row image blocks (``row_pixel_values``
[B, P, C·T·P·P] and the host-computed vision inputs of its grids, ``row_vision_*``, see
``train.step.row_image_features``) and MRoPE position ids from the model's rope index for student
and teacher rows. The blocks are batch-major, so gradient accumulation splits them with the rows,
and P is rounded up to ``rl.patch_multiple`` so that steps reuse compiles. A sample whose images
cannot be read, or whose placeholders do not match its images, is masked with its reason.
Text-only batches have exactly the text layout.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from PIL import Image

from genevolve_jax.data import packing
from genevolve_jax.models.qwen3_vl.config import VisionConfig
from genevolve_jax.models.qwen3_vl.rope import get_rope_index
from genevolve_jax.models.qwen3_vl.vision import VisionInputs, vision_inputs
from genevolve_jax.ops.fused_logprob import token_logprobs
from genevolve_jax.processing.image import ImageProcessorConfig, preprocess_images
from genevolve_jax.sharding import logical as L
from genevolve_jax.train.losses import evolve_loss
from genevolve_jax.train.step import (ROW_IMAGE_FIELDS, batch_shardings, cast_floating, lm_head_kernel,
                                      qwen3vl_hidden_states, row_image_features)

IMAGE_UNREADABLE = "image_unreadable"          # a file is missing or does not decode
IMAGE_TOKEN_MISMATCH = "image_token_mismatch"  # placeholders do not match the images' grids


@dataclasses.dataclass
class RolloutSample:
    """One rollout as the trainer needs it (independent of where it came from)."""
    sample_id: str
    group: int                          # index of its prompt in the step (GRPO group)
    token_ids: list[int]
    loss_mask: list[int]                # 1 on the policy's sampled tokens
    logprobs: list[float]               # sampler log-probs aligned with token_ids (0 off-mask)
    reward: float | None                # None: masked (no trustworthy reward)
    valid: bool = True                  # False: masked from the loss (error, cut off, judge failure)
    mask_reason: str = ""
    prompt_length: int = 0              # tokens of the prompt segment
    teacher_prompt: list[int] | None = None   # prompt ids with the decision guide, when retrieved
    request: str = ""
    stats: dict = dataclasses.field(default_factory=dict)
    extra: dict = dataclasses.field(default_factory=dict)   # trajectory, program, image path, …
    images: list = dataclasses.field(default_factory=list)  # files (or PIL images) behind its image
    #                                                         placeholders, in placeholder order

    def __post_init__(self):
        n = len(self.token_ids)
        if len(self.loss_mask) != n or len(self.logprobs) != n:
            raise ValueError(f"sample {self.sample_id}: token_ids ({n}), loss_mask ({len(self.loss_mask)}) and "
                             f"logprobs ({len(self.logprobs)}) must have the same length")

    def mask(self, reason: str) -> None:
        self.valid, self.reward, self.mask_reason = False, None, reason

    @property
    def has_bundle(self) -> bool:
        return self.teacher_prompt is not None

    def teacher_ids(self) -> tuple[list[int], list[int]]:
        """(teacher token ids, teacher policy mask): the guided prompt, then the student's own tokens."""
        if self.teacher_prompt is None:
            return list(self.token_ids), list(self.loss_mask)
        rest = slice(self.prompt_length, None)
        return (list(self.teacher_prompt) + list(self.token_ids[rest]),
                [0] * len(self.teacher_prompt) + list(self.loss_mask[rest]))


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


@dataclasses.dataclass
class _RowImages:
    pixels: np.ndarray        # [n, C·T·P·P] float32
    aux: VisionInputs         # of the sample's grids, [n] leading
    positions: np.ndarray     # [3, len(token_ids)] MRoPE position ids of the student sequence
    teacher_positions: np.ndarray  # [3, len(teacher ids)]


def _open_image(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    with Image.open(image) as im:
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


def _count(masked: dict | None, reason: str) -> None:
    if masked is not None:
        masked[reason] = masked.get(reason, 0) + 1


def mask_unreadable_images(samples: Sequence[RolloutSample], masked: dict | None = None) -> int:
    """Mask (reason ``image_unreadable``) every valid sample with an image that cannot be opened
    and decoded; returns how many. Cheap enough to run before advantages are computed, so that
    such a sample does not count in its group; :func:`assemble_evolve_batch` checks again."""
    n = 0
    for s in samples:
        if not s.valid:
            continue
        for image in s.images:
            try:
                _open_image(image)
            except (OSError, ValueError) as exc:
                s.mask(f"{IMAGE_UNREADABLE}: {image} ({type(exc).__name__})")
                _count(masked, IMAGE_UNREADABLE)
                n += 1
                break
    return n


def _row_images(s: RolloutSample, teacher_ids: Sequence[int], spec: ImageBatchSpec | None,
                masked: dict | None) -> _RowImages | None:
    """The sample's image block and MRoPE positions, or None (no images, or the sample is masked
    here with its reason)."""
    if not s.valid:
        return None
    if not s.images:
        if spec is not None:
            # Placeholders the policy did not write itself need pixels behind them.
            ids, mask = np.asarray(s.token_ids), np.asarray(s.loss_mask)
            if ((ids == spec.image_token_id) & (mask == 0)).any():
                s.mask(f"{IMAGE_TOKEN_MISMATCH}: image placeholders but no images")
                _count(masked, IMAGE_TOKEN_MISMATCH)
        return None
    if spec is None:
        raise ValueError(f"sample {s.sample_id} carries {len(s.images)} image(s): assemble_evolve_batch needs "
                         "image_spec=ImageBatchSpec.for_model(model_config, engine.image_processor, "
                         "rl.patch_multiple)")
    try:
        pils = [_open_image(x) for x in s.images]
        pixels, grid = preprocess_images(pils, spec.processor)
    except (OSError, ValueError) as exc:
        s.mask(f"{IMAGE_UNREADABLE}: {str(exc)[:200]}")
        _count(masked, IMAGE_UNREADABLE)
        return None
    positions = _mrope_positions(s.token_ids, grid, spec)
    teacher = _mrope_positions(teacher_ids, grid, spec)
    if positions is None or teacher is None:
        which = "student" if positions is None else "teacher"
        s.mask(f"{IMAGE_TOKEN_MISMATCH}: {which} placeholders do not match {len(s.images)} image(s)")
        _count(masked, IMAGE_TOKEN_MISMATCH)
        return None
    aux = vision_inputs(grid, spec.vision)
    return _RowImages(np.asarray(pixels, np.float32), aux, positions, teacher)


def _image_blocks(blocks: Sequence[_RowImages | None], rows: int, spec: ImageBatchSpec,
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
                          patch_budget: int | None = None, masked: dict | None = None) -> dict[str, np.ndarray]:
    """Rows for :func:`evolve_loss_fn`. Row and token counts are rounded up (``num_rows``,
    ``length_multiple``) so that steps share compiled shapes; padding rows are invalid.

    Samples with images need ``image_spec``; the per-row patch count is rounded up to
    ``image_spec.patch_multiple`` (or fixed by ``patch_budget``). Samples masked here (unreadable
    images, placeholders that do not match) are counted by reason in ``masked``."""
    if len(samples) != len(advantages):
        raise ValueError(f"{len(samples)} samples but {len(advantages)} advantages")
    if not samples:
        raise ValueError("assemble_evolve_batch needs at least one sample")
    rows = num_rows or len(samples)
    if rows < len(samples):
        raise ValueError(f"num_rows {rows} < {len(samples)} samples")
    teacher = [s.teacher_ids() for s in samples]
    blocks = [_row_images(s, t[0], image_spec, masked) for s, t in zip(samples, teacher)]
    longest = max(max(len(s.token_ids) for s in samples), max(len(t[0]) for t in teacher))
    length = seq_len or _bucket(longest, length_multiple)
    if longest > length:
        raise ValueError(f"a sample has {longest} tokens, more than seq_len {length}")
    out = {k: [] for k in ("input_ids", "targets", "loss_mask", "segment_ids", "position_ids", "old_logprobs",
                           "teacher_input_ids", "teacher_targets", "teacher_segment_ids",
                           "teacher_position_ids", "teacher_index")}
    for s, (t_ids, t_mask), img in zip(samples, teacher, blocks):
        b = _row(s.token_ids, s.loss_mask, length, pad_id, {"old_logprobs": s.logprobs},
                 None if img is None else img.positions)
        tb = _row(t_ids, t_mask, length, pad_id, positions=None if img is None else img.teacher_positions)
        for k in ("input_ids", "targets", "loss_mask", "segment_ids", "position_ids", "old_logprobs"):
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
    batch["old_logprobs"] = batch["old_logprobs"].astype(np.float32)
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


def _teacher_view(batch: Mapping[str, Any]) -> dict:
    view = {"input_ids": batch["teacher_input_ids"], "position_ids": batch["teacher_position_ids"],
            "segment_ids": batch["teacher_segment_ids"]}
    # A teacher row holds its student row's images in the same order: the same image block.
    view.update({k: batch[k] for k in ROW_IMAGE_FIELDS if k in batch})
    return view


def policy_forward(model, batch: Mapping[str, Any], loss_cfg):
    """(log-probs [B, T] of ``batch["targets"]`` at the RL temperature, entropy [B, T], the encoded
    row images or None): the policy half of :func:`evolve_loss_fn`, through the fused op."""
    chunk = int(loss_cfg.logprob.chunk_size)
    temp = float(loss_cfg.logprob.rl_temperature)
    feats = row_image_features(model, batch) if "row_pixel_values" in batch else None
    hidden = qwen3vl_hidden_states(model, batch, feats)
    kernel = lm_head_kernel(model).astype(hidden.dtype)
    lp, ent = token_logprobs(hidden, kernel, batch["targets"], chunk_size=chunk, temperature=temp,
                             return_entropy=True)
    return lp, ent, feats


def teacher_logprobs(model, batch: Mapping[str, Any], loss_cfg, image_features=None) -> jax.Array:
    """[B, T] stop-gradient log-probs of the student's tokens under the teacher rows, gathered into
    student positions (``teacher_index``). ``image_features``: the student's encoded row images."""
    feats = None if image_features is None else jax.tree.map(jax.lax.stop_gradient, image_features)
    hidden = jax.lax.stop_gradient(qwen3vl_hidden_states(model, _teacher_view(batch), feats))
    kernel = jax.lax.stop_gradient(lm_head_kernel(model)).astype(hidden.dtype)
    row = token_logprobs(hidden, kernel, batch["teacher_targets"], chunk_size=int(loss_cfg.logprob.chunk_size),
                         temperature=float(loss_cfg.logprob.rl_temperature))
    return jnp.take_along_axis(row, batch["teacher_index"], axis=1)


def evolve_loss_fn(loss_cfg, *, sdl: bool | None = None):
    """LossFn for ``train.step.TrainStep``: L = L_GRPO + λ·L_SDL, computed in one forward of the
    policy, one stop-gradient forward of the teacher row (same weights) and the fused op. Images
    are encoded once; the teacher row reuses the features under stop-gradient.

    The GRPO/SDL losses are already means, so the step's weight is 1 per (micro-)batch."""
    use_sdl = (loss_cfg.sdl.coef > 0) if sdl is None else sdl

    def loss_fn(model, batch, rng):
        del rng
        lp, ent, feats = policy_forward(model, batch, loss_cfg)
        teacher_lp = teacher_logprobs(model, batch, loss_cfg, feats) if use_sdl else None
        loss, metrics = evolve_loss(lp, batch["old_logprobs"], batch["advantages"], batch["loss_mask"], loss_cfg,
                                    ref_logprobs=batch.get("ref_logprobs"), teacher_logprobs=teacher_lp,
                                    has_bundle=batch["has_bundle"] if use_sdl else None,
                                    sample_valid=batch["sample_valid"], entropy=ent)
        metrics = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
        return loss, jnp.ones((), jnp.float32), metrics

    loss_fn.metrics_are_means = True   # the step averages them over micro-batches, but for counts:
    loss_fn.summed_metrics = ("grpo/tokens", "grpo/seqs", "grpo/masked_seqs", "sdl/tokens", "sdl/samples")
    return loss_fn


def reference_logprobs_fn(setup, loss_cfg, compute_dtype=jnp.float32):
    """Jitted ``(ref_params, batch) -> log-probs [B, T]`` of the batch's targets under the frozen
    reference params (same model function, same temperature as the step)."""
    chunk = int(loss_cfg.logprob.chunk_size)
    temp = float(loss_cfg.logprob.rl_temperature)
    cache: dict = {}

    def fn(params, batch):
        model = setup.merge(cast_floating(params, compute_dtype))
        hidden = qwen3vl_hidden_states(model, batch)
        kernel = lm_head_kernel(model).astype(hidden.dtype)
        return token_logprobs(hidden, kernel, batch["targets"], chunk_size=chunk, temperature=temp)

    def run(params, batch: Mapping[str, np.ndarray]) -> jax.Array:
        view = {k: batch[k] for k in ("input_ids", "targets", "segment_ids", "position_ids", *ROW_IMAGE_FIELDS)
                if k in batch}
        key = tuple((k, v.shape) for k, v in sorted(view.items()))
        shardings = batch_shardings(view, setup.mesh, setup.rules)
        if key not in cache:
            out_sh = NamedSharding(setup.mesh, L.partition_spec((L.BATCH, L.SEQ), setup.rules, setup.mesh,
                                                                view["targets"].shape))
            cache[key] = jax.jit(fn, in_shardings=(setup.param_shardings, shardings), out_shardings=out_sh)
        placed = {k: jax.device_put(np.asarray(v), shardings[k]) for k, v in view.items()}
        with L.use_rules(setup.mesh, setup.rules):
            return cache[key](params, placed)

    return run


def replicated_copy(tree, mesh):
    """A fresh, replicated copy of ``tree`` (jit outputs are new buffers, so a later donation of
    ``tree`` by the train step cannot invalidate it)."""
    rep = NamedSharding(mesh, PartitionSpec())
    return jax.jit(lambda t: jax.tree.map(jnp.copy, t), out_shardings=rep)(tree)


# --- old log-probs: the sampler's, or recomputed (rl.old_logprobs) ------------------------------------
def logprob_mismatch(sampler_lp, recomputed_lp, loss_mask, sample_valid) -> dict[str, float]:
    """Mean and max |sampler − recomputed| log-prob over the policy tokens of valid rows: the health
    check of a sampler (its temperature, precision, weight sync). 0 when there is no such token."""
    diff = np.abs(np.asarray(sampler_lp, np.float64) - np.asarray(recomputed_lp, np.float64))
    sel = (np.asarray(loss_mask) > 0) & (np.asarray(sample_valid)[:, None] > 0)
    if not sel.any():
        return {"rollout/logprob_mismatch": 0.0, "rollout/logprob_mismatch_max": 0.0}
    return {"rollout/logprob_mismatch": float(diff[sel].mean()), "rollout/logprob_mismatch_max": float(diff[sel].max())}


class OldLogprobs:
    """π_old for the step (``rl.old_logprobs``, train/run_config.py): computes the batch's target
    log-probs under the pre-update params with the reference forward (same model function, dtype
    and temperature as the train step), reports the sampler-vs-recomputed mismatch, and with
    mode "recompute" writes them into ``batch["old_logprobs"]``. ``fn`` may be an existing
    :func:`reference_logprobs_fn` (it takes the params as an argument, so the KL reference's serves)."""

    def __init__(self, setup, loss_cfg, compute_dtype=jnp.float32, mode: str = "sampler", fn=None):
        if mode not in ("sampler", "recompute"):
            raise ValueError(f"rl.old_logprobs must be 'sampler' or 'recompute', got {mode!r}")
        self.mode = mode
        self.fn = fn if fn is not None else reference_logprobs_fn(setup, loss_cfg, compute_dtype)

    def __call__(self, params, batch: dict) -> dict[str, float]:
        recomputed = np.asarray(self.fn(params, batch), np.float32)
        metrics = logprob_mismatch(batch["old_logprobs"], recomputed, batch["loss_mask"], batch["sample_valid"])
        if self.mode == "recompute":
            batch["old_logprobs"] = recomputed
        return metrics
