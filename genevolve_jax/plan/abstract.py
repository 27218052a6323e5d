"""Abstract train state and batches: shapes, dtypes and shardings, nothing allocated.

The model is built under ``nnx.eval_shape`` and split exactly as ``train.state.create_train_state``
splits it (trainable / frozen / rest), the optimiser state comes from ``jax.eval_shape(tx.init)``,
and every leaf becomes a ``jax.ShapeDtypeStruct`` carrying the sharding the run would give it. The
batches are the trainer's layouts (data/packing.py rows for SFT, the evolve batch of
train/rl/batch_assembly.py for GRPO + SDL) at the shapes a config asks for.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from genevolve_jax.sharding import logical
from genevolve_jax.train.runtime.state import TrainSetup, make_optimizer, opt_state_shardings


@dataclasses.dataclass
class AbstractState:
    setup: TrainSetup
    params: dict          # {"train": State, "frozen": State} of ShapeDtypeStruct with shardings
    opt_state: Any


@dataclasses.dataclass(frozen=True)
class Buffer:
    """One array of the state, as one device holds it."""
    name: str
    shape: tuple
    dtype: str
    bytes_per_device: int


def model_config(run_cfg, section, model_config_path: str = ""):
    """The Qwen3VLConfig a run of ``run_cfg`` trains: the preset (or ``model.path``'s config) with
    ``model.param_dtype`` / ``model.dtype`` and the layers' layout (``model.scan_layers``) as
    ``train.run_setup`` builds it, the section's activation-checkpoint policy (``<section>.remat``)
    and the LoRA adapters of ``model.lora``.

    ``model_config_path``: an HF config.json (or its folder) instead of the config's preset."""
    from genevolve_jax.models.qwen3_vl import config as qwen_config
    from genevolve_jax.train.runtime.model_setup import (build_tokenizer, lora_config, random_model_config,
                                                         validate_model)

    validate_model(run_cfg.model)
    path = model_config_path or run_cfg.model.path
    if path:
        cfg = qwen_config.Qwen3VLConfig.from_pretrained(path).replace(param_dtype=run_cfg.model.param_dtype,
                                                            dtype=run_cfg.model.dtype)
    else:
        tokenizer = build_tokenizer(run_cfg.model) if run_cfg.model.preset == "tiny" else None
        cfg = random_model_config(run_cfg.model, tokenizer)
    return cfg.replace(remat=section.remat, scan_layers=bool(run_cfg.model.scan_layers),
                       lora=lora_config(run_cfg.model))


def _split(model, freeze: Callable | None):
    # The same split as create_train_state: frozen params, trainable params, everything else.
    frozen_filter = nnx.Nothing if freeze is None else nnx.All(nnx.Param, freeze)
    graphdef, frozen, train, rest = nnx.split(model, frozen_filter, nnx.Param, ...)
    return graphdef, train, frozen, rest


def with_shardings(state, shardings):
    """``state`` (arrays or ShapeDtypeStructs, in nnx Variables or bare) as ShapeDtypeStructs in ``shardings``."""
    def put(v, sh):
        value = v.get_value() if isinstance(v, nnx.Variable) else v
        sds = jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sh)
        return v.replace(sds) if isinstance(v, nnx.Variable) else sds
    return jax.tree.map(put, state, shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))


def abstract_train_state(config, train_cfg, mesh: Mesh, strategy: str, *, freeze: Callable | None = None,
                         seed: int = 0) -> AbstractState:
    """``create_train_state`` without allocating: the same setup, abstract params and optimiser."""
    from genevolve_jax.models.qwen3_vl.model import Qwen3VLForConditionalGeneration

    rules = logical.rules_for(strategy)
    model = nnx.eval_shape(lambda: Qwen3VLForConditionalGeneration(config, rngs=nnx.Rngs(seed)))
    graphdef, train_abs, frozen_abs, rest_abs = _split(model, freeze)
    if jax.tree.leaves(rest_abs):
        raise ValueError("the model has non-parameter state; an abstract plan cannot hold it")
    train_sh = logical.state_shardings(train_abs, mesh, rules)
    frozen_sh = logical.state_shardings(frozen_abs, mesh, rules)
    # Its length and peak change no shape or byte.
    tx, schedule = make_optimizer(train_cfg, total_steps=1, adapters=config.lora is not None)
    params = {"train": with_shardings(train_abs, train_sh), "frozen": with_shardings(frozen_abs, frozen_sh)}
    with logical.use_rules(mesh, rules):
        opt_abs = jax.eval_shape(tx.init, params["train"])
    opt_sh = opt_state_shardings(opt_abs, train_sh, train_abs, mesh)
    opt_state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), opt_abs, opt_sh)
    setup = TrainSetup(graphdef=graphdef, rest=rest_abs, tx=tx, schedule=schedule, mesh=mesh, rules=rules,
                       param_shardings={"train": train_sh, "frozen": frozen_sh}, opt_shardings=opt_sh)
    return AbstractState(setup, params, opt_state)


def shard_bytes(x) -> int:
    """Bytes one device holds of an abstract (or real) array: its shard shape × itemsize."""
    shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
    return int(math.prod(shape)) * jnp.dtype(x.dtype).itemsize


def _arrays(tree):
    return [x for x in jax.tree.leaves(tree) if hasattr(x, "shape") and hasattr(x, "dtype")]


def bytes_per_device(tree) -> int:
    return sum(shard_bytes(x) for x in _arrays(tree))


def buffers(tree, prefix: str) -> list[Buffer]:
    out = []
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if not hasattr(x, "shape"):
            continue
        name = prefix + "/" + "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                                       for k in path if str(getattr(k, "key", "")) != "value")
        out.append(Buffer(name, tuple(int(d) for d in x.shape), str(jnp.dtype(x.dtype)), shard_bytes(x)))
    return out


def abstract_copy(tree, shardings):
    """A second copy of ``tree`` in ``shardings`` (the KL reference: the policy's layout)."""
    return with_shardings(jax.tree.map(lambda x: x, tree, is_leaf=lambda x: isinstance(x, nnx.Variable)),
                           shardings)


# --- batches ----------------------------------------------------------------------------------------
def _sds(shape, dtype, mesh, rules, name):
    from genevolve_jax.train.runtime.batch_layout import batch_axes
    spec = logical.partition_spec(batch_axes(name, len(shape)), rules, mesh, shape)
    return jax.ShapeDtypeStruct(tuple(shape), np.dtype(dtype), sharding=NamedSharding(mesh, spec))


@dataclasses.dataclass(frozen=True)
class ImageShape:
    """Images per row and their side in pixels (square, a multiple of patch × merge)."""
    per_row: int = 0
    side: int = 448

    def patches(self, vision) -> int:
        grid = self.side // vision.patch_size
        return grid * grid   # one temporal patch: an image is 2 identical frames

    def grid(self, vision) -> tuple[int, int, int]:
        g = self.side // vision.patch_size
        return (1, g, g)


def sft_batch(config, rows: int, row_len: int, mesh: Mesh, rules, images: ImageShape = ImageShape()) -> dict:
    """The SFT batch (data/packing.py fields) at ``rows`` × ``row_len``; with images, SFT's flat
    ``pixel_values`` plus the static ``image_grid_thw`` of every image of the batch."""
    from genevolve_jax.data.packing import Trajectory, pack
    one, _ = pack([Trajectory(np.zeros(4, np.int32), np.ones(4, np.float32))], row_len, num_rows=1)
    batch = {k: _sds((rows,) + v.shape[1:], v.dtype, mesh, rules, k) for k, v in one.items()}
    if images.per_row:
        v = config.vision
        n = rows * images.per_row
        batch["pixel_values"] = _sds((n * images.patches(v), v.patch_dim), np.float32, mesh, rules, "pixel_values")
        batch["image_grid_thw"] = np.asarray([images.grid(v)] * n, np.int64)
    return batch


def evolve_batch(config, rows: int, seq_len: int, mesh: Mesh, rules, *, kl: bool, old_logprobs: bool = True,
                 images: ImageShape = ImageShape(), patch_multiple: int = 1024) -> dict:
    """The evolve batch the trainer assembles: ``sampler_logprobs`` always, ``old_logprobs`` unless
    the step is on-policy, ``ref_logprobs`` when the KL term is on, and the per-row image blocks
    when rows carry images."""
    i32, f32 = np.int32, np.float32
    bt = (rows, seq_len)
    fields = {"input_ids": (bt, i32), "targets": (bt, i32), "loss_mask": (bt, f32), "segment_ids": (bt, i32),
              "position_ids": ((rows, 3, seq_len), i32), "sampler_logprobs": (bt, f32),
              "teacher_input_ids": (bt, i32), "teacher_targets": (bt, i32), "teacher_segment_ids": (bt, i32),
              "teacher_position_ids": ((rows, 3, seq_len), i32), "teacher_index": (bt, i32),
              "advantages": (bt, f32), "row_weight": ((rows,), f32), "sdl_k": (bt, np.int32),
              **{k: (bt, f32) for k in ("weight_grpo", "weight_token", "weight_seq", "weight_sample", "weight_sdl",
                                        "bundle")}}   # train/rl/loss_weights.py
    if old_logprobs:
        fields["old_logprobs"] = (bt, f32)
    if kl:
        fields["ref_logprobs"] = (bt, f32)
    if images.per_row:
        v = config.vision
        merge2 = v.spatial_merge_size ** 2
        bucket = math.lcm(patch_multiple, merge2)
        p = -(-images.per_row * images.patches(v) // bucket) * bucket
        fields.update({"row_pixel_values": ((rows, p, v.patch_dim), f32),
                       "row_vision_pos_indices": ((rows, p, 4), i32), "row_vision_pos_weights": ((rows, p, 4), f32),
                       "row_vision_rope_positions": ((rows, p, 2), i32), "row_vision_segment_ids": ((rows, p), i32)})
    return {k: _sds(shape, dt, mesh, rules, k) for k, (shape, dt) in fields.items()}


def replicated(mesh: Mesh):
    return NamedSharding(mesh, PartitionSpec())


def abstract_rng(mesh: Mesh):
    key = jax.eval_shape(lambda: jax.random.key(0))
    return jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=replicated(mesh))
