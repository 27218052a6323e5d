"""Qwen3-VL configuration: frozen dataclasses, translated to and from Hugging Face config.json.

Both config.json layouts in the wild are read: transformers 4.57 (``rope_scaling`` + ``rope_theta``
in text_config) and 5.x (``rope_parameters``). Export writes the 5.x layout, which 5.x reads
natively and 4.57-era loaders convert. Any field we need and cannot find is an error that names it.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax.numpy as jnp

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class ConfigError(ValueError):
    """A config.json that is not a Qwen3-VL config we can build; the message names the field."""


@dataclasses.dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 5_000_000.0
    mrope_section: tuple[int, int, int] = (24, 20, 20)
    max_position_embeddings: int = 262144


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    out_hidden_size: int
    num_position_embeddings: int
    deepstack_visual_indexes: tuple[int, ...]
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2


# LoRA targets: the text decoder's projections by their HF/PEFT module names, the vision blocks'
# (not the patch embedding or the mergers) under a "vision." prefix, and the untied output head.
TEXT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VISION_LORA_TARGETS = ("vision.qkv", "vision.proj", "vision.linear_fc1", "vision.linear_fc2")
# The head's adapter (PEFT's and SGLang's "lm_head" target) enters every loss as the kernel
# W + s·A·B (Qwen3VLForConditionalGeneration.lm_head_kernel): there is no input to drop out, and a
# tied head's kernel is the embedding table, so it needs an untied head and lora.dropout 0.
HEAD_LORA_TARGET = "lm_head"
LORA_TARGETS = TEXT_LORA_TARGETS + VISION_LORA_TARGETS + (HEAD_LORA_TARGET,)


def head_rules_broken(targets, dropout: float, head_rank) -> list[tuple[str, str]]:
    """(field, what it must be) for each rule on the head's adapter that these settings break: a
    head adapter is applied as a kernel (W + s·A·B), so its input cannot drop out, and a head rank
    needs the head as a target. LoRAConfig and the run config check (model_setup) both ask here."""
    head = HEAD_LORA_TARGET in tuple(targets)
    out = []
    if head and dropout > 0:
        out.append(("dropout", f"0 when the targets have {HEAD_LORA_TARGET!r} (its adapter is applied as a kernel "
                               "W + s·A·B, so its input cannot drop out)"))
    if head_rank and not head:
        out.append(("head_rank", f"0 (unset) unless the targets have {HEAD_LORA_TARGET!r}"))
    return out


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Low-rank adapters W + (alpha / rank)·A·B on the named projections (not in config.json).

    ``dropout``: PEFT's lora_dropout, on the adapter branch's input in train steps only. A training
    setting, not part of the adapters: :meth:`same_adapters` ignores it.

    ``head_rank``: the head's adapter rank when it differs from ``rank`` (None: ``rank``), at the
    same scale alpha / rank as every other adapter (PEFT's ``rank_pattern`` and ``alpha_pattern``
    for ``lm_head``). The head's delta s·h·A·B moves the logits only within a rank-r subspace of the
    vocabulary, so a head that must learn new outputs needs more rank than the decoder's adapters."""
    rank: int
    alpha: float
    targets: tuple[str, ...] = TEXT_LORA_TARGETS
    dropout: float = 0.0
    head_rank: int | None = None

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"lora rank must be a positive integer, got {self.rank!r}")
        if not self.alpha > 0:
            raise ConfigError(f"lora alpha must be > 0, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"lora dropout must be in [0, 1), got {self.dropout!r}")
        unknown = sorted(set(self.targets) - set(LORA_TARGETS))
        if unknown or not self.targets:
            raise ConfigError(f"lora targets {unknown or '(none)'}: choose from {list(LORA_TARGETS)}")
        if self.head_rank is not None and (not isinstance(self.head_rank, int) or self.head_rank < 1):
            raise ConfigError(f"lora head_rank must be a positive integer or None, got {self.head_rank!r}")
        for field, rule in head_rules_broken(self.targets, self.dropout, self.head_rank):
            raise ConfigError(f"lora {field} must be {rule}, got {getattr(self, field)!r}")
        if self.head_rank == self.rank:    # one spelling per adapter set: equality and same_adapters
            object.__setattr__(self, "head_rank", None)

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank

    @property
    def head(self) -> "LoRAConfig":
        """The head's adapter: rank ``head_rank`` at this config's scale (alpha / rank)."""
        if self.head_rank is None:
            return self
        return dataclasses.replace(self, rank=self.head_rank, alpha=self.head_alpha, head_rank=None)

    @property
    def head_alpha(self) -> float:
        """The alpha that gives the head's rank this config's scale (PEFT's alpha_pattern value)."""
        return float(self.alpha) * (self.head_rank or self.rank) / self.rank

    @property
    def max_rank(self) -> int:
        """The largest adapter rank (an SGLang server's --max-lora-rank must be at least this)."""
        return max(self.rank, self.head_rank or 0)

    @property
    def ranks(self) -> str:
        """The ranks for logs and reports: 'rank 8', or 'rank 8, head rank 64'."""
        return f"rank {self.rank}" + (f", head rank {self.head_rank}" if self.head_rank else "")

    def same_adapters(self, other: "LoRAConfig") -> bool:
        """Whether ``other`` describes the same adapter parameters (ranks, alpha, targets)."""
        return ((self.rank, self.alpha, tuple(self.targets), self.head_rank)
                == (other.rank, other.alpha, tuple(other.targets), other.head_rank))


@dataclasses.dataclass(frozen=True)
class Qwen3VLConfig:
    text: TextConfig
    vision: VisionConfig
    tie_word_embeddings: bool = False
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    # Not part of config.json: how we hold and compute. Norm statistics, rotary tables, softmax and
    # interpolation weights stay float32 whatever these say, as in transformers.
    param_dtype: str = "float32"
    dtype: str = "float32"
    # Also not in config.json: decoder layers stored stacked [L, ...] and run with one scanned
    # body (compile time independent of depth), and the activation-checkpoint policy per layer.
    scan_layers: bool = False
    remat: str = "none"  # "none" | "full" | "save_dots"
    # Not in config.json either: adapters on top of the (then frozen) base; None = no adapters, and
    # the parameter tree is exactly the base model's.
    lora: LoRAConfig | None = None

    def __post_init__(self):
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ConfigError(f"{name} must be one of {sorted(_DTYPES)}, got {getattr(self, name)!r}")
        if self.remat not in ("none", "full", "save_dots"):
            raise ConfigError(f"remat must be one of ['none', 'full', 'save_dots'], got {self.remat!r}")
        t, v = self.text, self.vision
        if t.num_attention_heads % t.num_key_value_heads:
            raise ConfigError("text_config.num_attention_heads must be a multiple of num_key_value_heads, "
                              f"got {t.num_attention_heads} and {t.num_key_value_heads}")
        if sum(t.mrope_section) * 2 != t.head_dim:
            raise ConfigError(f"text_config mrope_section {list(t.mrope_section)} must sum to head_dim/2 = "
                              f"{t.head_dim // 2}")
        if v.hidden_size % v.num_heads:
            raise ConfigError(f"vision_config.hidden_size {v.hidden_size} is not divisible by num_heads {v.num_heads}")
        if v.out_hidden_size != t.hidden_size:
            raise ConfigError(f"vision_config.out_hidden_size {v.out_hidden_size} must equal text_config.hidden_size "
                              f"{t.hidden_size}")
        bad = [i for i in v.deepstack_visual_indexes if not 0 <= i < v.depth]
        if bad:
            raise ConfigError(f"vision_config.deepstack_visual_indexes {bad} outside [0, depth={v.depth})")
        if len(v.deepstack_visual_indexes) > t.num_hidden_layers:
            raise ConfigError("more deepstack_visual_indexes than text decoder layers")
        if self.tie_word_embeddings and self.lora_for(HEAD_LORA_TARGET) is not None:
            raise ConfigError(f"lora target {HEAD_LORA_TARGET!r} needs an untied head; this model ties it to "
                              "embed_tokens (tie_word_embeddings)")

    def lora_for(self, target: str) -> LoRAConfig | None:
        """The adapter config of the projection named ``target`` (TEXT/VISION_LORA_TARGETS), or None."""
        if self.lora is None or target not in self.lora.targets:
            return None
        return self.lora.head if target == HEAD_LORA_TARGET else self.lora

    @property
    def jnp_param_dtype(self):
        return _DTYPES[self.param_dtype]

    @property
    def jnp_dtype(self):
        return _DTYPES[self.dtype]

    def replace(self, **kw) -> "Qwen3VLConfig":
        return dataclasses.replace(self, **kw)

    # --- Hugging Face translation --------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], **overrides) -> "Qwen3VLConfig":
        model_type = d.get("model_type")
        if model_type != "qwen3_vl":
            raise ConfigError(f"config.json model_type is {model_type!r}; this loader reads 'qwen3_vl' "
                              "(Qwen3-VL dense). Other architectures are not supported.")
        for key in ("text_config", "vision_config"):
            if not isinstance(d.get(key), dict):
                raise ConfigError(f"config.json has no {key!r} object")
        tc, vc = d["text_config"], d["vision_config"]

        def need(src: dict, section: str, key: str):
            if key not in src:
                raise ConfigError(f"config.json {section}.{key} is missing")
            return src[key]

        # 5.x: rope_parameters {rope_theta, mrope_section, ...}; 4.57: rope_scaling + rope_theta.
        rope = tc.get("rope_parameters") or {}
        scaling = tc.get("rope_scaling") or {}
        section = rope.get("mrope_section", scaling.get("mrope_section"))
        if section is None:
            raise ConfigError("config.json text_config.rope_parameters.mrope_section (or the 4.57 "
                              "text_config.rope_scaling.mrope_section) is missing")
        theta = rope.get("rope_theta", tc.get("rope_theta"))
        if theta is None:
            raise ConfigError("config.json text_config.rope_parameters.rope_theta (or the 4.57 "
                              "text_config.rope_theta) is missing")
        rope_type = rope.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
        if rope_type not in ("default", "mrope"):
            raise ConfigError(f"config.json text_config rope_type {rope_type!r} is not supported "
                              "(only the default MRoPE of Qwen3-VL)")
        if rope.get("mrope_interleaved", scaling.get("mrope_interleaved", True)) is False:
            raise ConfigError("config.json text_config mrope_interleaved=false is not Qwen3-VL's rope")
        text = TextConfig(
            vocab_size=int(need(tc, "text_config", "vocab_size")),
            hidden_size=int(need(tc, "text_config", "hidden_size")),
            intermediate_size=int(need(tc, "text_config", "intermediate_size")),
            num_hidden_layers=int(need(tc, "text_config", "num_hidden_layers")),
            num_attention_heads=int(need(tc, "text_config", "num_attention_heads")),
            num_key_value_heads=int(need(tc, "text_config", "num_key_value_heads")),
            head_dim=int(tc.get("head_dim") or tc["hidden_size"] // tc["num_attention_heads"]),
            rms_norm_eps=float(tc.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            mrope_section=tuple(int(s) for s in section),
            max_position_embeddings=int(tc.get("max_position_embeddings", 262144)),
        )
        if tc.get("attention_bias"):
            raise ConfigError("config.json text_config.attention_bias=true is not Qwen3-VL (no biases)")
        vrope = vc.get("rope_parameters") or {}
        vision = VisionConfig(
            depth=int(need(vc, "vision_config", "depth")),
            hidden_size=int(need(vc, "vision_config", "hidden_size")),
            intermediate_size=int(need(vc, "vision_config", "intermediate_size")),
            num_heads=int(need(vc, "vision_config", "num_heads")),
            out_hidden_size=int(need(vc, "vision_config", "out_hidden_size")),
            num_position_embeddings=int(need(vc, "vision_config", "num_position_embeddings")),
            deepstack_visual_indexes=tuple(int(i) for i in vc.get("deepstack_visual_indexes", ())),
            patch_size=int(vc.get("patch_size", 16)),
            temporal_patch_size=int(vc.get("temporal_patch_size", 2)),
            spatial_merge_size=int(vc.get("spatial_merge_size", 2)),
            in_channels=int(vc.get("in_channels", 3)),
            rope_theta=float(vrope.get("rope_theta", 10000.0)),
        )
        tie = d.get("tie_word_embeddings", tc.get("tie_word_embeddings", False))
        return cls(text=text, vision=vision, tie_word_embeddings=bool(tie),
                   image_token_id=int(d.get("image_token_id", 151655)),
                   video_token_id=int(d.get("video_token_id", 151656)),
                   vision_start_token_id=int(d.get("vision_start_token_id", 151652)),
                   vision_end_token_id=int(d.get("vision_end_token_id", 151653)), **overrides)

    def to_hf_dict(self, torch_dtype: str | None = None) -> dict[str, Any]:
        t, v = self.text, self.vision
        dtype = torch_dtype or self.param_dtype
        return {
            "architectures": ["Qwen3VLForConditionalGeneration"],
            "model_type": "qwen3_vl",
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "tie_word_embeddings": self.tie_word_embeddings,
            "dtype": dtype,
            "text_config": {
                "model_type": "qwen3_vl_text",
                "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
                "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_hidden_layers,
                "num_attention_heads": t.num_attention_heads,
                "num_key_value_heads": t.num_key_value_heads, "head_dim": t.head_dim,
                "hidden_act": "silu", "attention_bias": False, "attention_dropout": 0.0,
                "rms_norm_eps": t.rms_norm_eps, "max_position_embeddings": t.max_position_embeddings,
                "tie_word_embeddings": self.tie_word_embeddings, "dtype": dtype,
                "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta,
                                    "mrope_section": list(t.mrope_section), "mrope_interleaved": True},
            },
            "vision_config": {
                "model_type": "qwen3_vl_vision",
                "depth": v.depth, "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
                "num_heads": v.num_heads, "out_hidden_size": v.out_hidden_size,
                "num_position_embeddings": v.num_position_embeddings,
                "deepstack_visual_indexes": list(v.deepstack_visual_indexes),
                "patch_size": v.patch_size, "temporal_patch_size": v.temporal_patch_size,
                "spatial_merge_size": v.spatial_merge_size, "in_channels": v.in_channels,
                "hidden_act": "gelu_pytorch_tanh", "dtype": dtype,
                "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta},
            },
        }

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides) -> "Qwen3VLConfig":
        file = os.path.join(path, "config.json") if os.path.isdir(path) else path
        if not os.path.exists(file):
            raise ConfigError(f"no config.json at {file}")
        with open(file) as f:
            return cls.from_hf_dict(json.load(f), **overrides)


# --- presets (METHOD.md §1) ----------------------------------------------------------------------
def tiny(vocab_size: int = 512, **overrides) -> Qwen3VLConfig:
    """A few-layer random model for CPU tests and the embedded demo (same architecture)."""
    text = TextConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=10000.0,
                      mrope_section=(2, 3, 3), max_position_embeddings=8192)
    vision = VisionConfig(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                          num_position_embeddings=64, deepstack_visual_indexes=(0, 2))
    return Qwen3VLConfig(text=text, vision=vision, image_token_id=vocab_size - 4,
                         video_token_id=vocab_size - 3, vision_start_token_id=vocab_size - 2,
                         vision_end_token_id=vocab_size - 1, **overrides)


def qwen3vl_2b(**overrides) -> Qwen3VLConfig:
    text = TextConfig(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                      num_attention_heads=16, num_key_value_heads=8, head_dim=128)
    vision = VisionConfig(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, out_hidden_size=2048,
                          num_position_embeddings=2304, deepstack_visual_indexes=(5, 11, 17))
    return Qwen3VLConfig(text=text, vision=vision, tie_word_embeddings=True, **overrides)


def qwen3vl_8b(**overrides) -> Qwen3VLConfig:
    text = TextConfig(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=128)
    vision = VisionConfig(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096,
                          num_position_embeddings=2304, deepstack_visual_indexes=(8, 16, 24))
    return Qwen3VLConfig(text=text, vision=vision, tie_word_embeddings=False, **overrides)
