"""An HF export that every process writes at once: each process writes the safetensors files of its
share of the tensors, process 0 the index and the config. Used by ``MultiProcess.export_hf``
(genevolve_jax/sharding/multihost.py) for the weight sync to SGLang and the final export of a
multi-host run.

Why every host writes its share, rather than process 0 writing everything (issue 24 allowed either):

- jax's collectives give every device a piece of the same shape. A reshard that gathers a bucket
  onto process 0 also hands every other host a piece of that size, which it throws away; the other
  route to process 0, host memory over the coordination service, would carry every byte of the
  model each step (16 GiB for 8B in bf16) through one process, and jax has no public API for it.
- With an all-to-all (sharding/weight_stream.py, :func:`gather_to_owners`), each host receives
  exactly the tensors it writes and nothing else, so no process works for another's file; the
  export's disk writes are spread over the hosts, and its time falls as they are added.
- The cost: the directory must be on a file system that every process writes to. A multi-host
  SGLang sync needs one anyway (every host's servers read the export), and so do orbax's
  multi-host checkpoints. ``MultiProcess.export_hf`` checks this first and fails naming the
  directory.

The layout: process p writes a contiguous run of the key map's tensors (the order split by bytes),
cut into files of at most ``max_shard_bytes``; files are numbered in process order
(``model-0000k-of-0000n.safetensors``), and the index maps each tensor to its file, so that
transformers and SGLang read the directory like any sharded checkpoint.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable

import jax
import numpy as np
from flax import nnx

from genevolve_jax.models import hf_io
from genevolve_jax.models.qwen3_vl import keymap
from genevolve_jax.models.qwen3_vl.config import Qwen3VLConfig
from genevolve_jax.models.qwen3_vl.layer_layout import path_names
from genevolve_jax.sharding import weight_stream


@dataclasses.dataclass(frozen=True)
class ExportPlan:
    """Who writes which tensor into which file (the same on every process)."""
    entries: tuple[keymap.KeyEntry, ...]
    owners: tuple[int, ...]                            # per entry: the process that writes it
    files: tuple[tuple[str, int, tuple[int, ...]], ...]  # (file name, its writer, its entries)
    dtype: str                                         # export dtype ("bfloat16" | "float32")

    def nbytes(self, i: int) -> int:
        return int(np.prod(self.entries[i].hf_shape)) * hf_io.EXPORT_DTYPES[self.dtype].itemsize


def plan_export(config: Qwen3VLConfig, process_count: int, *, dtype: str = "bfloat16",
                max_shard_bytes: int | str = "5GB") -> ExportPlan:
    if dtype not in hf_io.EXPORT_DTYPES:
        raise ValueError(f"export dtype must be one of {sorted(hf_io.EXPORT_DTYPES)}, got {dtype!r}")
    entries = tuple(keymap.key_entries(config))
    size = hf_io.EXPORT_DTYPES[dtype].itemsize
    nbytes = [int(np.prod(e.hf_shape)) * size for e in entries]
    total, start, owners = sum(nbytes), 0, []
    for n in nbytes:   # contiguous runs of about total / count bytes, split at a tensor's middle
        owners.append(min(process_count - 1, (2 * start + n) * process_count // (2 * total)))
        start += n
    limit = hf_io.parse_size(max_shard_bytes)
    runs = []
    for p in range(process_count):
        mine = [i for i, o in enumerate(owners) if o == p]
        for shard in hf_io.plan_shards([(str(i), nbytes[i]) for i in mine], limit) if mine else []:
            runs.append((p, tuple(int(k) for k in shard)))
    names = hf_io.shard_file_names(len(runs))
    return ExportPlan(entries, tuple(owners), tuple((n, p, run) for n, (p, run) in zip(names, runs)), dtype)


def write_share(model: nnx.Module, directory: str, plan: ExportPlan, bucket_bytes: int, *,
                on_tensor: Callable[[str], None] | None = None) -> list[str]:
    """Write this process's files of ``plan`` into ``directory`` (the export's partial directory).

    A collective: every process calls it, and the tensors reach their writers in rounds of one
    bucket each (sharding/weight_stream.py). An error while writing stops the writing, not the
    rounds: the process keeps taking part until every round is done, so that no other process
    waits for it in a collective, and raises then."""
    state = nnx.state(model, nnx.Param)
    flat = jax.tree_util.tree_flatten_with_path(state)[0]
    where = {path_names(p): i for i, (p, _) in enumerate(flat)}
    sources = [x for _, x in flat]
    dtype = hf_io.EXPORT_DTYPES[plan.dtype]
    missing = [".".join(map(str, e.nnx)) for e in plan.entries if e.nnx not in where]
    if missing:
        raise ValueError(f"write_share: the model has no parameter {missing[0]} (and {len(missing) - 1} more)")
    pieces = [weight_stream.piece(sources, where[e.nnx], e.stack_index, dtype) for e in plan.entries]
    me = jax.process_index()
    mine = [(name, run) for name, owner, run in plan.files if owner == me]
    stream = weight_stream.gather_to_owners(sources, pieces, plan.owners, bucket_bytes)
    written, error = [], None
    try:
        for name, run in mine:
            planned = [(plan.entries[i].hf, hf_io.safetensors_dtype(dtype), plan.entries[i].hf_shape) for i in run]
            tensors = ((plan.entries[i].hf, plan.entries[i].to_hf(a)) for i, a in _take(stream, run))
            hf_io.write_safetensors_file(os.path.join(directory, name), planned, tensors, on_tensor)
            written.append(name)
    except Exception as exc:   # noqa: BLE001 — re-raised below, after the last round
        error = exc
    for _ in stream:           # the rounds left (every process must run each one)
        pass
    if error is not None:
        raise error
    return written


def _take(stream, run):
    """The next ``len(run)`` pieces of ``stream``, checked to be ``run``'s."""
    for expected in run:
        i, array = next(stream)
        if i != expected:
            raise RuntimeError(f"write_share: piece {i} arrived where the plan has {expected}")
        yield i, array


def write_metadata(directory: str, plan: ExportPlan, config: Qwen3VLConfig,
                   generation_config: dict | None = None) -> list[str]:
    """Process 0's part once every share is written: the index (when there are several files) and
    config.json / generation_config.json."""
    names = [name for name, _, _ in plan.files]
    written = list(names)
    if len(names) > 1:
        weight_map = {plan.entries[i].hf: name for name, _, run in plan.files for i in run}
        hf_io.write_safetensors_index(directory, weight_map, sum(plan.nbytes(i) for i in range(len(plan.entries))))
        written.append(hf_io.SAFE_INDEX)
    return written + hf_io.write_hf_config(directory, config, plan.dtype, generation_config)


__all__ = ["ExportPlan", "plan_export", "write_share", "write_metadata"]
