"""Load an ml-collections config file and apply dotted command-line overrides.

``load_config("tiny_cpu", ["--config.rl.group_size=6"])`` imports ``configs/tiny_cpu.py`` (or any
path to a ``.py`` file defining ``get_config()``), applies each override with the type of the field
it replaces, then validates every section that has a validator. A misspelt key or a value of the
wrong type fails here, naming the key, before anything compiles.
"""
from __future__ import annotations

import ast
import importlib
import importlib.util
import os
from typing import Iterable

import ml_collections

_CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
CONFIG_PACKAGE = "configs"


class ConfigOverrideError(ValueError):
    pass


def shipped_configs() -> list[str]:
    """Names of the configs in the ``configs`` package (``base`` included)."""
    return sorted(f[:-3] for f in os.listdir(_CONFIG_DIR) if f.endswith(".py") and not f.startswith("_"))


def resolve_config_path(name_or_path: str) -> str:
    if os.path.exists(name_or_path):
        return name_or_path
    candidate = os.path.join(_CONFIG_DIR, name_or_path if name_or_path.endswith(".py") else name_or_path + ".py")
    if os.path.exists(candidate):
        return candidate
    raise FileNotFoundError(f"no config {name_or_path!r}; give a path or one of {shipped_configs()}")


def _import_config(path: str) -> ml_collections.ConfigDict:
    """``get_config()`` of a config file. A file of the ``configs`` package is imported as
    ``configs.<name>`` (so that it imports its base the ordinary way, ``from configs import base``);
    any other file by its path (it may import ``configs`` too: the package is installed)."""
    path = os.path.abspath(path)
    if os.path.dirname(path) == os.path.abspath(_CONFIG_DIR):
        module = importlib.import_module(f"{CONFIG_PACKAGE}.{os.path.basename(path)[:-3]}")
    else:
        spec = importlib.util.spec_from_file_location(f"genevolve_config_{abs(hash(path))}", path)
        module = importlib.util.module_from_spec(spec)
        assert spec.loader is not None
        spec.loader.exec_module(module)
    get_config = getattr(module, "get_config", None)
    if get_config is None:
        raise AttributeError(f"config file {path} defines no get_config()")
    return get_config()


def _parse_value(text: str):
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: Iterable[str]) -> ml_collections.ConfigDict:
    for item in overrides:
        body = item[2:] if item.startswith("--") else item
        if not body.startswith("config.") or "=" not in body:
            raise ConfigOverrideError(f"override {item!r} is not of the form --config.a.b=value")
        key, raw = body[len("config."):].split("=", 1)
        parts = key.split(".")
        node = cfg
        for i, part in enumerate(parts[:-1]):
            if part not in node:
                raise ConfigOverrideError(f"unknown config key {'.'.join(parts[:i + 1])!r} in {item!r}")
            node = node[part]
        leaf = parts[-1]
        if leaf not in node:
            raise ConfigOverrideError(f"unknown config key {key!r} in {item!r}")
        value = _parse_value(raw)
        old = node[leaf]
        if isinstance(old, str) and (value is None or isinstance(value, (bool, int, float))):
            value = raw     # a text field takes the text: "none", "true" and "8" stay text
        if isinstance(old, tuple) and isinstance(value, list):
            value = tuple(value)
        if isinstance(old, (list, tuple)) and isinstance(value, (int, float, str)) and not isinstance(value, bool):
            value = type(old)([value])
        try:
            node[leaf] = value
        except (TypeError, ValueError) as e:
            raise ConfigOverrideError(f"config key {key!r}: cannot set {raw!r} ({e})") from e
    return cfg


# Section name -> "module:function" validating that section; imported only when the section is
# present, so loading a config never imports the heavy packages it does not use.
VALIDATORS: dict[str, str] = {
    "model": "genevolve_jax.train.runtime.model_setup:validate_model",
    "sharding": "genevolve_jax.sharding.config:validate",
    "sft": "genevolve_jax.train.runtime.step_config:validate_sft",
    "train": "genevolve_jax.train.runtime.step_config:validate",
    "sft_run": "genevolve_jax.train.sft.config:validate_sft_run",
    "loss": "genevolve_jax.train.losses.config:validate_loss",
    "rl": "genevolve_jax.train.rl.config:validate_rl",
    "checkpoint": "genevolve_jax.train.runtime.checkpoint:validate_checkpoint",
    "logging": "genevolve_jax.train.runtime.observability:validate_logging",
    "agent": "genevolve_jax.agent.config:validate",
    "engine": "genevolve_jax.rollout.config:validate",
    "reward": "genevolve_jax.reward.config:validate",
    "render": "genevolve_jax.render.config:validate",
    "data": "genevolve_jax.data.config:validate",
    "experience": "genevolve_jax.experience.config:validate",
    "eval": "genevolve_jax.eval.config:validate",
}


def validate(cfg: ml_collections.ConfigDict) -> None:
    for section, target in VALIDATORS.items():
        if section in cfg:
            module, fn = target.split(":")
            getattr(importlib.import_module(module), fn)(cfg[section])


def load_config(name_or_path: str, overrides: Iterable[str] = ()) -> ml_collections.ConfigDict:
    cfg = _import_config(resolve_config_path(name_or_path))
    apply_overrides(cfg, overrides)
    validate(cfg)
    return cfg
