"""LoRA adapters in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

PEFT names an adapter's matrices after the module they adapt, under the PeftModel's prefix:
``base_model.model.<HF module>.lora_A.weight`` (r, in) and ``….lora_B.weight`` (out, r), with
W' = W + (lora_alpha / r)·B·A on HF's (out, in) weight. Our A [in..., r] and B [r, out...] are
the transposes of those, flattened the way the key map flattens their kernel (keymap "linear"),
so an adapter entry is derived from the kernel's key-map entry; a scanned decoder's stacked
adapters give one PEFT tensor per layer row.

``target_modules`` is written as PEFT's list of module names when only the text decoder (and the
head, ``lm_head``) is adapted (Qwen3-VL's vision blocks use other names, so the list is exact), and
as a regular expression over full module names when vision blocks are too (their ``proj`` would
otherwise also match the patch embedding).

A head adapter of a rank of its own (LoRAConfig.head_rank) is written with PEFT's ``rank_pattern`` and
``alpha_pattern`` for ``lm_head``. SGLang 0.5.23 reads only ``r`` (one rank and one scaling per
adapter), so the folders a run syncs to SGLang servers are written ``one_rank``: every adapter padded
with zeros to the largest rank, at the common scale, which leaves every delta B·A unchanged.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any

import jax
import numpy as np
from flax import nnx

from genevolve_jax.models.qwen3_vl import keymap
from genevolve_jax.models.qwen3_vl.config import (HEAD_LORA_TARGET, LORA_TARGETS, TEXT_LORA_TARGETS,
                                                  VISION_LORA_TARGETS, ConfigError, LoRAConfig, Qwen3VLConfig)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
_TEXT_MODULE = re.compile(r"model\.language_model\.layers\.\d+\.(self_attn|mlp)\.(\w+)")
_VISION_MODULE = re.compile(r"model\.visual\.blocks\.\d+\.(attn|mlp)\.(\w+)")


@dataclasses.dataclass(frozen=True)
class AdapterEntry:
    module: str                   # HF module name, e.g. model.language_model.layers.0.self_attn.q_proj
    dense: tuple                  # NNX path of the adapted Dense
    stack_index: int | None       # row of a scanned decoder's stacked adapters
    in_features: int
    out_features: int

    @property
    def a_name(self) -> str:
        return f"{PEFT_PREFIX}{self.module}.lora_A.weight"

    @property
    def b_name(self) -> str:
        return f"{PEFT_PREFIX}{self.module}.lora_B.weight"


def target_of(module: str) -> str | None:
    """Our target name (config.TEXT/VISION_LORA_TARGETS) of an HF module name, or None."""
    if module == HEAD_LORA_TARGET:      # transformers' Qwen3VLForConditionalGeneration.lm_head
        return HEAD_LORA_TARGET
    text, vision = _TEXT_MODULE.fullmatch(module), _VISION_MODULE.fullmatch(module)
    if text and text.group(2) in TEXT_LORA_TARGETS:
        return text.group(2)
    if vision and f"vision.{vision.group(2)}" in VISION_LORA_TARGETS:
        return f"vision.{vision.group(2)}"
    return None


def adapter_entries(config: Qwen3VLConfig) -> list[AdapterEntry]:
    """One entry per adapted projection (per layer row), in the key map's order."""
    if config.lora is None:
        return []
    out = []
    for e in keymap.key_entries(config.replace(lora=None)):
        if e.kind != "linear" or not e.hf.endswith(".weight"):
            continue
        module = e.hf[: -len(".weight")]
        target = target_of(module)
        if target is None or config.lora_for(target) is None:
            continue
        out.append(AdapterEntry(module, e.nnx[:-1], e.stack_index, math.prod(e.nnx_shape[:e.n_in]),
                                math.prod(e.nnx_shape[e.n_in:])))
    return out


def target_modules(lora: LoRAConfig) -> list[str] | str:
    """PEFT's ``target_modules`` for our targets (module docstring)."""
    text = [t for t in TEXT_LORA_TARGETS if t in lora.targets]
    head = [HEAD_LORA_TARGET] if HEAD_LORA_TARGET in lora.targets else []
    vision = [t[len("vision."):] for t in VISION_LORA_TARGETS if t in lora.targets]
    if not vision:
        return text + head
    parts = [rf"model\.visual\.blocks\.\d+\.(attn|mlp)\.({'|'.join(vision)})"]
    if text:
        parts.insert(0, rf"model\.language_model\.layers\.\d+\.(self_attn|mlp)\.({'|'.join(text)})")
    parts += head
    return "|".join(f"(.*\\.)?{p}" for p in parts)


def adapter_config(lora: LoRAConfig, base_model: str = "", *, one_rank: bool = False) -> dict[str, Any]:
    """PEFT's adapter_config.json for ``lora``. A head rank of its own is PEFT's ``rank_pattern`` and
    ``alpha_pattern`` for ``lm_head``; ``one_rank`` writes instead one rank for every module, the
    largest, at the common scale (the form :func:`adapter_tensors` pads to, for SGLang)."""
    rank, alpha, patterns = lora.rank, lora.alpha, {}
    if one_rank:
        if lora.max_rank > lora.rank:
            rank, alpha = lora.head_rank, lora.head_alpha
    elif lora.head_rank is not None:
        patterns = {"rank_pattern": {HEAD_LORA_TARGET: lora.head_rank},
                    "alpha_pattern": {HEAD_LORA_TARGET: lora.head_alpha}}
    return {"peft_type": "LORA", "task_type": None, "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0,
            "target_modules": target_modules(lora), "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
            "use_dora": False, "init_lora_weights": True, "modules_to_save": None, "inference_mode": True,
            "base_model_name_or_path": base_model or None, **patterns}


def adapter_tensors(model: nnx.Module, dtype=np.float32, *, one_rank: bool = False) -> dict[str, np.ndarray]:
    """PEFT-named lora_A / lora_B weights of ``model``'s adapters, as numpy arrays. ``one_rank``:
    every adapter zero-padded to the largest rank (extra rows of A and columns of B are zero, so
    each delta B·A is unchanged), for a loader that takes one rank per adapter (SGLang 0.5.23's
    LoRAConfig reads only ``r``)."""
    out = {}
    pad_to = model.config.lora.max_rank if one_rank else 0
    for e in adapter_entries(model.config):
        dense = keymap.node_at(model, e.dense)
        a, b = dense.lora_a.get_value(), dense.lora_b.get_value()
        if e.stack_index is not None:
            a, b = a[e.stack_index], b[e.stack_index]
        rank = a.shape[-1]
        a = np.asarray(jax.device_get(a), np.float32).reshape(e.in_features, rank).T
        b = np.asarray(jax.device_get(b), np.float32).reshape(rank, e.out_features).T
        if pad_to > rank:
            a = np.concatenate([a, np.zeros((pad_to - rank, e.in_features), np.float32)], axis=0)
            b = np.concatenate([b, np.zeros((e.out_features, pad_to - rank), np.float32)], axis=1)
        out[e.a_name] = np.ascontiguousarray(a.astype(dtype))
        out[e.b_name] = np.ascontiguousarray(b.astype(dtype))
    return out


def save_adapter(model: nnx.Module, path: str | os.PathLike, *, dtype=np.float32, base_model: str = "",
                 one_rank: bool = False) -> list[str]:
    """Write ``model``'s adapters as a PEFT adapter directory; returns the file names. ``one_rank``:
    as :func:`adapter_tensors` (the folder an SGLang server loads)."""
    from safetensors.numpy import save_file
    if model.config.lora is None:
        raise ValueError("save_adapter: the model has no LoRA adapters (model.lora.rank is 0)")
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    save_file(adapter_tensors(model, dtype, one_rank=one_rank), os.path.join(path, ADAPTER_WEIGHTS),
              metadata={"format": "pt"})
    with open(os.path.join(path, ADAPTER_CONFIG), "w") as f:
        json.dump(adapter_config(model.config.lora, base_model, one_rank=one_rank), f, indent=2)
    return [ADAPTER_WEIGHTS, ADAPTER_CONFIG]


def read_adapter_config(path: str | os.PathLike) -> LoRAConfig:
    """The LoRAConfig of a PEFT adapter directory; errors name the file and the field."""
    file = os.path.join(os.fspath(path), ADAPTER_CONFIG)
    if not os.path.exists(file):
        raise ConfigError(f"no {ADAPTER_CONFIG} in {os.fspath(path)}")
    with open(file) as f:
        d = json.load(f)
    if d.get("peft_type") != "LORA":
        raise ConfigError(f"{file}: peft_type {d.get('peft_type')!r} is not LORA")
    for key, ok in (("use_dora", False), ("use_rslora", False), ("fan_in_fan_out", False), ("bias", "none")):
        if d.get(key, ok) != ok:
            raise ConfigError(f"{file}: {key}={d[key]!r} is not supported (only {ok!r})")
    if d.get("modules_to_save"):
        raise ConfigError(f"{file}: modules_to_save is not supported")
    targets = d.get("target_modules")
    names = _targets_from(targets)
    if not names:
        raise ConfigError(f"{file}: target_modules {targets!r} name none of {list(LORA_TARGETS)}")
    rank, alpha = int(d["r"]), float(d["lora_alpha"])
    head_rank = _head_rank(file, d, rank, alpha)
    try:
        return LoRAConfig(rank=rank, alpha=alpha, targets=names, head_rank=head_rank)
    except ConfigError as e:
        raise ConfigError(f"{file}: {e}") from None


def _head_rank(file: str, d: dict, rank: int, alpha: float) -> int | None:
    """The head's rank from PEFT's rank_pattern / alpha_pattern: only ``lm_head`` may have a rank of
    its own, and only at the adapter's scale alpha / r (LoRAConfig.head_rank)."""
    ranks, alphas = d.get("rank_pattern") or {}, d.get("alpha_pattern") or {}
    for key, pattern in (("rank_pattern", ranks), ("alpha_pattern", alphas)):
        if not isinstance(pattern, dict) or set(pattern) - {HEAD_LORA_TARGET}:
            raise ConfigError(f"{file}: {key} {pattern!r} is not supported (only {{{HEAD_LORA_TARGET!r}: ...}})")
    if not ranks:
        if alphas and not math.isclose(float(alphas[HEAD_LORA_TARGET]), alpha, rel_tol=1e-6):
            raise ConfigError(f"{file}: alpha_pattern {alphas!r} without a rank_pattern changes the head's scale")
        return None
    head_rank = ranks[HEAD_LORA_TARGET]
    if not isinstance(head_rank, int) or head_rank < 1:
        raise ConfigError(f"{file}: rank_pattern[{HEAD_LORA_TARGET!r}] must be a positive integer, got {head_rank!r}")
    head_alpha = float(alphas.get(HEAD_LORA_TARGET, alpha))
    if not math.isclose(head_alpha / head_rank, alpha / rank, rel_tol=1e-6):
        raise ConfigError(f"{file}: alpha_pattern[{HEAD_LORA_TARGET!r}] {head_alpha:g} gives the head the scale "
                          f"{head_alpha / head_rank:g}, not the adapter's {alpha / rank:g} (lora_alpha / r)")
    return head_rank


def _targets_from(targets) -> tuple[str, ...]:
    """Our targets that PEFT's ``target_modules`` (a list of names or a regular expression) selects,
    tried on one module name of each target."""
    samples = {t: f"model.language_model.layers.0.{'self_attn' if t[1] == '_' else 'mlp'}.{t}"
               for t in TEXT_LORA_TARGETS}
    samples.update({t: f"model.visual.blocks.0.{'attn' if t in ('vision.qkv', 'vision.proj') else 'mlp'}."
                       f"{t[len('vision.'):]}" for t in VISION_LORA_TARGETS})
    samples[HEAD_LORA_TARGET] = HEAD_LORA_TARGET
    if isinstance(targets, str):
        hit = [t for t, m in samples.items() if re.fullmatch(targets, m)]
    else:
        names = set(targets or ())
        hit = [t for t, m in samples.items() if m.split(".")[-1] in names or m in names]
    return tuple(hit)


def load_adapter(model: nnx.Module, path: str | os.PathLike) -> None:
    """Copy a PEFT adapter's weights into ``model``'s adapters in place (shapes checked, every
    adapter of the model must be in the file and nothing else)."""
    from safetensors.numpy import load_file
    file = os.path.join(os.fspath(path), ADAPTER_WEIGHTS)
    if not os.path.exists(file):
        raise FileNotFoundError(f"no {ADAPTER_WEIGHTS} in {os.fspath(path)}")
    tensors = {k.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B."): v
               for k, v in load_file(file).items()}
    entries = adapter_entries(model.config)
    expected = {n for e in entries for n in (e.a_name, e.b_name)}
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise ValueError(f"{file}: adapter tensors do not match the model's adapters: missing {missing[:3]}, "
                         f"unexpected {extra[:3]}")
    for e in entries:
        dense = keymap.node_at(model, e.dense)
        for var, name in ((dense.lora_a, e.a_name), (dense.lora_b, e.b_name)):
            current = var.get_value()
            row_shape = tuple(current.shape[1:] if e.stack_index is not None else current.shape)
            tensor = tensors[name]   # PEFT's (r, in) / (out, r): the transpose of ours, flattened
            if tensor.size != math.prod(row_shape) or tensor.shape[0 if name == e.a_name else 1] != row_shape[
                    -1 if name == e.a_name else 0]:
                raise ValueError(f"{file}: {name} has shape {tensor.shape}, the model's adapter is {row_shape}")
            value = jax.numpy.asarray(tensor.T.reshape(row_shape), current.dtype)
            if e.stack_index is not None:
                value = current.at[e.stack_index].set(value)
            var.set_value(jax.device_put(value, getattr(current, "sharding", None)))
