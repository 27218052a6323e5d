"""Pieces both drivers (``genevolve sft`` and ``genevolve train``) build the same way: the
tokenizer, the model (random preset or a checkpoint), the mesh, and the checks a run config must
pass before anything compiles."""
from __future__ import annotations

import dataclasses
import os

import jax
import ml_collections

from genevolve_jax.config_checks import Checker
from genevolve_jax.models.qwen3_vl.config import LORA_TARGETS, head_rules_broken
from genevolve_jax.models.qwen3_vl.config import TEXT_LORA_TARGETS as LORA_TEXT_TARGETS
from genevolve_jax.sharding.mesh import MeshError, resolve_axis_sizes

PRESETS = ("tiny", "qwen3vl_2b", "qwen3vl_8b")
# Quick CPU compiles for the embedded defaults; real runs leave XLA's defaults alone.
FAST_CPU = {"xla_backend_optimization_level": 0}
# XLA:GPU schedules and rematerialises a program to fit 80 % of the device's memory, less the
# program's inputs and outputs, times xla_gpu_memory_limit_slop_factor / 100 (95 by default),
# whatever share JAX's allocator was given (XLA_PYTHON_CLIENT_MEM_FRACTION, 0.75 by default). A
# trainer given 0.55 of each GPU beside its SGLang server was compiled as if it had 0.76.
XLA_GPU_MEMORY_BASE = 0.80
XLA_GPU_DEFAULT_SLOP = 95
JAX_GPU_DEFAULT_FRACTION = 0.75


def default_model_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        "path": "",              # orbax model checkpoint or HF directory; empty = random init of the preset
        "preset": "tiny",        # tiny | qwen3vl_2b | qwen3vl_8b (random init only)
        "num_layers": 0,         # random init: override the preset's decoder depth (0 = keep)
        "vision_depth": 0,       # random init: override the vision depth (0 = keep)
        "hidden_size": 0,        # random init: override the decoder width (0 = keep; heads follow head_dim)
        "seed": 0,
        "tokenizer": "",         # tokenizer folder; empty = the checkpoint's, else the in-repo tiny one
        "param_dtype": "float32",
        "dtype": "float32",
        "fast_compile": False,   # XLA backend optimisation level 0 (CPU demos and tests)
        # Train the decoder layers as one lax.scan over stacked parameters: one compiled layer body
        # (a 36-layer step compiles in a fraction of the unrolled time and memory; MaxText's TPU
        # default), same values. Engines decode with the layer list and convert what they receive.
        "scan_layers": False,
        # Low-rank adapters (models/lora.py): rank 0 = off (the model is exactly the base). With a
        # rank, only the adapters train (the base is frozen; it may be held in bf16 via param_dtype,
        # the adapters stay float32); scale = alpha / rank as PEFT's. targets: the text decoder's
        # projections by default; "vision.qkv", "vision.proj", "vision.linear_fc1/2" add the
        # vision blocks', and "lm_head" the untied output head's (for a base whose head must move,
        # e.g. configs/tiny_cpu.py's random one; it costs a [D, V] temporary). dropout: PEFT's
        # lora_dropout on the adapters' input, in train steps only (sampling, the KL reference, π_old
        # and teacher forwards, eval and export are deterministic); 0 when the head is a target.
        # head_rank: the head adapter's rank when "lm_head" is a target (0 = rank), at the same
        # scale alpha / rank (PEFT's rank_pattern / alpha_pattern; SGLang syncs pad to the larger).
        "lora": ml_collections.ConfigDict({"rank": 0, "alpha": 16.0, "targets": list(LORA_TEXT_TARGETS),
                                           "dropout": 0.0, "head_rank": 0}),
    })


def validate_model(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    check = Checker("model")
    check.one_of(cfg.preset, "preset", PRESETS)
    if cfg.path and not os.path.exists(cfg.path):
        check.fail("path", f"{cfg.path!r} does not exist")
    for name in ("num_layers", "vision_depth", "hidden_size"):
        check.integer(cfg[name], name, 0)
    check.integer(cfg.seed, "seed")
    check(isinstance(cfg.tokenizer, str), "tokenizer", "a folder path (empty: the checkpoint's)", cfg.tokenizer)
    for name in ("param_dtype", "dtype"):
        check(cfg[name] in ("float32", "bfloat16"), name, "float32 or bfloat16", cfg[name])
    check.boolean(cfg.fast_compile, "fast_compile")
    check.boolean(cfg.scan_layers, "scan_layers")
    lora = cfg.lora
    check.integer(lora.rank, "lora.rank", 0)
    check.number(lora.alpha, "lora.alpha", low=0, low_open=True)
    check.number(lora.dropout, "lora.dropout", low=0, high=1, high_open=True)
    targets = list(lora.targets) if isinstance(lora.targets, (list, tuple)) else None
    check(bool(targets) and set(targets) <= set(LORA_TARGETS), "lora.targets",
          f"a non-empty list from {list(LORA_TARGETS)}", lora.targets)
    check.integer(lora.head_rank, "lora.head_rank", 0)
    if lora.rank:
        for field, rule in head_rules_broken(targets, lora.dropout, lora.head_rank):
            check(False, f"lora.{field}", rule, lora[field])
    return cfg


def lora_config(model_cfg):
    """``model.lora`` as the model's LoRAConfig, or None when its rank is 0."""
    from genevolve_jax.models.qwen3_vl.config import LoRAConfig
    lora = model_cfg.lora
    rank, alpha, targets, dropout = int(lora.rank), float(lora.alpha), tuple(lora.targets), float(lora.dropout)
    head_rank = int(lora.head_rank) or None
    return LoRAConfig(rank=rank, alpha=alpha, targets=targets, dropout=dropout, head_rank=head_rank) if rank else None


def compiler_options(model_cfg) -> dict:
    return dict(FAST_CPU) if model_cfg.fast_compile else {}


def gpu_memory_options(fraction: float) -> dict:
    """XLA:GPU options whose memory limit is ``fraction`` of the device (95 % of it, as XLA keeps of
    its own 80 % by default): a program compiled under them is scheduled for the allocator's share."""
    return {"xla_gpu_memory_limit_slop_factor": max(1, round(XLA_GPU_DEFAULT_SLOP * fraction / XLA_GPU_MEMORY_BASE))}


def device_compiler_options() -> dict:
    """What the trainer's jitted steps add on this process's backend: on GPU, the allocator's share
    (XLA_PYTHON_CLIENT_MEM_FRACTION) as XLA's memory limit (``genevolve plan`` compiles with the
    same options for the share it plans)."""
    if jax.default_backend() != "gpu":
        return {}
    return gpu_memory_options(float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION") or JAX_GPU_DEFAULT_FRACTION))


def build_tokenizer(model_cfg):
    from genevolve_jax.models.loading import load_tokenizer

    if model_cfg.tokenizer:
        return load_tokenizer(model_cfg.tokenizer)
    if model_cfg.path:
        return load_tokenizer(model_cfg.path)
    from genevolve_jax.processing.tokenizer import default_tokenizer
    return default_tokenizer()


def random_model_config(model_cfg, tokenizer):
    """The preset, with vocabulary and vision token ids taken from ``tokenizer`` for the tiny one."""
    from genevolve_jax.models.qwen3_vl import config as qwen_config

    kw = {"param_dtype": model_cfg.param_dtype, "dtype": model_cfg.dtype}
    if model_cfg.preset == "tiny":
        from genevolve_jax.processing.tokenizer import special_token_ids

        ids = special_token_ids(tokenizer)
        cfg = qwen_config.tiny(vocab_size=len(tokenizer), **kw).replace(
            image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    else:
        cfg = getattr(qwen_config, model_cfg.preset)(**kw)
    if model_cfg.num_layers:
        # Deepstack features enter the first text layers, one per index: keep at most that many.
        n = int(model_cfg.num_layers)
        cfg = cfg.replace(text=dataclasses.replace(cfg.text, num_hidden_layers=n),
                          vision=dataclasses.replace(cfg.vision,
                                                     deepstack_visual_indexes=cfg.vision.deepstack_visual_indexes[:n]))
    if model_cfg.get("hidden_size", 0):
        h, t = int(model_cfg.hidden_size), cfg.text
        if h % (2 * t.head_dim):
            raise ValueError(f"model.hidden_size must be a multiple of 2 × head_dim ({2 * t.head_dim}) so that "
                             f"heads and key/value heads divide it, got {h}")
        heads = h // t.head_dim
        kv = max(1, heads * t.num_key_value_heads // t.num_attention_heads)
        cfg = cfg.replace(text=dataclasses.replace(t, hidden_size=h, intermediate_size=t.intermediate_size * h // t.hidden_size,
                                                   num_attention_heads=heads, num_key_value_heads=kv),
                          vision=dataclasses.replace(cfg.vision, out_hidden_size=h))
    if model_cfg.vision_depth:
        keep = tuple(i for i in cfg.vision.deepstack_visual_indexes if i < model_cfg.vision_depth)
        cfg = cfg.replace(vision=dataclasses.replace(cfg.vision, depth=model_cfg.vision_depth,
                                                     deepstack_visual_indexes=keep))
    return cfg


def model_source(model_cfg, tokenizer, remat: str | None = None):
    """A built model (from a checkpoint) or a zero-argument factory (random init, built sharded by
    ``create_train_state`` so a large model never exists whole on one device). ``remat``: the train
    section's activation-checkpoint policy (``sft.remat`` / ``train.remat``)."""
    validate_model(model_cfg)
    if model_cfg.path:
        from genevolve_jax.models.loading import load_model
        return load_model(model_cfg.path, param_dtype=model_cfg.param_dtype, dtype=model_cfg.dtype, remat=remat,
                          scan_layers=model_cfg.scan_layers, lora=lora_config(model_cfg))
    from flax import nnx

    from genevolve_jax.models.qwen3_vl.model import Qwen3VLForConditionalGeneration

    config = random_model_config(model_cfg, tokenizer).replace(scan_layers=bool(model_cfg.scan_layers),
                                                               lora=lora_config(model_cfg))
    if remat:
        config = config.replace(remat=remat)
    seed = int(model_cfg.seed)
    return lambda: Qwen3VLForConditionalGeneration(config, rngs=nnx.Rngs(seed))


def batch_axes(strategy: str) -> tuple[str, ...]:
    """The mesh axes a batch's rows are split over under ``strategy`` (sharding/logical.py)."""
    from genevolve_jax.sharding import logical
    axes = logical.rules_for(strategy).get(logical.BATCH)
    return () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))


def check_mesh(sharding_cfg, rows: int | None = None, rows_field: str = "rows", n_devices: int | None = None) -> int:
    """Resolve the mesh against the devices present and check that ``rows`` (the global batch)
    splits over the batch axes; raises MeshError naming the field, before anything compiles.
    Returns the number of batch shards (the product of the batch axes)."""
    from genevolve_jax.sharding.config import validate

    validate(sharding_cfg)
    n = n_devices or jax.device_count()
    try:
        sizes = resolve_axis_sizes(dict(sharding_cfg.mesh), n)
    except MeshError as e:
        raise MeshError(f"sharding.mesh on {n} devices: {e}") from e
    axes = batch_axes(sharding_cfg.strategy)
    split = 1
    for a in axes:
        split *= sizes.get(a, 1)
    if rows is not None and rows % split:
        raise MeshError(f"{rows_field} = {rows} does not divide over the batch mesh axes {axes} "
                        f"(size {split}) of sharding.mesh {sizes} under strategy {sharding_cfg.strategy!r}")
    return split
