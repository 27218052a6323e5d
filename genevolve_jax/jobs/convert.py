"""`genevolve import-hf` and `genevolve export-hf`: Hugging Face directory ↔ orbax checkpoint.

import-hf HF_DIR CKPT_DIR   reads config.json + safetensors tensor by tensor into the NNX model and
                            saves params + config with orbax; tokenizer/processor/generation files
                            ride along in CKPT_DIR/hf_assets. ``--adapter DIR``: a PEFT LoRA adapter
                            of that base, loaded into the model's adapters (a run with the same
                            model.lora rank/alpha/targets trains them on).
export-hf CKPT_DIR HF_DIR   restores the checkpoint and streams it out as safetensors shards that
                            transformers (and SGLang) load, with config.json and generation_config.json.
                            A checkpoint with LoRA adapters is written as a PEFT adapter folder
                            (adapter_config.json + adapter_model.safetensors), or with ``--merge`` as
                            the merged model.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

_DTYPES = ("float32", "bfloat16")
console = Console(stderr=True)


@contextmanager
def _tensor_progress(description: str, total: int) -> Iterator[Callable[[str], None]]:
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[name]}"), TimeElapsedColumn(), console=console,
                  transient=False) as progress:
        task = progress.add_task(description, total=total, name="")

        def advance(name: str) -> None:
            progress.update(task, advance=1, name=name)
        yield advance


def _fail(e: BaseException) -> int:
    """A bad input directory is a one-line error naming the file/key, not a traceback."""
    console.print(f"[bold red]error:[/] {type(e).__name__}: {e}", soft_wrap=True, markup=True, highlight=False)
    return 2


# What a bad checkpoint, config or argument raises (each message names the file, key or field).
_INPUT_ERRORS = (ValueError, KeyError, FileNotFoundError, FileExistsError)


def add_import_hf_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("hf_dir", help="Hugging Face Qwen3-VL directory (config.json + safetensors)")
    parser.add_argument("ckpt_dir", help="output checkpoint directory (orbax params + model_config.json)")
    parser.add_argument("--dtype", choices=_DTYPES, default=None,
                        help="parameter dtype to store (default: the dtype config.json declares)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint")
    parser.add_argument("--adapter", default="",
                        help="a PEFT LoRA adapter folder of HF_DIR (adapter_config.json + adapter_model.safetensors) "
                             "to load into the checkpoint's adapters")


def run_import_hf(args: argparse.Namespace) -> int:
    try:
        return _import_hf(args)
    except _INPUT_ERRORS as e:
        return _fail(e)


def _import_hf(args: argparse.Namespace) -> int:
    from genevolve_jax.models import hf_io, peft_io
    from genevolve_jax.models.qwen3_vl import keymap
    from genevolve_jax.models import loading as checkpoint_io

    start = time.perf_counter()
    existing = os.path.join(os.path.abspath(args.ckpt_dir), checkpoint_io.PARAMS_DIR)
    if os.path.exists(existing) and not args.overwrite:  # before minutes of loading, not after
        raise FileExistsError(f"{existing} exists; pass --overwrite to replace the checkpoint")
    param_dtype = args.dtype or hf_io.checkpoint_dtype(args.hf_dir) or "float32"
    lora = peft_io.read_adapter_config(args.adapter) if args.adapter else None   # a bad adapter fails first
    config = hf_io.read_config(args.hf_dir, param_dtype=param_dtype, dtype=param_dtype, lora=lora)
    n = len(keymap.key_entries(config))
    with _tensor_progress(f"import {args.hf_dir}", n) as advance:
        model = hf_io.load_pretrained(args.hf_dir, param_dtype=param_dtype, on_tensor=advance, lora=lora)
    if lora is not None:
        peft_io.load_adapter(model, args.adapter)
    path = checkpoint_io.save_model(args.ckpt_dir, model, config=config, overwrite=args.overwrite)
    assets_dir = os.path.join(path, checkpoint_io.ASSETS_DIR)
    if os.path.isdir(assets_dir):  # an overwritten checkpoint keeps no side files of the old model
        shutil.rmtree(assets_dir)
    assets = checkpoint_io.copy_hf_assets(args.hf_dir, assets_dir)
    if lora is not None:
        console.print(f"with the LoRA adapter of {args.adapter} ({lora.ranks}, alpha {lora.alpha:g})")
    console.print(f"saved {n} tensors ({param_dtype}) to {path}"
                  f"{' with ' + ', '.join(assets) if assets else ''} in {time.perf_counter() - start:.1f}s")
    return 0


def add_export_hf_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ckpt_dir", help="checkpoint directory written by import-hf or the trainer")
    parser.add_argument("hf_dir", help="output Hugging Face directory")
    parser.add_argument("--dtype", choices=_DTYPES, default="bfloat16", help="tensor dtype in the export")
    parser.add_argument("--max-shard-size", default="5GB",
                        help="largest shard (tensor bytes), e.g. 5GB, 500MB, 2GiB or a byte count")
    parser.add_argument("--merge", action="store_true",
                        help="a checkpoint with LoRA adapters: write the merged model (W + s·B·A) instead of a "
                             "PEFT adapter folder")
    parser.add_argument("--base-model", default="",
                        help="the base model a PEFT adapter folder names (base_model_name_or_path)")


def run_export_hf(args: argparse.Namespace) -> int:
    try:
        return _export_hf(args)
    except _INPUT_ERRORS as e:
        return _fail(e)


def _export_hf(args: argparse.Namespace) -> int:
    from genevolve_jax.models import hf_io, peft_io
    from genevolve_jax.models.lora import merged_model
    from genevolve_jax.models.qwen3_vl import keymap
    from genevolve_jax.models import loading as checkpoint_io

    start = time.perf_counter()
    max_bytes = hf_io.parse_size(args.max_shard_size)  # a bad size fails before the restore
    model = checkpoint_io.restore_model(args.ckpt_dir)
    if model.config.lora is not None and not args.merge:
        with hf_io.atomic_directory(args.hf_dir) as partial:
            peft_io.save_adapter(model, partial, base_model=args.base_model)
        n = len(peft_io.adapter_entries(model.config))
        console.print(f"exported the LoRA adapters of {n} projections ({model.config.lora.ranks}) as a PEFT "
                      f"folder to {args.hf_dir} in {time.perf_counter() - start:.1f}s")
        return 0
    model = merged_model(model)
    config = model.config
    assets_dir = os.path.join(os.path.abspath(args.ckpt_dir), checkpoint_io.ASSETS_DIR)
    generation = None
    gen_file = os.path.join(assets_dir, hf_io.GENERATION_CONFIG)
    if os.path.exists(gen_file):  # the imported model's own generation settings, verbatim
        with open(gen_file) as f:
            generation = json.load(f)
    n = len(keymap.key_entries(config))
    with _tensor_progress(f"export {args.hf_dir}", n) as advance:
        written = hf_io.save_pretrained(model, args.hf_dir, dtype=args.dtype, max_shard_bytes=max_bytes,
                                        config=config, generation_config=generation, on_tensor=advance)
    if os.path.isdir(assets_dir):  # tokenizer/processor files carried from the import
        checkpoint_io.copy_hf_assets(assets_dir, args.hf_dir)
    shards = [w for w in written if w.endswith(".safetensors")]
    console.print(f"exported {n} tensors ({args.dtype}) in {len(shards)} shard(s) to {args.hf_dir} "
                  f"in {time.perf_counter() - start:.1f}s")
    return 0
