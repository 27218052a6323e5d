"""Batch assembly for the evolve step: samples and their advantages → the train step's packed rows.

Rollouts are packed into rows of a token budget (``rl.max_tokens_per_row``) as segments, the
layout of ``data.packing``: each segment has its own positions and next-token targets, and
attention never crosses a segment. A row holds, per sample, the student sequence (prompt + its
own turns + observations) with the policy-token mask, the sampler's log-probs and its group
advantage on every token. When a bundle was retrieved for its request, the teacher rows mirror the
student rows (same row, same segment order): the same policy and observation tokens after a
prompt whose system prompt carries the decision guide. ``teacher_index[b, t]`` is the teacher-row
position that predicts the same token as student position t, so the teacher's log-probs are
gathered into student positions inside the step. Per-device memory is then bounded by the budget
× the rows of a micro-batch, not by the longest rollout × the batch size. Only samples that train
are placed; the row count is rounded up to grad_accum × batch-mesh size × a power of two
(:func:`bucket_rows`), so a run compiles a handful of shapes. The loss weights of
train/rl/loss_weights.py, computed here from the whole step, make accumulation exact.

Images (``agent.observation_pixels``): a sample lists the files behind its image placeholders, in
order. :func:`~genevolve_jax.train.rl.sample_images.prepare_images` decodes them and checks them
against the placeholders; the mask stage (train/rl/masking.py) calls it before advantages, so a
sample whose images are unreadable or do not match is masked before it counts in its group. When
any placed sample has images, the batch gains per-row image blocks (``row_pixel_values``
[B, P, C·T·P·P] and the host-computed vision inputs of its grids, ``row_vision_*``): a row's block
holds its segments' images in segment order (the model scatters image features into the row's placeholders in that order), and
each segment carries the MRoPE position ids of the model's rope index, for student and teacher
rows. The blocks are batch-major, so gradient accumulation splits them with the rows, and P is
rounded up to ``rl.patch_multiple`` so that steps reuse compiles. Text-only batches have exactly
the text layout.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from genevolve_jax.data import packing
from genevolve_jax.models.qwen3_vl.vision import VisionInputs
from genevolve_jax.sharding import logical
from genevolve_jax.train.rl.records import RolloutSample
from genevolve_jax.train.rl.sample_images import ImageBatchSpec, SampleImages, mrope_positions, prepare_images
from genevolve_jax.train.runtime.batch_layout import ROW_IMAGE_FIELDS


def _bucket(n: int, multiple: int) -> int:
    return max(multiple, -(-n // multiple) * multiple)


# --- images ---------------------------------------------------------------------------------------
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


def batch_row_multiple(mesh, rules, grad_accum_steps: int) -> int:
    """Rows of an evolve batch are a multiple of this: every micro-batch splits over the mesh's
    batch axes."""
    axes = rules.get(logical.BATCH)
    axes = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
    return int(grad_accum_steps) * math.prod(int(mesh.shape[a]) for a in axes if a in mesh.shape)


def bucket_rows(needed: int, multiple: int) -> int:
    """The row count of a batch: the smallest ``multiple``·2^j ≥ ``needed``. ``multiple`` is
    grad_accum × the batch-mesh size, so a run sees only a handful of row counts (one compile
    each) and every count splits evenly into micro-batches and devices."""
    if multiple < 1:
        raise ValueError(f"row multiple must be >= 1, got {multiple}")
    rows = multiple
    while rows < needed:
        rows *= 2
    return rows


def row_lengths(max_tokens_per_row: int, buckets: int) -> list[int]:
    """The row lengths a run may use: k/n of the budget for k = 1..n, rounded up to 16 tokens."""
    return sorted({min(max_tokens_per_row, -(-max_tokens_per_row * k // buckets // 16) * 16)
                   for k in range(1, buckets + 1)})


def choose_row_length(samples: Sequence[RolloutSample], lengths: Sequence[int]) -> int:
    """The row length of a step: the shortest of ``lengths`` that holds its longest trained sample
    (its teacher row included); the step's rollouts are then packed into rows of that length.
    Rollouts shorter than the budget train without its padding (tiny_cpu's ~450–700-token rollouts
    in rows of 768 instead of 1024), and a run meets few lengths (the shortest that fits, not the
    one that packs tightest, which would add row counts: one more compile each)."""
    longest = max((row_tokens(s) for s in samples if s.valid), default=0)
    for length in sorted(lengths):
        if length >= longest:
            return length
    raise ValueError(f"a trained sample needs {longest} tokens, more than the longest row {max(lengths)}")


def row_tokens(sample: RolloutSample) -> int:
    """Tokens a sample takes in its row: its own, or its teacher row's when that is longer (the
    teacher rows mirror the student rows, so both must fit the budget)."""
    return max(len(sample.token_ids), len(sample.teacher_ids()[0]))


def drop_oversized_teachers(samples: Sequence[RolloutSample], budget: int) -> tuple[list[RolloutSample], int]:
    """Samples whose teacher row (guide + trajectory) would not fit ``budget`` tokens lose their
    teacher prompt (they train on GRPO alone); returns (samples, how many)."""
    out, dropped = [], 0
    for s in samples:
        if s.valid and s.has_bundle and len(s.teacher_ids()[0]) > budget >= len(s.token_ids):
            s, dropped = s.with_teacher_prompt(None), dropped + 1
        out.append(s)
    return out, dropped


def place_samples(samples: Sequence[RolloutSample], budget: int) -> list[list[int]]:
    """Rows of sample indices (first-fit decreasing by :func:`row_tokens`); only samples that
    train get a place: a masked sample adds nothing to the loss."""
    chosen = [i for i, s in enumerate(samples) if s.valid]
    rows = packing.assign_rows([row_tokens(samples[i]) for i in chosen], budget, sort=True)
    return [[chosen[j] for j in row] for row in rows]


def assemble_evolve_batch(samples: Sequence[RolloutSample], advantages: Sequence[float], *, seq_len: int,
                          pad_id: int = 0, row_multiple: int = 1, num_rows: int | None = None, loss_cfg=None,
                          image_spec: ImageBatchSpec | None = None, images: Mapping[str, SampleImages] | None = None,
                          patch_budget: int | None = None, old_logprobs: bool = True) -> dict[str, np.ndarray]:
    """Packed rows of ``seq_len`` tokens (the budget, ``rl.max_tokens_per_row``) for the evolve loss.

    Trained samples are packed first-fit decreasing (:func:`place_samples`), each a segment with
    its own positions; the teacher rows mirror them (same row, same segment order; a teacher
    segment holds the guide prompt and the trajectory). ``teacher_index[r, t]`` is the teacher-row
    position that predicts the same token as student position t. The number of rows is
    :func:`bucket_rows` of what the packing needs (``num_rows`` fixes it), so that steps share
    compiled shapes; padding rows and tokens weigh nothing. Per-token ``advantages`` and the
    weight fields of train/rl/loss_weights.py (from ``loss_cfg``'s aggregation and SDL top-k
    fraction; the paper's defaults when None) make the loss exact over micro-batches.

    ``images`` maps sample ids to their :func:`prepare_images` result (the mask stage's); samples
    not in it are prepared here, and one that cannot be trained on raises: the mask stage, not
    assembly, decides what trains. A row's image block holds its segments' images in order; its
    patch count is rounded up to ``image_spec.patch_multiple`` (or fixed by ``patch_budget``).
    ``old_logprobs`` False leaves π_old out (an on-policy step takes it from its own forward); the
    sampler's log-probs are always there as ``sampler_logprobs`` for the mismatch check."""
    from genevolve_jax.train.rl.loss_weights import loss_weights

    if loss_cfg is None:
        from genevolve_jax.train.losses.config import default_loss_config
        loss_cfg = default_loss_config()
    if len(samples) != len(advantages):
        raise ValueError(f"{len(samples)} samples but {len(advantages)} advantages")
    if not samples:
        raise ValueError("assemble_evolve_batch needs at least one sample")
    longest = max((row_tokens(s) for s in samples if s.valid), default=0)
    if longest > seq_len:
        raise ValueError(f"a trained sample needs {longest} tokens, more than the row budget {seq_len} "
                         "(the mask stage masks longer rollouts; drop_oversized_teachers drops long guides)")
    placement = place_samples(samples, seq_len)
    rows = num_rows or bucket_rows(max(len(placement), 1), row_multiple)
    if rows < len(placement) or rows % row_multiple:
        raise ValueError(f"num_rows {rows} must hold the {len(placement)} packed rows and be a multiple of "
                         f"{row_multiple}")
    blocks = _decoded_images(samples, placement, images, image_spec)
    student_rows, teacher_rows, index_rows = [], [], []
    for row in placement:
        student, teacher, index = _packed_row([samples[i] for i in row], [float(advantages[i]) for i in row],
                                              [blocks.get(i) for i in row], image_spec, seq_len, pad_id)
        student_rows.append(student)
        teacher_rows.append(teacher)
        index_rows.append(index)

    empty = _pack_row([], seq_len, pad_id)
    student_rows += [empty] * (rows - len(placement))
    teacher_rows += [_pack_row([], seq_len, pad_id, fields=False)] * (rows - len(placement))
    index_rows += [np.zeros(seq_len, np.int32)] * (rows - len(placement))
    batch = {k: np.stack([r[k] for r in student_rows]) for k in student_rows[0]}
    for k in ("input_ids", "targets", "segment_ids", "position_ids"):
        batch[f"teacher_{k}"] = np.stack([r[k] for r in teacher_rows])
    batch["teacher_index"] = np.stack(index_rows)
    # Token fields sit at targets (shifted by one); trained/bundle mark every token of a segment.
    on_segment = batch["segment_ids"] > 0
    trained = np.where(on_segment, _segment_constant(batch.pop("trained"), batch["segment_ids"]), 0.0)
    bundle = np.where(on_segment, _segment_constant(batch.pop("bundle"), batch["segment_ids"]), 0.0)
    batch.update(loss_weights(batch["loss_mask"], batch["segment_ids"], trained, bundle,
                              aggregation=str(loss_cfg.grpo.aggregation), topk_frac=float(loss_cfg.sdl.topk_frac)))
    if old_logprobs:
        batch["old_logprobs"] = batch["sampler_logprobs"].copy()
    batch["row_weight"] = np.full(rows, 1.0 / rows, np.float32)
    if blocks:
        row_blocks = [_concat_blocks([blocks[i] for i in row if i in blocks]) for row in placement]
        row_blocks += [None] * (rows - len(placement))
        batch.update(_image_blocks(row_blocks, rows, image_spec, patch_budget))
    return batch


def _decoded_images(samples, placement, images, image_spec) -> dict[int, SampleImages]:
    """The decoded images of the placed samples, by sample index: the mask stage's, or decoded
    here; a sample that cannot be trained on raises (the mask stage decides what trains)."""
    blocks: dict[int, SampleImages] = {}
    for i in (i for row in placement for i in row):
        s = samples[i]
        got = (images or {}).get(s.sample_id)
        if got is None:
            got = prepare_images(s, image_spec)
        if isinstance(got, str):
            raise ValueError(f"sample {s.sample_id} cannot be trained on ({got}): mask it before assembly "
                             "(train/rl/masking.py)")
        if got is not None:
            blocks[i] = got
    return blocks


def _packed_row(samples: Sequence[RolloutSample], advantages: Sequence[float], blocks: Sequence[SampleImages | None],
                image_spec, seq_len: int, pad_id: int) -> tuple[dict, dict, np.ndarray]:
    """(student row, teacher row, teacher_index) of samples packed as consecutive segments."""
    trajs, t_trajs, t_index, offset, t_offset = [], [], np.zeros(seq_len, np.int32), 0, 0
    for s, advantage, img in zip(samples, advantages, blocks):
        t_ids, t_mask = s.teacher_ids()
        positions = teacher_positions = None
        if img is not None:
            positions = mrope_positions(s.token_ids, img.grid, image_spec)
            teacher_positions = mrope_positions(t_ids, img.grid, image_spec)
            if teacher_positions is None:
                raise ValueError(f"sample {s.sample_id}: its teacher prompt adds image placeholders; the teacher "
                                 "stage must not attach such a guide")
        n = len(s.token_ids)
        fields = {"sampler_logprobs": np.asarray(s.logprobs, np.float32),
                  "advantages": np.full(n, advantage, np.float32),
                  "trained": np.ones(n, np.float32), "bundle": np.full(n, float(s.has_bundle), np.float32)}
        trajs.append(packing.Trajectory(np.asarray(s.token_ids, np.int32), np.asarray(s.loss_mask, np.float32),
                                        position_ids=positions, token_fields=fields))
        t_trajs.append(packing.Trajectory(np.asarray(t_ids, np.int32), np.asarray(t_mask, np.float32),
                                          position_ids=teacher_positions))
        # Student position t predicts token t+1; for t+1 ≥ prompt_length the same token sits at
        # teacher position t + shift (teacher and student prompts differ in length). Off-mask
        # positions read position 0 (masked out anyway).
        shift = len(t_ids) - n
        pos = np.arange(n - 1)
        on = np.asarray(s.loss_mask[1:], bool) & (pos + shift >= 0)
        t_index[offset + pos[on]] = t_offset + pos[on] + shift
        offset, t_offset = offset + n, t_offset + len(t_ids)
    return _pack_row(trajs, seq_len, pad_id), _pack_row(t_trajs, seq_len, pad_id), t_index


def _pack_row(trajs: Sequence[packing.Trajectory], length: int, pad_id: int, fields: bool = True) -> dict:
    """One row holding ``trajs`` as consecutive segments (data/packing.py's layout)."""
    if trajs:
        out, _ = packing.pack(trajs, length, pad_id=pad_id, overflow="error", num_rows=1)
        return {k: v[0] for k, v in out.items()}
    row = {"input_ids": np.full(length, pad_id, np.int32), "targets": np.zeros(length, np.int32),
           "loss_mask": np.zeros(length, np.float32), "segment_ids": np.zeros(length, np.int32),
           "position_ids": np.zeros((3, length), np.int32)}
    if fields:
        row.update({k: np.zeros(length, np.float32) for k in ("sampler_logprobs", "advantages", "trained", "bundle")})
    return row


def _segment_constant(values: np.ndarray, segment_ids: np.ndarray) -> np.ndarray:
    """A per-segment constant carried as a token field (0 at each segment's last token, where
    targets stop) spread to every token of its segment."""
    out = np.zeros(values.shape, np.float32)
    for r in range(values.shape[0]):
        seg = segment_ids[r]
        for sid in np.unique(seg[seg > 0]):
            on = seg == sid
            out[r, on] = values[r, on].max()
    return out


def _concat_blocks(blocks: Sequence[SampleImages]) -> SampleImages | None:
    """One row's image block: its segments' images in order, vision segments kept distinct."""
    if not blocks:
        return None
    segs, base = [], 0
    for b in blocks:
        segs.append(b.aux.segment_ids + base)
        base += int(b.aux.segment_ids.max()) + 1
    aux = VisionInputs(pos_indices=np.concatenate([b.aux.pos_indices for b in blocks]),
                       pos_weights=np.concatenate([b.aux.pos_weights for b in blocks]),
                       rope_positions=np.concatenate([b.aux.rope_positions for b in blocks]),
                       segment_ids=np.concatenate(segs))
    return SampleImages(np.concatenate([b.pixels for b in blocks]), aux, np.concatenate([b.grid for b in blocks]))
