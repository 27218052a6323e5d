"""Loading and saving a Qwen3-VL model and its tokenizer: orbax model checkpoints and HF directories.

Every layer that needs a model from disk (the trainers, the rollout engines, eval, the CLI) comes
here: :func:`load_model` and :func:`load_tokenizer` take either kind of directory.

Layout of a model checkpoint directory::

    CKPT/model_config.json   our config (HF config.json dict + how we hold it: param_dtype, dtype,
                             the decoder layers' layout, scan_layers: stacked or a list, and the
                             LoRA adapters' rank/alpha/targets when it holds adapters)
    CKPT/params/             orbax StandardCheckpointer tree of the model's nnx.Param values
    CKPT/hf_assets/          optional: tokenizer / processor / generation files carried from HF

Only parameters are saved; anything else a module holds is recomputed from the config on restore.
Restore builds the model abstractly from the saved config and restores straight into the target
layout, so a checkpoint written under one mesh/strategy restores under another, param dtype may
change on the way (orbax casts), and so may the layers' layout (``layer_layout``). The trainer
reuses :func:`save_pytree` / :func:`restore_pytree` for its optimiser, step and iterator state next
to the params.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax
from flax import nnx

from genevolve_jax.models.qwen3_vl.config import ConfigError, LoRAConfig, Qwen3VLConfig

CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"
ASSETS_DIR = "hf_assets"


class CheckpointNotFound(FileNotFoundError):
    """A directory that is not a model checkpoint; the message names the missing file."""


def _abs(path: str | os.PathLike) -> str:
    return os.path.abspath(os.fspath(path))


# --- generic pytrees ---------------------------------------------------------------------------------
def save_pytree(directory: str | os.PathLike, tree: Any, *, overwrite: bool = False) -> str:
    """Write a pytree of arrays with orbax and wait until it is on disk."""
    import orbax.checkpoint as ocp
    directory = _abs(directory)
    if os.path.exists(directory) and not overwrite:
        raise FileExistsError(f"{directory} exists; pass overwrite=True to replace it")
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(directory, tree, force=overwrite)
        ckptr.wait_until_finished()
    return directory


def restore_pytree(directory: str | os.PathLike, abstract_tree: Any) -> Any:
    """Restore into the shapes, dtypes and shardings of ``abstract_tree`` (ShapeDtypeStructs)."""
    import orbax.checkpoint as ocp
    directory = _abs(directory)
    if not os.path.isdir(directory):
        raise CheckpointNotFound(f"no orbax checkpoint at {directory}")
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(directory, abstract_tree)


# --- model + config ------------------------------------------------------------------------------------
def config_to_json(config: Qwen3VLConfig) -> dict[str, Any]:
    lora = config.lora
    return {"hf_config": config.to_hf_dict(), "param_dtype": config.param_dtype, "dtype": config.dtype,
            "scan_layers": bool(config.scan_layers),
            "lora": None if lora is None else {"rank": lora.rank, "alpha": lora.alpha, "targets": list(lora.targets),
                                               "head_rank": lora.head_rank}}


def config_from_json(d: dict[str, Any], *, source: str = CONFIG_FILE, **overrides) -> Qwen3VLConfig:
    if not isinstance(d.get("hf_config"), dict):
        raise ConfigError(f"{source}: missing the 'hf_config' object")
    # Checkpoints written before the layout was recorded hold the layer list.
    kw = {"param_dtype": d.get("param_dtype", "float32"), "dtype": d.get("dtype", "float32"),
          "scan_layers": d.get("scan_layers", False)}
    if not isinstance(kw["scan_layers"], bool):
        raise ConfigError(f"{source}: 'scan_layers' must be true or false, got {kw['scan_layers']!r}")
    kw.update({k: v for k, v in overrides.items() if v is not None})
    try:
        if d.get("lora") and "lora" not in kw:
            head_rank = d["lora"].get("head_rank")    # absent in checkpoints from before head_rank
            kw["lora"] = LoRAConfig(rank=int(d["lora"]["rank"]), alpha=float(d["lora"]["alpha"]),
                                    targets=tuple(d["lora"]["targets"]),
                                    head_rank=None if head_rank is None else int(head_rank))
        return Qwen3VLConfig.from_hf_dict(d["hf_config"], **kw)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def load_model_config(directory: str | os.PathLike, **overrides) -> Qwen3VLConfig:
    file = os.path.join(_abs(directory), CONFIG_FILE)
    if not os.path.exists(file):
        raise CheckpointNotFound(f"{_abs(directory)} is not a model checkpoint: {CONFIG_FILE} is missing")
    with open(file) as f:
        return config_from_json(json.load(f), source=file, **overrides)


def save_model(directory: str | os.PathLike, model: nnx.Module, *, config: Qwen3VLConfig | None = None,
               overwrite: bool = False, merge: bool = False) -> str:
    """Params (orbax) + config (json) into ``directory``; returns its absolute path. LoRA adapters
    are saved as they are (``export-hf`` writes them in PEFT's format), or with ``merge`` folded
    into the base (W + s·A·B): the plain model they make."""
    from genevolve_jax.models.lora import merged_model
    directory = _abs(directory)
    if merge:
        model = merged_model(model)
    config = (config or model.config).replace(lora=model.config.lora)
    params_dir = os.path.join(directory, PARAMS_DIR)
    if os.path.exists(params_dir) and not overwrite:
        raise FileExistsError(f"{params_dir} exists; pass overwrite=True to replace the checkpoint")
    os.makedirs(directory, exist_ok=True)
    save_pytree(params_dir, nnx.state(model, nnx.Param), overwrite=overwrite)
    # The config is written last: a directory with a config holds complete params.
    tmp = os.path.join(directory, CONFIG_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(config_to_json(config), f, indent=2)
    os.replace(tmp, os.path.join(directory, CONFIG_FILE))
    return directory


def restore_model(directory: str | os.PathLike, *, param_dtype: str | None = None, dtype: str | None = None,
                  mesh=None, rules=None, seed: int = 0, remat: str | None = None,
                  scan_layers: bool | None = None, lora=None) -> nnx.Module:
    """Rebuild the model from a :func:`save_model` directory, optionally in another dtype or layout
    (``remat``: the activation-checkpoint policy a training run wants; ``scan_layers``: the decoder
    layers stacked or as a list, None keeps the saved layout). ``lora`` (a LoRAConfig): adapters
    to train: the saved ones when the checkpoint holds adapters of that config (training goes on),
    else fresh ones on the saved policy (saved adapters of another config merged into it first)."""
    from genevolve_jax.models.hf_io import abstract_model, materialise_rest
    from genevolve_jax.models.layers import LoRAParam
    from genevolve_jax.models.lora import with_fresh_adapters
    from genevolve_jax.models.qwen3_vl.layer_layout import with_layer_layout
    directory = _abs(directory)
    saved = load_model_config(directory, param_dtype=param_dtype, dtype=dtype or param_dtype, remat=remat)
    if lora is not None and saved.lora is not None and not saved.lora.same_adapters(lora):
        model = restore_model(directory, param_dtype=param_dtype, dtype=dtype, mesh=mesh, rules=rules, seed=seed,
                              remat=remat, scan_layers=scan_layers)
        return with_fresh_adapters(model, lora, seed=seed, mesh=mesh, rules=rules)
    config = saved if lora is None else saved.replace(lora=lora)
    model = abstract_model(config, seed=seed, mesh=mesh, rules=rules)
    # Adapters the checkpoint lacks stay abstract here and materialise_rest draws them.
    graphdef, params, rest = nnx.split(model, nnx.All(nnx.Param, nnx.Not(LoRAParam)) if saved.lora is None
                                       else nnx.Param, ...)
    if mesh is None:
        # Name the target placement instead of letting orbax fall back to the saving run's devices.
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), params)
    restored = restore_pytree(os.path.join(directory, PARAMS_DIR), params)
    model = materialise_rest(nnx.merge(graphdef, restored, rest), config, seed=seed)
    if scan_layers is None or bool(scan_layers) == config.scan_layers:
        return model
    converted = with_layer_layout(model, scan_layers)
    if mesh is None:
        return converted
    # Converted arrays take whatever placement indexing gave them; put them where the rules say.
    from genevolve_jax.sharding import logical
    graphdef, state = nnx.split(converted)
    shardings = logical.state_shardings(state, mesh, rules if rules is not None else "fsdp")
    return nnx.merge(graphdef, jax.device_put(state, shardings))


# --- HF side files carried through a checkpoint ----------------------------------------------------
HF_ASSET_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json",
                  "merges.txt", "special_tokens_map.json", "added_tokens.json", "chat_template.json",
                  "chat_template.jinja", "preprocessor_config.json", "video_preprocessor_config.json",
                  "processor_config.json")


def copy_hf_assets(src_dir: str | os.PathLike, dst_dir: str | os.PathLike) -> list[str]:
    """Copy the tokenizer/processor/generation files present in ``src_dir`` (weights and config excluded)."""
    copied = []
    for name in HF_ASSET_FILES:
        src = os.path.join(os.fspath(src_dir), name)
        if os.path.isfile(src):
            os.makedirs(dst_dir, exist_ok=True)
            shutil.copyfile(src, os.path.join(os.fspath(dst_dir), name))
            copied.append(name)
    return copied


# --- either kind of directory ------------------------------------------------------------------
def load_model(path: str | os.PathLike, *, param_dtype: str | None = None, dtype: str | None = None,
               remat: str | None = None, scan_layers: bool | None = None, lora=None) -> nnx.Module:
    """An orbax model checkpoint (model_config.json + params/) or a Hugging Face directory (config.json).
    ``remat`` (a train section's ``remat``) sets the activation-checkpoint policy; None keeps "none".
    ``scan_layers``: the decoder layers stacked for ``lax.scan`` or as a list; None keeps a
    checkpoint's saved layout (a Hugging Face directory loads as a list). ``lora`` (a
    config.LoRAConfig, or None): fresh adapters on top of the loaded base."""
    path = os.fspath(path)
    if os.path.exists(os.path.join(path, CONFIG_FILE)):
        return restore_model(path, param_dtype=param_dtype, dtype=dtype, remat=remat, scan_layers=scan_layers,
                             lora=lora)
    if os.path.exists(os.path.join(path, "config.json")):
        from genevolve_jax.models.hf_io import load_pretrained
        return load_pretrained(path, param_dtype=param_dtype, dtype=dtype, remat=remat,
                               scan_layers=bool(scan_layers), lora=lora)
    raise FileNotFoundError(f"{path} is neither a model checkpoint ({CONFIG_FILE}) nor a Hugging Face "
                            "directory (config.json)")


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer saved with a checkpoint (its hf_assets/ or the directory itself), else the
    embedded default tokenizer (tiny models trained with it)."""
    path = os.fspath(path)
    for candidate in (os.path.join(path, "hf_assets"), path):
        if os.path.exists(os.path.join(candidate, "tokenizer.json")) or \
                os.path.exists(os.path.join(candidate, "tokenizer_config.json")):
            from transformers import AutoTokenizer
            return AutoTokenizer.from_pretrained(candidate, local_files_only=True)
    from genevolve_jax.processing.tokenizer import default_tokenizer
    return default_tokenizer()


__all__ = ["load_model", "load_tokenizer", "save_pytree", "restore_pytree", "save_model", "restore_model", "load_model_config",
           "config_to_json", "config_from_json", "copy_hf_assets", "CheckpointNotFound"]
