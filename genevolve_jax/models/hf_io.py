"""Hugging Face Qwen3-VL directories in and out of the NNX model, one tensor at a time.

Reading: :class:`SafetensorsReader` is a lazy ``Mapping[name, np.ndarray]`` over a directory holding
``model.safetensors`` or shards listed by ``model.safetensors.index.json``. Its ``shapes()`` come from
the file headers alone, so the key map validates names and shapes before a byte of tensor data is
read; ``reader[name]`` then reads that one tensor. Loading an 8B checkpoint therefore holds one
tensor (plus its converted copy) in host RAM at a time, never the whole state dict.

Writing: :func:`save_pretrained` plans the shards from the key map's shapes (no tensor needed), then
writes each shard's safetensors header first and streams the tensors after it, one at a time.

Errors name the file and the key: a missing or truncated shard, an index entry that points at a
tensor its shard does not hold, a wrong ``model_type``, missing or mis-shaped tensors. All of them are
raised before the model is built or any tensor is read.
"""
from __future__ import annotations

import contextlib
import functools
import glob
import json
import math
import os
import re
import shutil
import struct
from typing import Any, Callable, Iterator, Mapping

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from genevolve_jax.models.qwen3_vl import keymap
from genevolve_jax.models.qwen3_vl.config import ConfigError, Qwen3VLConfig

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"

# safetensors dtype tag <-> numpy dtype (bf16 through ml_dtypes: numpy has none of its own).
_ST_TO_NP = {"F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
             "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
             "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
             "BOOL": np.dtype(np.bool_)}
_NP_TO_ST = {v: k for k, v in _ST_TO_NP.items()}
EXPORT_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}


def safetensors_dtype(dtype) -> str:
    """The safetensors dtype tag of a numpy dtype (``BF16`` for ml_dtypes' bfloat16)."""
    return _NP_TO_ST[np.dtype(dtype)]

# Qwen3-VL Instruct's sampling defaults; token ids are the tokenizer's business, not ours.
DEFAULT_GENERATION_CONFIG = {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20,
                             "repetition_penalty": 1.0}


class CheckpointError(ValueError):
    """A checkpoint directory we cannot read; the message names the file (and key)."""


# --- reading ---------------------------------------------------------------------------------------
class _TensorInfo:
    __slots__ = ("file", "dtype", "shape", "begin", "end")

    def __init__(self, file: str, dtype: str, shape: tuple[int, ...], begin: int, end: int):
        self.file, self.dtype, self.shape, self.begin, self.end = file, dtype, shape, begin, end


def read_safetensors_header(file: str) -> tuple[dict[str, _TensorInfo], dict[str, str]]:
    """Parse one file's header (names, dtypes, shapes, byte ranges) and check it against the file size."""
    try:
        size = os.path.getsize(file)
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{file}: not a safetensors file (shorter than its 8-byte header length)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100_000_000:
                raise CheckpointError(f"{file}: header length {n} exceeds the file size {size}; truncated?")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {file} does not exist") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: unreadable safetensors header ({e})") from None
    data_size = size - 8 - n
    meta = header.pop("__metadata__", None) or {}
    infos = {}
    for name, h in header.items():
        dtype, shape, (begin, end) = h.get("dtype"), tuple(int(s) for s in h.get("shape", ())), h["data_offsets"]
        if dtype not in _ST_TO_NP:
            raise CheckpointError(f"{file}: tensor {name!r} has dtype {dtype!r}, which we do not read")
        if end - begin != math.prod(shape) * _ST_TO_NP[dtype].itemsize or end > data_size or begin < 0:
            raise CheckpointError(f"{file}: tensor {name!r} (shape {shape}, {dtype}) has byte range "
                                  f"[{begin}, {end}) inconsistent with its shape or the file size; truncated?")
        infos[name] = _TensorInfo(file, dtype, shape, int(begin), int(end))
    return infos, meta


class SafetensorsReader(Mapping):
    """A lazy state dict over a directory (or one ``.safetensors`` file); see the module docstring."""

    def __init__(self, path: str | os.PathLike):
        path = os.fspath(path)
        self.source = path
        self._infos: dict[str, _TensorInfo] = {}
        if os.path.isfile(path):
            self._infos, _ = read_safetensors_header(path)
            return
        if not os.path.isdir(path):
            raise CheckpointError(f"checkpoint directory {path} does not exist")
        index = os.path.join(path, SAFE_INDEX)
        if os.path.exists(index):
            self.source = index
            self._read_index(path, index)
            return
        single = os.path.join(path, SAFE_WEIGHTS)
        files = [single] if os.path.exists(single) else sorted(glob.glob(os.path.join(path, "*.safetensors")))
        if not files:
            raise CheckpointError(f"{path} holds no {SAFE_WEIGHTS}, no {SAFE_INDEX} and no *.safetensors file")
        for file in files:
            infos, _ = read_safetensors_header(file)
            for name, info in infos.items():
                if name in self._infos:
                    raise CheckpointError(f"tensor {name!r} appears in both {self._infos[name].file} and {file}")
                self._infos[name] = info

    def _read_index(self, root: str, index: str) -> None:
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index with a 'weight_map' ({e!r})") from None
        headers: dict[str, dict[str, _TensorInfo]] = {}
        for shard in sorted(set(weight_map.values())):
            file = os.path.join(root, shard)
            if not os.path.exists(file):
                names = sorted(k for k, v in weight_map.items() if v == shard)
                raise CheckpointError(f"{index} lists shard {shard} (for {names[0]!r} and {len(names) - 1} more), "
                                      f"but {file} does not exist")
            headers[shard] = read_safetensors_header(file)[0]
        for name, shard in weight_map.items():
            if name not in headers[shard]:
                raise CheckpointError(f"{index} maps tensor {name!r} to {shard}, but that file has no such tensor")
            self._infos[name] = headers[shard][name]

    # Mapping protocol (keys come from headers; values are read on access).
    def __iter__(self) -> Iterator[str]:
        return iter(self._infos)

    def __len__(self) -> int:
        return len(self._infos)

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: v.shape for k, v in self._infos.items()}

    def dtypes(self) -> dict[str, np.dtype]:
        return {k: _ST_TO_NP[v.dtype] for k, v in self._infos.items()}

    def files(self) -> list[str]:
        return sorted({v.file for v in self._infos.values()})

    def __getitem__(self, name: str) -> np.ndarray:
        info = self._infos.get(name)
        if info is None:
            raise KeyError(f"{self.source} has no tensor {name!r}")
        from safetensors import safe_open
        try:
            with safe_open(info.file, framework="numpy") as f:
                array = f.get_tensor(name)
        except (TypeError, ValueError):
            # Older safetensors builds cannot hand bf16 to numpy: read the bytes the header points at.
            array = self._read_raw(info)
        if array.dtype != _ST_TO_NP[info.dtype] or tuple(array.shape) != info.shape:
            array = self._read_raw(info)
        return array

    @staticmethod
    def _read_raw(info: _TensorInfo) -> np.ndarray:
        with open(info.file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            f.seek(8 + n + info.begin)
            buf = f.read(info.end - info.begin)
        return np.frombuffer(buf, dtype=_ST_TO_NP[info.dtype]).reshape(info.shape).copy()


class _Observed(Mapping):
    """A Mapping view that reports each tensor read (for progress bars) and keeps ``shapes()``."""

    def __init__(self, inner: Mapping, on_tensor: Callable[[str], None]):
        self._inner, self._on_tensor = inner, on_tensor

    def __getitem__(self, name):
        value = self._inner[name]
        self._on_tensor(name)
        return value

    def __iter__(self):
        return iter(self._inner)

    def __len__(self):
        return len(self._inner)

    def shapes(self):
        return _shapes_of(self._inner)


def read_config(path: str | os.PathLike, **overrides) -> Qwen3VLConfig:
    """config.json of a directory (4.57 or 5.x layout); errors name the file and the field."""
    file = os.path.join(os.fspath(path), CONFIG)
    if not os.path.exists(file):
        raise CheckpointError(f"no {CONFIG} in {os.fspath(path)}")
    try:
        with open(file) as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: invalid JSON ({e})") from None
    try:
        return Qwen3VLConfig.from_hf_dict(d, **overrides)
    except ConfigError as e:
        raise ConfigError(f"{file}: {e}") from None


def checkpoint_dtype(path: str | os.PathLike) -> str | None:
    """The dtype config.json declares (5.x ``dtype``, 4.57 ``torch_dtype``), if it is one we hold."""
    try:
        with open(os.path.join(os.fspath(path), CONFIG)) as f:
            d = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    dtype = d.get("dtype") or d.get("torch_dtype") or (d.get("text_config") or {}).get("dtype")
    return dtype if dtype in ("float32", "bfloat16", "float16") else None


# --- building the model ----------------------------------------------------------------------------
def model_class():
    from genevolve_jax.models.qwen3_vl.model import Qwen3VLForConditionalGeneration
    return Qwen3VLForConditionalGeneration


def abstract_model(config: Qwen3VLConfig, *, seed: int = 0, mesh=None, rules=None) -> nnx.Module:
    """The model with ShapeDtypeStructs for values (nothing allocated); with a mesh, each carries the
    NamedSharding its logical axes resolve to, so loading places every tensor straight into its shard."""
    cls = model_class()
    model = nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(seed)))
    if mesh is not None:
        from genevolve_jax.sharding import logical
        graphdef, state = nnx.split(model)
        shardings = logical.state_shardings(state, mesh, rules if rules is not None else "fsdp")

        def attach(var, sharding):
            value = var.get_value()
            var.set_value(jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding))
            return var
        jax.tree.map(attach, state, shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))
        model = nnx.merge(graphdef, state)
    return model


@functools.lru_cache(maxsize=8)
def abstract_split(config: Qwen3VLConfig) -> tuple[Any, nnx.State, nnx.State]:
    """``nnx.split(abstract_model(config), nnx.Param, ...)``: the graph, the parameters and the rest,
    as ShapeDtypeStructs without shardings. Cached per config, because tracing the constructor
    takes seconds (3.9 s for the tiny test model on a loaded 2-core CPU) and a weight transfer
    asks for it several times. Read-only: callers copy before they change anything."""
    return nnx.split(abstract_model(config), nnx.Param, ...)


def _is_abstract(x) -> bool:
    return isinstance(x, jax.ShapeDtypeStruct)


def materialise_rest(model: nnx.Module, config: Qwen3VLConfig, *, seed: int = 0) -> nnx.Module:
    """Give concrete values to variables loading did not fill (buffers, RNG state), if there are any.

    They come from a jitted constructor that returns only those leaves, so XLA drops the unused
    parameter initialisers and nothing big is allocated.
    """
    graphdef, state = nnx.split(model)
    flat = dict(nnx.to_flat_state(state))
    todo = [p for p, v in flat.items() if _is_abstract(v.get_value())]
    if not todo:
        return model
    cls = model_class()

    @jax.jit
    def init_rest():
        fresh = dict(nnx.to_flat_state(nnx.state(cls(config, rngs=nnx.Rngs(seed)))))
        return {p: fresh[p].get_value() for p in todo}

    values = init_rest()
    for p in todo:
        sharding = getattr(flat[p].get_value(), "sharding", None)
        v = values[p]
        flat[p].set_value(jax.device_put(v, sharding) if sharding is not None else v)
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def load_pretrained(path: str | os.PathLike, *, param_dtype: str | None = None, dtype: str | None = None,
                    seed: int = 0, rngs: nnx.Rngs | None = None, mesh=None, rules=None, abstract: bool = True,
                    on_tensor: Callable[[str], None] | None = None, remat: str | None = None,
                    scan_layers: bool = False, lora=None) -> nnx.Module:
    """A Qwen3-VL directory → ``Qwen3VLForConditionalGeneration``.

    ``param_dtype`` defaults to the dtype config.json declares (float32 when unknown), ``dtype`` (compute)
    to ``param_dtype``. With ``abstract`` (default) the model is built by ``nnx.eval_shape`` and each
    parameter is allocated as its tensor arrives; ``rngs`` or ``abstract=False`` builds it concretely
    first. With ``mesh`` (+ ``rules``: a strategy name or rules table, default fsdp) every tensor is
    placed on its shard directly. ``scan_layers``: the decoder layers stacked (row i of each stacked
    parameter filled from ``layers.{i}``) instead of a list. ``lora`` (a LoRAConfig): fresh
    adapters on the loaded base (they are not in the directory; materialise_rest draws them).
    """
    path = os.fspath(path)
    param_dtype = param_dtype or checkpoint_dtype(path) or "float32"
    config = read_config(path, param_dtype=param_dtype, dtype=dtype or param_dtype, scan_layers=bool(scan_layers),
                         lora=lora, **({"remat": remat} if remat else {}))
    reader = SafetensorsReader(path)
    # Names and shapes against the config before anything is built or read.
    keymap.check_hf_keys(config, reader.shapes(), source=reader.source)
    state_dict: Mapping = _Observed(reader, on_tensor) if on_tensor else reader
    if rngs is None and abstract:
        return model_from_state_dict(config, state_dict, seed=seed, mesh=mesh, rules=rules, source=reader.source)
    model = model_class()(config, rngs=rngs or nnx.Rngs(seed))
    if mesh is not None:
        from genevolve_jax.sharding import logical
        state = nnx.state(model)
        nnx.update(model, jax.device_put(state, logical.state_shardings(state, mesh, rules or "fsdp")))
    keymap.load_hf_state_dict(model, state_dict, config, source=reader.source)
    return model


def model_from_state_dict(config: Qwen3VLConfig, state_dict: Mapping[str, Any], *, seed: int = 0, mesh=None,
                          rules=None, source: str = "state dict") -> nnx.Module:
    """Build the model abstractly and fill it from an HF-named mapping (lazy or in memory).

    No initialiser runs, so this is also the fast way to a model with given weights: eager random
    initialisation compiles one tiny XLA program per parameter, which costs tens of seconds on CPU.
    """
    keymap.check_hf_keys(config, _shapes_of(state_dict), source=source)
    model = abstract_model(config, seed=seed, mesh=mesh, rules=rules)
    keymap.load_hf_state_dict(model, state_dict, config, source=source)
    return materialise_rest(model, config, seed=seed)


def _shapes_of(state_dict: Mapping) -> dict[str, tuple[int, ...]]:
    s = getattr(state_dict, "shapes", None)
    return s() if callable(s) else {k: tuple(np.shape(v)) for k, v in state_dict.items()}


def random_state_dict(config: Qwen3VLConfig, seed: int = 0, dtype=np.float32) -> dict[str, np.ndarray]:
    """HF-named random weights for demos, benchmarks and tests, every tensor drawn afresh: norm weights
    ~ U(0.5, 1.5), biases ~ N(0, 0.1²), embeddings ~ N(0, 1), matrices ~ N(0, 1/fan_in), so logits are
    O(1) and a transposed norm or a dropped bias shows (default init, norms = 1, would hide them)."""
    rng = np.random.default_rng(seed)
    out = {}
    for e in keymap.key_entries(config):
        if e.hf.endswith("bias"):
            a = 0.1 * rng.standard_normal(e.hf_shape, np.float32)
        elif "norm" in e.hf:
            a = rng.uniform(0.5, 1.5, e.hf_shape).astype(np.float32)
        elif "embed_tokens" in e.hf or "pos_embed" in e.hf:
            a = rng.standard_normal(e.hf_shape, np.float32)
        else:
            a = rng.standard_normal(e.hf_shape, np.float32) / np.float32(np.sqrt(math.prod(e.hf_shape[1:])))
        out[e.hf] = a.astype(dtype)
    return out


# --- writing ---------------------------------------------------------------------------------------
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """``5GB`` → 5·10⁹, ``500MiB`` → 500·2²⁰, ``1234`` → 1234 (transformers' convention)."""
    if isinstance(size, int):
        value = size
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(size))
        if not m or m.group(2).upper() not in _SIZE_UNITS:
            raise ValueError(f"max shard size {size!r} is not a size like 5GB, 500MB, 2GiB or a byte count")
        value = int(float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()])
    if value <= 0:
        raise ValueError(f"max shard size must be positive, got {size!r}")
    return value


def plan_shards(sizes: list[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """Group names in order into shards of at most ``max_shard_bytes``; a bigger tensor gets its own."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, nbytes in sizes:
        if shards[-1] and used + nbytes > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += nbytes
    return shards


def _header_bytes(entries: list[tuple[str, str, tuple[int, ...], int]]) -> bytes:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, st_dtype, shape, nbytes in entries:
        header[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned, as safetensors itself does
    return struct.pack("<Q", len(raw)) + raw


def write_safetensors_file(file: str | os.PathLike, planned: list[tuple[str, str, tuple]],
                           tensors: Iterator[tuple[str, np.ndarray]],
                           on_tensor: Callable[[str], None] | None = None) -> None:
    """One safetensors file holding ``planned`` = [(name, safetensors dtype, shape)], in that order:
    the header first, then each tensor as ``tensors`` yields it (checked against the plan). Written
    under ``<file>.tmp`` and renamed when complete."""
    file = os.fspath(file)
    nbytes = [math.prod(shape) * _ST_TO_NP[st].itemsize for _, st, shape in planned]
    tmp = file + ".tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(_header_bytes([(k, st, tuple(shape), n) for (k, st, shape), n in zip(planned, nbytes)]))
            for expected, st, shape in planned:
                key, array = next(tensors)
                if key != expected or _NP_TO_ST.get(np.dtype(array.dtype)) != st or tuple(array.shape) != tuple(shape):
                    raise RuntimeError(f"tensor stream out of plan: got {key!r} {array.dtype} {array.shape}, "
                                       f"planned {expected!r} {(st, tuple(shape))}")
                # Raw bytes through a uint8 view: no second copy of the tensor.
                f.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
                if on_tensor:
                    on_tensor(key)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    os.replace(tmp, file)


def shard_file_names(count: int) -> list[str]:
    """The weight files of an export in ``count`` files (transformers' names)."""
    return [SAFE_WEIGHTS] if count == 1 else [f"model-{k + 1:05d}-of-{count:05d}.safetensors" for k in range(count)]


def write_safetensors_index(path: str | os.PathLike, weight_map: Mapping[str, str], total_size: int) -> None:
    with open(os.path.join(os.fspath(path), SAFE_INDEX), "w") as f:
        json.dump({"metadata": {"total_size": int(total_size)}, "weight_map": dict(weight_map)}, f, indent=2)


def remove_other_weight_files(path: str | os.PathLike, written: list[str]) -> None:
    """Drop weight files of an earlier export into the same directory, so no loader mixes the two."""
    ours = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json")
    for old in os.listdir(path):
        if ours.fullmatch(old) and old not in written:
            os.remove(os.path.join(path, old))


def write_safetensors_stream(path: str | os.PathLike, tensors: Iterator[tuple[str, np.ndarray]],
                             max_shard_bytes: int | str = "5GB", *, planned: list[tuple[str, str, tuple]] | None = None,
                             on_tensor: Callable[[str], None] | None = None) -> list[str]:
    """Stream (name, array) pairs into ``model.safetensors`` or ``model-0000k-of-0000n.safetensors`` +
    index. ``planned`` = [(name, safetensors dtype, shape)] in iteration order lets the shard layout be
    fixed before the first tensor is produced; without it the iterator is materialised first (small
    dicts only). Returns the files written."""
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    limit = parse_size(max_shard_bytes)
    if planned is None:
        cache = dict(tensors)
        planned = [(k, _NP_TO_ST[np.dtype(v.dtype)], tuple(v.shape)) for k, v in cache.items()]
        tensors = iter(cache.items())
    nbytes = {name: math.prod(shape) * _ST_TO_NP[st].itemsize for name, st, shape in planned}
    meta = {name: (name, st, tuple(shape)) for name, st, shape in planned}
    shards = plan_shards([(n, nbytes[n]) for n, _, _ in planned], limit)
    names = shard_file_names(len(shards))
    for name, shard in zip(names, shards):
        write_safetensors_file(os.path.join(path, name), [meta[k] for k in shard], tensors, on_tensor)
    if len(shards) > 1:
        write_safetensors_index(path, {k: name for name, shard in zip(names, shards) for k in shard},
                                sum(nbytes.values()))
        written = names + [SAFE_INDEX]
    else:
        written = names
    remove_other_weight_files(path, written)
    return written


def write_hf_config(path: str | os.PathLike, config: Qwen3VLConfig, dtype: str,
                    generation_config: dict | None = None) -> list[str]:
    """config.json (transformers 5.x layout, ``torch_dtype`` = the export dtype) and
    generation_config.json (``generation_config`` verbatim, else Qwen3-VL's sampling defaults)."""
    with open(os.path.join(path, CONFIG), "w") as f:
        json.dump(config.to_hf_dict(torch_dtype=dtype), f, indent=2)
    with open(os.path.join(path, GENERATION_CONFIG), "w") as f:
        json.dump(DEFAULT_GENERATION_CONFIG if generation_config is None else generation_config, f, indent=2)
    return [CONFIG, GENERATION_CONFIG]


def save_pretrained(model: nnx.Module, path: str | os.PathLike, *, dtype: str = "bfloat16",
                    max_shard_bytes: int | str = "5GB", config: Qwen3VLConfig | None = None,
                    generation_config: dict | None = None,
                    on_tensor: Callable[[str], None] | None = None) -> list[str]:
    """Export to a directory ``transformers.Qwen3VLForConditionalGeneration.from_pretrained`` loads:
    weights (streamed, sharded above ``max_shard_bytes``), config.json in the 5.x layout and
    generation_config.json (``generation_config`` verbatim, else Qwen3-VL's sampling defaults). A tied
    model writes no ``lm_head.weight``, as transformers does."""
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"export dtype must be one of {sorted(EXPORT_DTYPES)}, got {dtype!r}")
    config = config or model.config
    path = os.fspath(path)
    np_dtype = EXPORT_DTYPES[dtype]
    planned = [(e.hf, _NP_TO_ST[np_dtype], e.hf_shape) for e in keymap.key_entries(config)]
    written = write_safetensors_stream(path, keymap.hf_state_dict(model, config, dtype=np_dtype),
                                       max_shard_bytes, planned=planned, on_tensor=on_tensor)
    return written + write_hf_config(path, config, dtype, generation_config)


PARTIAL_SUFFIX = ".partial"
REPLACED_SUFFIX = ".replaced"


def begin_directory(path: str | os.PathLike) -> str:
    """Start an atomic write of directory ``path`` (see :func:`atomic_directory`): leftovers of an
    earlier crash removed, ``<path>.partial`` created empty. Returns the partial directory."""
    final = os.path.abspath(os.fspath(path))
    partial, replaced = final + PARTIAL_SUFFIX, final + REPLACED_SUFFIX
    for stale in (partial, replaced):
        if os.path.isdir(stale):
            shutil.rmtree(stale)
    os.makedirs(os.path.dirname(final), exist_ok=True)
    os.makedirs(partial)
    return partial


def commit_directory(path: str | os.PathLike) -> str:
    """Finish :func:`begin_directory`: the complete ``<path>.partial`` becomes ``path``."""
    final = os.path.abspath(os.fspath(path))
    partial, replaced = final + PARTIAL_SUFFIX, final + REPLACED_SUFFIX
    if os.path.lexists(final):
        os.replace(final, replaced)
    os.replace(partial, final)
    shutil.rmtree(replaced, ignore_errors=True)
    return final


def abort_directory(path: str | os.PathLike) -> None:
    """Drop the partial directory of a failed :func:`begin_directory`; ``path`` keeps what it held."""
    shutil.rmtree(os.path.abspath(os.fspath(path)) + PARTIAL_SUFFIX, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[str]:
    """Write a directory under ``<path>.partial`` and move it to ``path`` only when the block ends
    without an error, so that ``path`` holds either the previous export or the new one, complete;
    never a half-written one (a reader such as an SGLang reload or ``from_pretrained`` may look at
    any time). An existing ``path`` is first renamed to ``<path>.replaced`` and deleted after the
    swap (POSIX cannot rename a directory over a non-empty one): a crash between the two renames
    leaves ``path`` absent and the previous export whole under ``.replaced``. Leftovers of an
    earlier crash are removed first. On an error the partial directory is removed."""
    partial = begin_directory(path)
    try:
        yield partial
    except BaseException:
        abort_directory(path)
        raise
    commit_directory(path)


def save_state_dict(state_dict: Mapping[str, np.ndarray], path: str | os.PathLike,
                    max_shard_bytes: int | str = "5GB") -> list[str]:
    """Write a plain dict of arrays in the same (sharded) layout; used for fixtures and tools."""
    planned = [(k, _NP_TO_ST[np.dtype(v.dtype)], tuple(v.shape)) for k, v in state_dict.items()]
    return write_safetensors_stream(path, iter(state_dict.items()), max_shard_bytes, planned=planned)


__all__ = ["SafetensorsReader", "CheckpointError", "read_config", "load_pretrained", "save_pretrained",
           "atomic_directory", "begin_directory", "commit_directory", "abort_directory", "model_from_state_dict",
           "random_state_dict", "save_state_dict", "write_safetensors_stream", "write_safetensors_file",
           "write_safetensors_index", "write_hf_config", "shard_file_names", "safetensors_dtype",
           "remove_other_weight_files", "parse_size", "plan_shards", "abstract_model", "abstract_split",
           "read_safetensors_header"]
