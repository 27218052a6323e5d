"""The train batch's fields: their logical axes, their shardings, and how they feed the model.

A batch is a dict of host arrays, batch-major. Text fields are [B, T] (``input_ids``, ``targets``,
``loss_mask``, ``segment_ids``, …) with ``position_ids`` [B, 3, T]. SFT image batches add a flat
``pixel_values`` (not batch-major, so they cannot be split into micro-batches) and a static
``image_grid_thw``; RL image batches add per-row image blocks (``row_pixel_values`` and the
``row_vision_*`` inputs of their grids), which split and shard with the rows. Teacher rows of the
evolve batch are the ``teacher_*`` fields; they share their student row's image block.
"""
from __future__ import annotations

from typing import Any, Mapping

from jax.sharding import NamedSharding

from genevolve_jax.models.qwen3_vl.model import RowImages
from genevolve_jax.sharding import logical

# Logical axes of batch fields; any other [B, T] field is (batch, seq), any [B] field (batch,).
BATCH_AXES = {"position_ids": (logical.BATCH, None, logical.SEQ),
              "teacher_position_ids": (logical.BATCH, None, logical.SEQ),
              "row_pixel_values": (logical.BATCH, None, None),
              "row_vision_pos_indices": (logical.BATCH, None, None),
              "row_vision_pos_weights": (logical.BATCH, None, None),
              "row_vision_rope_positions": (logical.BATCH, None, None),
              "row_vision_segment_ids": (logical.BATCH, None)}
ROW_IMAGE_FIELDS = ("row_pixel_values", "row_vision_pos_indices", "row_vision_pos_weights",
                    "row_vision_rope_positions", "row_vision_segment_ids")
NOT_BATCH_MAJOR = ("pixel_values",)
STATIC_FIELDS = ("image_grid_thw",)  # host-side; part of the compile key, never traced


def batch_axes(name: str, ndim: int) -> tuple:
    if name in NOT_BATCH_MAJOR:
        return (None,) * ndim
    if name in BATCH_AXES:
        return BATCH_AXES[name]
    return ((logical.BATCH, logical.SEQ) + (None,) * max(0, ndim - 2))[:ndim]


def batch_shardings(batch: Mapping[str, Any], mesh, rules) -> dict:
    return {k: NamedSharding(mesh, logical.partition_spec(batch_axes(k, v.ndim), rules, mesh, v.shape))
            for k, v in batch.items()}


def row_images_of(batch: Mapping[str, Any]) -> RowImages | None:
    """The batch's per-row image blocks, or None for text rows and SFT's flat images."""
    if "row_pixel_values" not in batch:
        return None
    return RowImages(pixel_values=batch["row_pixel_values"], pos_indices=batch["row_vision_pos_indices"],
                     pos_weights=batch["row_vision_pos_weights"], rope_positions=batch["row_vision_rope_positions"],
                     segment_ids=batch["row_vision_segment_ids"])


def teacher_view(batch: Mapping[str, Any]) -> dict:
    """The teacher rows of an evolve batch as a batch of their own: a teacher row holds its
    student row's images in the same order, so it keeps the same image block."""
    view = {"input_ids": batch["teacher_input_ids"], "position_ids": batch["teacher_position_ids"],
            "segment_ids": batch["teacher_segment_ids"], "targets": batch["teacher_targets"]}
    view.update({k: batch[k] for k in ROW_IMAGE_FIELDS if k in batch})
    return view


def hidden_states_of(model, batch: Mapping[str, Any], image_features=None, dropout_key=None):
    """[B, T, D] final hidden states of the batch's rows through the model's packed-row forward
    (``dropout_key``: adapter dropout, the train step's trained forward only)."""
    return model.packed_hidden_states(batch["input_ids"], batch["position_ids"], batch.get("segment_ids"),
                                      pixel_values=batch.get("pixel_values"),
                                      image_grid_thw=batch.get("image_grid_thw", ()),
                                      row_images=row_images_of(batch), image_features=image_features,
                                      dropout_key=dropout_key)
