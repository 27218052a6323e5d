"""fp32 parity of the NNX vision tower with transformers' Qwen3VLVisionModel (``model.visual``).

Every weight, LayerNorm scales and biases included, is drawn at random so that a mistake in any
part (interpolation taps, merge-block order, rotary layout, segment boundaries, GELU flavour,
pre/post-shuffle norm) moves the outputs well beyond the tolerance.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from genevolve_jax.models.qwen3_vl import config as qwen_config
from genevolve_jax.models.qwen3_vl import keymap
from genevolve_jax.models.qwen3_vl import vision

TOL = 1e-4


def _tiny(**vision_overrides):
    cfg = qwen_config.tiny()
    if vision_overrides:
        import dataclasses
        cfg = cfg.replace(vision=dataclasses.replace(cfg.vision, **vision_overrides))
    return cfg


def _hf_visual(cfg: qwen_config.Qwen3VLConfig, seed: int):
    vc = {k: v for k, v in cfg.to_hf_dict()["vision_config"].items() if k != "model_type"}
    # Eager attention: the plain softmax(QKᵀ)V reference (the default would be SDPA).
    hf_cfg = transformers.Qwen3VLVisionConfig(**vc, attn_implementation="eager")
    model = transformers.models.qwen3_vl.modeling_qwen3_vl.Qwen3VLVisionModel(hf_cfg).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * noise)       # LayerNorm scales around 1, clearly not 1
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            elif name == "pos_embed.weight":
                p.copy_(0.5 * noise)
            else:
                p.copy_(noise / np.sqrt(p[0].numel()))  # fan-in scaled, keeps activations O(1)
    return model


def _abstract_visual(cfg: qwen_config.Qwen3VLConfig) -> vision.Qwen3VLVisionModel:
    """The module structure without running initialisers (every value is set by the caller)."""
    return nnx.eval_shape(lambda: vision.Qwen3VLVisionModel(cfg, rngs=nnx.Rngs(0)))


def _random_visual(cfg: qwen_config.Qwen3VLConfig, seed: int) -> vision.Qwen3VLVisionModel:
    """Every parameter drawn at random (norm scales around 1, not 1), no transformers involved."""
    visual = _abstract_visual(cfg)
    rng = np.random.default_rng(seed)
    for path, var in nnx.state(visual, nnx.Param).flat_state():
        spec = var.get_value()
        noise = rng.standard_normal(spec.shape)
        if path[-1] == "scale":
            value = 1.0 + 0.3 * noise
        elif path[-1] == "bias":
            value = 0.1 * noise
        else:
            value = noise / np.sqrt(spec.shape[0])
        var.set_value(np.asarray(value, np.float32).astype(spec.dtype))
    return visual


def _load_visual(visual: vision.Qwen3VLVisionModel, cfg: qwen_config.Qwen3VLConfig, hf_state: dict) -> None:
    """Copy ``model.visual.*`` through the lead's declarative key map into the standalone tower."""
    entries = [e for e in keymap.key_entries(cfg) if e.nnx[0] == "visual"]
    names = {e.hf[len("model.visual."):] for e in entries}
    assert names == set(hf_state), sorted(names ^ set(hf_state))
    for e in entries:
        var = visual
        for part in e.nnx[1:]:
            var = var[part] if isinstance(part, int) else getattr(var, part)
        value = e.to_nnx(hf_state[e.hf[len("model.visual."):]].numpy())
        current = var.get_value()  # a ShapeDtypeStruct on an abstract model
        assert value.shape == current.shape, e.hf
        var.set_value(np.asarray(value).astype(current.dtype))


def _jit_forward(visual, pixels, grid):
    """The tower as a hot loop runs it: graph split once, host-side grid inputs, one jitted call."""
    graph, state = nnx.split(visual)
    run = jax.jit(lambda s, p, a: nnx.merge(graph, s).encode(p, a))
    return run(state, pixels, vision.vision_inputs(grid, visual.config.vision))


@pytest.fixture(scope="module")
def pair():
    """One randomised transformers tower and the NNX tower loaded from it, shared by the cases."""
    cfg = _tiny()
    hf = _hf_visual(cfg, seed=7)
    visual = _abstract_visual(cfg)
    _load_visual(visual, cfg, hf.state_dict())
    return hf, visual


def _call_forward(visual, pixels, grid):
    """``visual(pixels, grid_thw)`` traced with the grid static, as model.py calls it."""
    graph, state = nnx.split(visual)
    return jax.jit(lambda s, p: nnx.merge(graph, s)(p, grid))(state, pixels)


def _compare(pair, grid_thw, seed, via_call=False):
    hf, visual = pair
    cfg = visual.config
    rng = np.random.default_rng(seed)
    grid = np.asarray(grid_thw, np.int64)
    n = int(grid.prod(-1).sum())
    pixels = rng.standard_normal((n, cfg.vision.patch_dim)).astype(np.float32)
    with torch.no_grad():
        ref = hf(torch.from_numpy(pixels), grid_thw=torch.from_numpy(grid))
    forward = _call_forward if via_call else _jit_forward
    embeds, deepstack = forward(visual, pixels, grid)
    want = ref.pooler_output.numpy()
    assert embeds.shape == want.shape == (n // cfg.vision.spatial_merge_size ** 2, cfg.vision.out_hidden_size)
    assert np.abs(want).max() > 0.5  # not vanishing: the comparison below means something
    np.testing.assert_allclose(np.asarray(embeds), want, atol=TOL, rtol=0)
    assert len(deepstack) == len(ref.deepstack_features) == len(cfg.vision.deepstack_visual_indexes)
    for ours, theirs in zip(deepstack, ref.deepstack_features):
        assert np.abs(theirs.numpy()).max() > 0.5
        np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), atol=TOL, rtol=0)


@pytest.mark.parametrize("case,grid", [
    ("one_image", [[1, 6, 10]]),
    ("two_images_of_different_sizes", [[1, 4, 4], [1, 12, 6]]),   # one smaller, one larger than the 8x8 table
    ("two_frame_video", [[2, 6, 4]]),
    ("image_and_video", [[1, 2, 8], [3, 4, 6]]),
])
def test_vision_tower_matches_transformers(pair, case, grid):
    _compare(pair, grid, seed=sum(map(ord, case)))


@pytest.mark.parametrize("grid", [
    [[1, 4, 6], [2, 2, 2]],     # mixed sizes: one masked N×N attention
    [[2, 4, 4], [1, 2, 8]],     # every frame 16 patches: blockwise attention without a mask
])
def test_call_with_static_grid_matches_transformers(pair, grid):
    assert (vision.uniform_segment_length(grid) is None) == (grid[0] == [1, 4, 6])
    _compare(pair, grid, seed=5, via_call=True)


def test_bf16_stays_within_bf16_tolerance_of_fp32(pair):
    hf, _ = pair
    cfg = _tiny()
    grid = np.array([[1, 6, 4], [2, 4, 4]])
    pixels = np.random.default_rng(11).standard_normal((56, cfg.vision.patch_dim)).astype(np.float32)
    outs = []
    for dtype in ("float32", "bfloat16"):
        c = cfg.replace(param_dtype=dtype, dtype=dtype)
        visual = _abstract_visual(c)
        _load_visual(visual, c, hf.state_dict())
        embeds, deepstack = _jit_forward(visual, pixels, grid)
        assert embeds.dtype == jnp.dtype(dtype)
        outs.append([np.asarray(x, np.float32) for x in [embeds, *deepstack]])
    for ref, low in zip(*outs):
        assert np.abs(low - ref).max() <= 0.05 * np.abs(ref).max()


@pytest.mark.slow  # two backward compiles: ~40 s on a busy 2-core CPU
def test_remat_keeps_values_and_gradients():
    grid = np.array([[1, 4, 4], [2, 2, 4]])
    pixels = np.random.default_rng(4).standard_normal((32, 1536)).astype(np.float32)
    aux = vision.vision_inputs(grid, _tiny().vision)
    results = []
    for remat in ("none", "full"):
        visual = _random_visual(_tiny().replace(remat=remat), 4)
        graph, state = nnx.split(visual)

        def loss(s):
            embeds, deep = nnx.merge(graph, s).encode(pixels, aux)
            return jnp.sum(embeds ** 2) + sum(jnp.sum(d) for d in deep)

        results.append(jax.jit(jax.value_and_grad(loss))(state))
    (v0, g0), (v1, g1) = results
    np.testing.assert_allclose(v1, v0, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        a, b = np.asarray(a), np.asarray(b)
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * max(np.abs(a).max(), 1.0))


def test_sharded_forward_under_a_mesh_matches_unsharded():
    from jax.sharding import Mesh
    from genevolve_jax.sharding import logical
    cfg = _tiny(num_heads=4)
    grid = np.array([[1, 4, 4], [2, 2, 4]])
    visual = _random_visual(cfg, 3)
    pixels = np.random.default_rng(3).standard_normal((32, cfg.vision.patch_dim)).astype(np.float32)
    want, want_deep = _jit_forward(visual, pixels, grid)
    aux = vision.vision_inputs(grid, cfg.vision)
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(1, 2, 2, 2), logical.MESH_AXES)
    graph, state = nnx.split(visual)
    with logical.use_rules(mesh, "fsdp_tp"):
        state = jax.device_put(state, logical.state_shardings(state, mesh, "fsdp_tp"))
        got, got_deep = jax.jit(lambda s, p, a: nnx.merge(graph, s).encode(p, a))(state, pixels, aux)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
    for a, b in zip(got_deep, want_deep):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_attention_does_not_cross_images_or_frames():
    """Changing one frame's pixels changes only that frame's merged tokens."""
    cfg = _tiny()
    grid = np.array([[1, 4, 4], [2, 4, 4]])
    visual = _random_visual(cfg, 0)
    rng = np.random.default_rng(0)
    pixels = rng.standard_normal((48, cfg.vision.patch_dim)).astype(np.float32)
    graph, state = nnx.split(visual)
    run = jax.jit(lambda s, p, a: nnx.merge(graph, s).encode(p, a))
    aux = vision.vision_inputs(grid, cfg.vision)
    base, _ = run(state, pixels, aux)
    changed = pixels.copy()
    changed[16:32] += 1.0                     # first frame of the video
    out, _ = run(state, changed, aux)
    diff = np.abs(np.asarray(out) - np.asarray(base)).max(-1)
    assert np.all(diff[:4] == 0) and np.all(diff[8:] == 0) and np.all(diff[4:8] > 1e-3)


def test_interpolation_taps_against_a_float64_reference():
    """Bilinear align_corners resampling of the side×side table, written directly in float64."""
    cfg = _tiny()
    side, m = 8, cfg.vision.spatial_merge_size
    rng = np.random.default_rng(3)
    table = rng.standard_normal((side * side, 5))
    for h, w in [(2, 2), (6, 10), (16, 4), (8, 8)]:
        aux = vision.vision_inputs(np.array([[1, h, w]]), cfg.vision)
        got = (table[aux.pos_indices] * aux.pos_weights[..., None].astype(np.float64)).sum(1)
        grid = table.reshape(side, side, 5)
        want = np.zeros((h, w, 5))
        for r in range(h):
            y = r * (side - 1) / max(h - 1, 1)
            y0 = min(int(np.floor(y)), side - 1)
            y1, fy = min(y0 + 1, side - 1), y - np.floor(y)
            for c in range(w):
                x = c * (side - 1) / max(w - 1, 1)
                x0 = min(int(np.floor(x)), side - 1)
                x1, fx = min(x0 + 1, side - 1), x - np.floor(x)
                want[r, c] = ((1 - fy) * (1 - fx) * grid[y0, x0] + (1 - fy) * fx * grid[y0, x1]
                              + fy * (1 - fx) * grid[y1, x0] + fy * fx * grid[y1, x1])
        # raster → merge-block order
        want = want.reshape(h // m, m, w // m, m, 5).transpose(0, 2, 1, 3, 4).reshape(-1, 5)
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_bad_inputs_are_rejected_with_the_field_named():
    cfg = _tiny()
    visual = _abstract_visual(cfg)  # the checks run before any compute
    pixels = np.zeros((16, cfg.vision.patch_dim), np.float32)
    with pytest.raises(ValueError, match="pixel_values must have shape \\[24"):
        visual(pixels, np.array([[1, 4, 6]]))
    with pytest.raises(ValueError, match=r"grid_thw\[0\].*spatial_merge_size"):
        visual(pixels, np.array([[1, 3, 4]]))
    with pytest.raises(ValueError, match="grid_thw must have shape"):
        visual(pixels, np.array([1, 4, 4]))
    with pytest.raises(ValueError, match="pixel_values must have shape"):
        visual(np.zeros((16, 7), np.float32), np.array([[1, 4, 4]]))


def test_parameters_carry_logical_axes():
    from genevolve_jax.sharding import logical
    visual = _abstract_visual(_tiny())
    params = nnx.state(visual, nnx.Param)
    leaves = jax_leaves(params)
    assert leaves
    for path, var in leaves:
        axes = logical.logical_axes_of(var)
        assert axes is not None and len(axes) == var.get_value().ndim, path


def jax_leaves(state):
    return jax.tree_util.tree_leaves_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
