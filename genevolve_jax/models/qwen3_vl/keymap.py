"""The declarative Hugging Face ↔ NNX key map for Qwen3-VL.

One table, read in two directions: import turns each HF tensor into the NNX parameter it names;
export turns each NNX parameter back into its HF tensor. An entry is an HF name pattern, an NNX path
pattern, and how the array changes between them:

- ``linear``: HF stores ``weight`` as (out, in...) (or a Conv3d's (out, C, T, P, P)); we store
  input-major kernels whose first ``n_in`` dims are the input, reshaped so that heads stay a visible
  axis for sharding. Import: flatten to 2-D, transpose, reshape. Export: the exact inverse.
- ``reshape``: same element order, different shape (e.g. a fused qkv bias as [3, heads, head_dim]).
- ``same``: identical (norm weights, embeddings, biases).

``{i}`` expands over decoder layers or vision blocks and ``{j}`` over deepstack mergers, from the
config, so a table entry per concrete tensor exists and shapes can be checked before any tensor is
read.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import numpy as np
from flax import nnx

from genevolve_jax.models.qwen3_vl.config import Qwen3VLConfig


@dataclasses.dataclass(frozen=True)
class KeyEntry:
    hf: str                       # Hugging Face state-dict name
    nnx: tuple[str | int, ...]    # path into the NNX module tree
    kind: str                     # "linear" | "reshape" | "same"
    hf_shape: tuple[int, ...]
    nnx_shape: tuple[int, ...]
    n_in: int = 1                 # "linear": how many leading NNX dims are the input
    stack_index: int | None = None  # scanned decoder: row of the stacked [L, ...] parameter

    def to_nnx(self, a: np.ndarray) -> np.ndarray:
        if self.kind == "linear":
            return a.reshape(a.shape[0], -1).T.reshape(self.nnx_shape)
        return a.reshape(self.nnx_shape)

    def to_hf(self, a: np.ndarray) -> np.ndarray:
        if self.kind == "linear":
            n_in = math.prod(self.nnx_shape[: self.n_in])
            return a.reshape(n_in, -1).T.reshape(self.hf_shape)
        return a.reshape(self.hf_shape)


# (hf pattern, nnx pattern, kind, n_in, shape function (cfg) -> (hf_shape, nnx_shape))
_Rule = tuple[str, str, str, int, Callable[[Qwen3VLConfig], tuple[tuple, tuple]]]


def _text_rules() -> list[_Rule]:
    def t(c):
        return c.text
    lay = "model.language_model.layers.{i}."
    nlay = "language_model.layers.{i}."
    return [
        ("model.language_model.embed_tokens.weight", "language_model.embed_tokens.embedding", "same", 1,
         lambda c: ((t(c).vocab_size, t(c).hidden_size),) * 2),
        (lay + "self_attn.q_proj.weight", nlay + "self_attn.q_proj.kernel", "linear", 1,
         lambda c: ((t(c).num_attention_heads * t(c).head_dim, t(c).hidden_size),
                    (t(c).hidden_size, t(c).num_attention_heads, t(c).head_dim))),
        (lay + "self_attn.k_proj.weight", nlay + "self_attn.k_proj.kernel", "linear", 1,
         lambda c: ((t(c).num_key_value_heads * t(c).head_dim, t(c).hidden_size),
                    (t(c).hidden_size, t(c).num_key_value_heads, t(c).head_dim))),
        (lay + "self_attn.v_proj.weight", nlay + "self_attn.v_proj.kernel", "linear", 1,
         lambda c: ((t(c).num_key_value_heads * t(c).head_dim, t(c).hidden_size),
                    (t(c).hidden_size, t(c).num_key_value_heads, t(c).head_dim))),
        (lay + "self_attn.o_proj.weight", nlay + "self_attn.o_proj.kernel", "linear", 2,
         lambda c: ((t(c).hidden_size, t(c).num_attention_heads * t(c).head_dim),
                    (t(c).num_attention_heads, t(c).head_dim, t(c).hidden_size))),
        (lay + "self_attn.q_norm.weight", nlay + "self_attn.q_norm.scale", "same", 1,
         lambda c: ((t(c).head_dim,),) * 2),
        (lay + "self_attn.k_norm.weight", nlay + "self_attn.k_norm.scale", "same", 1,
         lambda c: ((t(c).head_dim,),) * 2),
        (lay + "mlp.gate_proj.weight", nlay + "mlp.gate_proj.kernel", "linear", 1,
         lambda c: ((t(c).intermediate_size, t(c).hidden_size), (t(c).hidden_size, t(c).intermediate_size))),
        (lay + "mlp.up_proj.weight", nlay + "mlp.up_proj.kernel", "linear", 1,
         lambda c: ((t(c).intermediate_size, t(c).hidden_size), (t(c).hidden_size, t(c).intermediate_size))),
        (lay + "mlp.down_proj.weight", nlay + "mlp.down_proj.kernel", "linear", 1,
         lambda c: ((t(c).hidden_size, t(c).intermediate_size), (t(c).intermediate_size, t(c).hidden_size))),
        (lay + "input_layernorm.weight", nlay + "input_layernorm.scale", "same", 1,
         lambda c: ((t(c).hidden_size,),) * 2),
        (lay + "post_attention_layernorm.weight", nlay + "post_attention_layernorm.scale", "same", 1,
         lambda c: ((t(c).hidden_size,),) * 2),
        ("model.language_model.norm.weight", "language_model.norm.scale", "same", 1,
         lambda c: ((t(c).hidden_size,),) * 2),
    ]


def _vision_rules() -> list[_Rule]:
    def v(c):
        return c.vision
    blk = "model.visual.blocks.{i}."
    nblk = "visual.blocks.{i}."

    def merger_rules(hf_prefix: str, nnx_prefix: str, norm_dim: Callable) -> list[_Rule]:
        def m4(c):
            return v(c).hidden_size * v(c).spatial_merge_size ** 2
        return [
            (hf_prefix + "norm.weight", nnx_prefix + "norm.scale", "same", 1, lambda c: ((norm_dim(c),),) * 2),
            (hf_prefix + "norm.bias", nnx_prefix + "norm.bias", "same", 1, lambda c: ((norm_dim(c),),) * 2),
            (hf_prefix + "linear_fc1.weight", nnx_prefix + "linear_fc1.kernel", "linear", 1,
             lambda c: ((m4(c), m4(c)),) * 2),
            (hf_prefix + "linear_fc1.bias", nnx_prefix + "linear_fc1.bias", "same", 1, lambda c: ((m4(c),),) * 2),
            (hf_prefix + "linear_fc2.weight", nnx_prefix + "linear_fc2.kernel", "linear", 1,
             lambda c: ((v(c).out_hidden_size, m4(c)), (m4(c), v(c).out_hidden_size))),
            (hf_prefix + "linear_fc2.bias", nnx_prefix + "linear_fc2.bias", "same", 1,
             lambda c: ((v(c).out_hidden_size,),) * 2),
        ]

    def vec(f):
        return lambda c: ((f(c),),) * 2

    def hid(c):
        return v(c).hidden_size

    return [
        ("model.visual.patch_embed.proj.weight", "visual.patch_embed.proj.kernel", "linear", 1,
         lambda c: ((hid(c), v(c).in_channels, v(c).temporal_patch_size, v(c).patch_size, v(c).patch_size),
                    (v(c).patch_dim, hid(c)))),
        ("model.visual.patch_embed.proj.bias", "visual.patch_embed.proj.bias", "same", 1, vec(hid)),
        ("model.visual.pos_embed.weight", "visual.pos_embed.embedding", "same", 1,
         lambda c: ((v(c).num_position_embeddings, hid(c)),) * 2),
        (blk + "norm1.weight", nblk + "norm1.scale", "same", 1, vec(hid)),
        (blk + "norm1.bias", nblk + "norm1.bias", "same", 1, vec(hid)),
        (blk + "norm2.weight", nblk + "norm2.scale", "same", 1, vec(hid)),
        (blk + "norm2.bias", nblk + "norm2.bias", "same", 1, vec(hid)),
        (blk + "attn.qkv.weight", nblk + "attn.qkv.kernel", "linear", 1,
         lambda c: ((3 * hid(c), hid(c)), (hid(c), 3, v(c).num_heads, v(c).head_dim))),
        (blk + "attn.qkv.bias", nblk + "attn.qkv.bias", "reshape", 1,
         lambda c: ((3 * hid(c),), (3, v(c).num_heads, v(c).head_dim))),
        (blk + "attn.proj.weight", nblk + "attn.proj.kernel", "linear", 2,
         lambda c: ((hid(c), hid(c)), (v(c).num_heads, v(c).head_dim, hid(c)))),
        (blk + "attn.proj.bias", nblk + "attn.proj.bias", "same", 1, vec(hid)),
        (blk + "mlp.linear_fc1.weight", nblk + "mlp.linear_fc1.kernel", "linear", 1,
         lambda c: ((v(c).intermediate_size, hid(c)), (hid(c), v(c).intermediate_size))),
        (blk + "mlp.linear_fc1.bias", nblk + "mlp.linear_fc1.bias", "same", 1,
         vec(lambda c: v(c).intermediate_size)),
        (blk + "mlp.linear_fc2.weight", nblk + "mlp.linear_fc2.kernel", "linear", 1,
         lambda c: ((hid(c), v(c).intermediate_size), (v(c).intermediate_size, hid(c)))),
        (blk + "mlp.linear_fc2.bias", nblk + "mlp.linear_fc2.bias", "same", 1, vec(hid)),
        *merger_rules("model.visual.merger.", "visual.merger.", hid),
        *merger_rules("model.visual.deepstack_merger_list.{j}.", "visual.deepstack_merger_list.{j}.",
                      lambda c: hid(c) * v(c).spatial_merge_size ** 2),
    ]


def _head_rules() -> list[_Rule]:
    return [("lm_head.weight", "lm_head.kernel", "linear", 1,
             lambda c: ((c.text.vocab_size, c.text.hidden_size), (c.text.hidden_size, c.text.vocab_size)))]


def _parse_path(path: str) -> tuple[str | int, ...]:
    return tuple(int(p) if p.isdigit() else p for p in path.split("."))


def key_entries(config: Qwen3VLConfig) -> list[KeyEntry]:
    """Every concrete tensor of a model built from ``config``, in a stable order."""
    rules = _text_rules() + _vision_rules() + ([] if config.tie_word_embeddings else _head_rules())
    out: list[KeyEntry] = []
    for hf, path, kind, n_in, shapes in rules:
        hf_shape, nnx_shape = (tuple(int(s) for s in x) for x in shapes(config))
        if "{i}" in hf:
            count = config.text.num_hidden_layers if "language_model" in hf else config.vision.depth
            subs = [{"i": i} for i in range(count)]
        elif "{j}" in hf:
            subs = [{"j": j} for j in range(len(config.vision.deepstack_visual_indexes))]
        else:
            subs = [{}]
        for s in subs:
            nnx_path, stack = _parse_path(path.format(**s)), None
            if config.scan_layers and path.startswith("language_model.layers.{i}."):
                # Stacked layers: HF layers.{i}.X <-> row i of the [L, ...] parameter X.
                nnx_path, stack = nnx_path[:2] + nnx_path[3:], s["i"]
            out.append(KeyEntry(hf.format(**s), nnx_path, kind, hf_shape, nnx_shape, n_in, stack))
    return out


# Names a checkpoint may carry that hold no parameter of ours (a tied head saved anyway).
def _ignorable(name: str, config: Qwen3VLConfig) -> bool:
    return config.tie_word_embeddings and name == "lm_head.weight"


def check_hf_keys(config: Qwen3VLConfig, shapes: Mapping[str, Sequence[int]], source: str = "checkpoint") -> None:
    """Fail before reading any tensor: missing, unexpected or mis-shaped names raise, naming them."""
    entries = key_entries(config)
    expected = {e.hf for e in entries}
    missing = [e.hf for e in entries if e.hf not in shapes]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise KeyError(f"{source} is missing tensor {missing[0]!r}{more}: {missing[:5]}")
    unexpected = [k for k in shapes if k not in expected and not _ignorable(k, config)]
    if unexpected:
        raise ValueError(f"{source} has tensors this Qwen3-VL config does not define: {sorted(unexpected)[:5]}"
                         f"{' …' if len(unexpected) > 5 else ''}; is the config.json the checkpoint's own?")
    for e in entries:
        got = tuple(int(s) for s in shapes[e.hf])
        if got != e.hf_shape:
            raise ValueError(f"{source} tensor {e.hf!r} has shape {got}, the config expects {e.hf_shape}")


def node_at(model: nnx.Module, path: tuple[str | int, ...]) -> Any:
    """The module or variable at an NNX path (attribute names and list indices)."""
    obj: Any = model
    for part in path:
        obj = obj[part] if isinstance(part, int) else getattr(obj, part)
    return obj


def _variable_at(model: nnx.Module, path: tuple[str | int, ...]) -> nnx.Variable:
    obj = node_at(model, path)
    if not isinstance(obj, nnx.Variable):
        raise TypeError(f"NNX path {'.'.join(map(str, path))} is not a parameter")
    return obj


def load_hf_state_dict(model: nnx.Module, state_dict: Mapping[str, Any], config: Qwen3VLConfig | None = None,
                       source: str = "checkpoint") -> None:
    """Copy HF tensors into ``model`` in place, one tensor at a time.

    ``state_dict`` may be lazy (a safetensors reader): each tensor is read, converted, placed on the
    device with the parameter's existing sharding, and dropped before the next one is read, so host
    memory holds one tensor at a time. Keys and shapes are checked first, before any tensor is read.
    """
    config = config or model.config
    shapes = getattr(state_dict, "shapes", None)
    shapes = shapes() if callable(shapes) else {k: np.shape(v) for k, v in state_dict.items()}
    check_hf_keys(config, shapes, source)
    for e in key_entries(config):
        var = _variable_at(model, e.nnx)
        current = var.get_value()
        array = e.to_nnx(_to_numpy(state_dict[e.hf]))
        if e.stack_index is not None:  # fill one row of a stacked (scanned) parameter
            if tuple(array.shape) != tuple(current.shape[1:]):
                raise ValueError(f"model parameter {'.'.join(map(str, e.nnx))}[{e.stack_index}] has shape "
                                 f"{tuple(current.shape[1:])}, but {e.hf!r} maps to {tuple(array.shape)}")
            if isinstance(current, jax.ShapeDtypeStruct):  # abstract model: allocate the stack once
                sharding = getattr(current, "sharding", None)
                current = jax.numpy.zeros(current.shape, current.dtype, device=sharding)
            var.set_value(_set_row(current, jax.numpy.asarray(array, current.dtype), e.stack_index))
            continue
        if tuple(array.shape) != tuple(current.shape):
            raise ValueError(f"model parameter {'.'.join(map(str, e.nnx))} has shape {tuple(current.shape)}, "
                             f"but {e.hf!r} maps to {tuple(array.shape)}")
        sharding = getattr(current, "sharding", None)
        array = array.astype(current.dtype)
        var.set_value(jax.device_put(array, sharding) if sharding is not None else jax.numpy.asarray(array))


@functools.partial(jax.jit, donate_argnums=0)
def _set_row(stack: jax.Array, row: jax.Array, index) -> jax.Array:
    """stack[index] = row in place (the stack is donated): streaming import stays O(one tensor)."""
    return stack.at[index].set(row)


def hf_state_dict(model: nnx.Module, config: Qwen3VLConfig | None = None,
                  dtype: Any = None) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (HF name, numpy tensor) pairs, one at a time, for streaming export."""
    config = config or model.config
    for e in key_entries(config):
        value = _variable_at(model, e.nnx).get_value()
        if e.stack_index is not None:
            value = value[e.stack_index]
        array = np.asarray(jax.device_get(value))
        if dtype is not None:
            array = array.astype(dtype)
        yield e.hf, np.ascontiguousarray(e.to_hf(array))


def _to_numpy(t: Any) -> np.ndarray:
    if isinstance(t, np.ndarray):
        return t
    if hasattr(t, "detach"):  # a torch tensor (bf16 has no numpy dtype: go through float32)
        import torch
        t = t.detach().cpu()
        if t.dtype == torch.bfloat16:
            import ml_dtypes
            return t.float().numpy().astype(ml_dtypes.bfloat16)
        return t.numpy()
    return np.asarray(t)
