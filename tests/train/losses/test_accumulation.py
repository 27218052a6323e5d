"""Exact gradient accumulation of GRPO + SDL over packed rows (train/rl/loss_weights.py).

Random rollouts of unequal lengths, some masked, some with a teacher bundle, are packed by
``assemble_evolve_batch``. For every GRPO aggregation, with SDL and the KL term on:

- the loss and its gradient summed over micro-batches (rows i, i+m, … as the train step splits
  them) equal the one-batch loss and gradient at 1e-5;
- the packed loss and gradient equal those of the pre-existing mean-form losses (``evolve_loss``,
  checked against float64 references in test_grpo.py / test_sdl.py) on the unpacked layout, one
  sample per row, so packing and the host-computed normalisers change nothing;
- the real train step (tiny model, one CPU device) gives the same loss, metrics and update with
  grad_accum 4 as with 1.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from genevolve_jax.data import packing
from genevolve_jax.train.losses import evolve_loss
from genevolve_jax.train.losses.sdl import evolve_loss_weighted, segment_topk_mask, topk_token_mask
from genevolve_jax.train.rl.batch_assembly import assemble_evolve_batch, place_samples
from genevolve_jax.train.rl.loss_weights import weights_view
from genevolve_jax.train.rl.records import RolloutSample
from tests.train.losses.support import loss_config

VOCAB = 64
MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean")


def random_samples(rng, n=13, masked=3, bundles=0.6):
    """Rollouts of 6–40 tokens: prompt, policy turns and observations; ``masked`` invalid ones."""
    out = []
    invalid = set(rng.choice(n, masked, replace=False).tolist())
    for i in range(n):
        p = int(rng.integers(2, 8))
        body = int(rng.integers(4, 33))
        ids = rng.integers(1, VOCAB, p + body).tolist()
        mask = [0] * p + (rng.random(body) < 0.7).astype(int).tolist()
        lp = [float(-rng.gamma(1.0, 0.7)) if m else 0.0 for m in mask]
        guide = rng.integers(1, VOCAB, int(rng.integers(p, p + 6))).tolist() if rng.random() < bundles else None
        s = RolloutSample(f"s{i}", i // 4, ids, mask, lp, float(rng.random()), prompt_length=p, teacher_prompt=guide)
        out.append(s.masked("error: test") if i in invalid else s)
    return out


def params(seed):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {"emb": jax.random.normal(k1, (VOCAB,)), "out": jax.random.normal(k2, (VOCAB,))}


def student_lp(theta, input_ids, targets):
    """A differentiable per-token log-prob that depends only on (input token, target token)."""
    return -jax.nn.softplus(theta["out"][targets] + 0.5 * theta["emb"][input_ids])


def teacher_lp_of_targets(targets):
    return -jax.nn.softplus(0.3 * jnp.sin(targets.astype(jnp.float32)) + 0.2)


def packed_loss(theta, batch, cfg):
    lp = student_lp(theta, batch["input_ids"], batch["targets"])
    rows = teacher_lp_of_targets(batch["teacher_targets"])
    teacher = jnp.take_along_axis(rows, batch["teacher_index"], axis=1)
    ref = jax.lax.stop_gradient(lp) + 0.05 * jnp.cos(batch["targets"].astype(jnp.float32))
    return evolve_loss_weighted(lp, batch["old_logprobs"], batch["advantages"], batch["segment_ids"],
                                weights_view(batch), cfg, ref_logprobs=ref, teacher_logprobs=teacher)


def unpacked_loss(theta, samples, adv, length, cfg):
    """The mean-form losses on one sample per row (the layout before packing)."""
    trajs = [packing.Trajectory(np.asarray(s.token_ids), np.asarray(s.loss_mask),
                                token_fields={"lp": np.asarray(s.logprobs, np.float32)}) for s in samples]
    b = packing.unpacked_batch(trajs, length)
    lp = student_lp(theta, b["input_ids"], b["targets"])
    ref = jax.lax.stop_gradient(lp) + 0.05 * jnp.cos(b["targets"].astype(jnp.float32))
    return evolve_loss(lp, b["lp"], jnp.asarray(adv), b["loss_mask"], cfg, ref_logprobs=ref,
                       teacher_logprobs=teacher_lp_of_targets(b["targets"]),
                       has_bundle=np.array([s.has_bundle for s in samples], np.float32),
                       sample_valid=np.array([s.valid for s in samples], np.float32))


def micro(batch, i, m):
    return {k: v[i::m] for k, v in batch.items()}


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("seed", [0, 1])
def test_micro_batches_and_packing_give_the_one_batch_loss(mode, seed):
    rng = np.random.default_rng(seed)
    cfg = loss_config(grpo={"aggregation": mode, "kl_coef": 0.05}, sdl={"coef": 2.0, "topk_frac": 0.3})
    samples = random_samples(rng)
    adv = rng.normal(size=len(samples)).astype(np.float32)
    batch = assemble_evolve_batch(samples, adv, seq_len=48, row_multiple=4, loss_cfg=cfg)
    rows = batch["row_weight"].shape[0]
    assert rows % 4 == 0 and rows < len(samples)              # packed: fewer rows than samples
    batch["old_logprobs"] = batch["sampler_logprobs"] + 0.1 * np.sin(np.arange(48))[None].astype(np.float32)
    theta = params(seed)
    # Not jitted: eager evaluation of these small arrays is quicker than compiling each shape.
    grad_fn = jax.value_and_grad(lambda t, b: packed_loss(t, b, cfg), has_aux=True)
    (one, one_m), one_g = grad_fn(theta, batch)

    for m in (3, 4) if rows % 3 == 0 else (4,):
        if rows % m:
            continue
        parts = [grad_fn(theta, micro(batch, i, m)) for i in range(m)]
        # Micro-batches differ in valid rollouts and tokens: the host weights make that irrelevant.
        counts = [float(p[0][1]["grpo/tokens"]) for p in parts]
        assert len(set(counts)) > 1, counts
        total = sum(float(p[0][0]) for p in parts)
        assert abs(total - float(one)) <= 1e-5 * max(1.0, abs(float(one))), (m, total, float(one))
        for name in one_g:
            acc = sum(np.asarray(p[1][name]) for p in parts)
            assert rel(acc, one_g[name]) <= 1e-5, (m, name)
        for name in ("grpo/tokens", "grpo/seqs", "sdl/tokens", "sdl/samples", "grpo/clip_frac", "sdl/divergence"):
            np.testing.assert_allclose(sum(float(p[0][1][name]) for p in parts), float(one_m[name]),
                                       rtol=1e-5, atol=1e-6, err_msg=name)

    # Against the unpacked mean-form losses: same normalisers, same numbers.
    ref_fn = jax.value_and_grad(lambda t: unpacked_loss(t, samples_with_old(samples, batch), adv, 48, cfg),
                                has_aux=True)
    (ref, ref_m), ref_g = ref_fn(theta)
    assert abs(float(one) - float(ref)) <= 1e-5 * max(1.0, abs(float(ref))), (float(one), float(ref))
    for name in one_g:
        assert rel(one_g[name], ref_g[name]) <= 1e-5, name
    for name in ("grpo/tokens", "grpo/seqs", "grpo/loss", "sdl/tokens", "sdl/samples", "sdl/loss", "grpo/kl",
                 "grpo/clip_frac", "sdl/rho", "sdl/gap"):
        np.testing.assert_allclose(float(one_m[name]), float(ref_m[name]), rtol=2e-5, atol=1e-6, err_msg=name)


def samples_with_old(samples, batch):
    """The samples with π_old as the packed batch carries it, so both layouts see the same π_old."""
    import dataclasses
    placement = place_samples(samples, batch["targets"].shape[1])
    old = batch["old_logprobs"]
    out = list(samples)
    for r, row in enumerate(placement):
        offset = 0
        for i in row:
            n = len(samples[i].token_ids)
            # Token fields sit at targets: packed position offset + t holds token t + 1's value.
            lp = [0.0] + old[r, offset:offset + n - 1].tolist()
            out[i] = dataclasses.replace(samples[i], logprobs=lp)
            offset += n
    return out


def test_segment_topk_matches_per_row_topk():
    """Top-k per segment of a packed row equals top-k per row of the unpacked layout."""
    rng = np.random.default_rng(5)
    lengths = [9, 14, 5, 20]
    t = sum(lengths) + 3
    seg = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)] + [np.zeros(3, int)])[None]
    mask = (rng.random((1, t)) < 0.7) & (seg > 0)
    lp_s, lp_e = rng.normal(size=(2, 1, t)).astype(np.float32)
    frac = 0.35
    ks = []
    for i, n in enumerate(lengths):
        on = seg[0] == i + 1
        ks.append(int(np.ceil(frac * mask[0, on].sum() - 1e-9)) * (i != 2))
    k = np.zeros((1, t), np.int32)
    for i in range(len(lengths)):
        k[0, seg[0] == i + 1] = ks[i]
    # Jitted: eagerly, each op of each segment's length compiled alone (about a hundred programs).
    got = np.asarray(jax.jit(segment_topk_mask)(lp_s, lp_e, mask, seg, k))
    per_row = jax.jit(topk_token_mask, static_argnames="frac")
    for i, n in enumerate(lengths):
        on = seg[0] == i + 1
        want = np.asarray(per_row(lp_s[:, on], lp_e[:, on], mask[:, on], np.array([i != 2]), frac=frac))
        np.testing.assert_array_equal(got[:, on], want)
    assert got[0, seg[0] == 0].sum() == 0


@pytest.mark.parametrize("mode", ["seq-mean-token-mean"])
def test_train_step_with_four_micro_batches_equals_one_batch(mode):
    """The real train step (tiny model, EvolveLoss with SDL and KL, π_old from the batch): loss,
    gradient norm, every metric and the update with grad_accum 4 equal those with 1."""
    from genevolve_jax.sharding.mesh import make_mesh
    from genevolve_jax.train.losses.step_losses import EvolveLoss
    from genevolve_jax.train.runtime import step_config
    from genevolve_jax.train.runtime.state import create_train_state
    from genevolve_jax.train.runtime.step import TrainStep
    from tests.fixtures.toy_task import TOY_VOCAB, toy_model

    rng = np.random.default_rng(11)
    cfg = loss_config(grpo={"aggregation": mode, "kl_coef": 0.05}, sdl={"coef": 2.0, "topk_frac": 0.3},
                      logprob={"chunk_size": 32})
    samples = [dataclasses_replace_ids(s, rng, TOY_VOCAB) for s in random_samples(rng)]
    adv = rng.normal(size=len(samples)).astype(np.float32)
    batch = assemble_evolve_batch(samples, adv, seq_len=48, row_multiple=4, loss_cfg=cfg)
    batch["ref_logprobs"] = batch["sampler_logprobs"] - 0.05
    mesh = make_mesh({"fsdp": 1}, jax.devices()[:1])
    tc = step_config.default_config()
    tc.optimizer.learning_rate, tc.optimizer.eps, tc.schedule.warmup_ratio = 1e-2, 1e-3, 0.0
    model = toy_model()
    out = {}
    # One initial state for both steps (each step donates its own copy): the init compiles once.
    setup, params0, opt0 = create_train_state(model, step_config.validate(tc), mesh, "fsdp", total_steps=1000)
    for accum in (1, 4):
        params, opt = jax.tree.map(jnp.copy, (params0, opt0))
        step = TrainStep(setup, EvolveLoss(cfg), grad_accum_steps=accum,
                         compiler_options={"xla_backend_optimization_level": 0})
        new, _, mets = step(params, opt, batch, jax.random.key(0))
        out[accum] = (jax.tree.map(np.asarray, jax.device_get(new["train"])), {k: float(v) for k, v in mets.items()})
    (p1, m1), (p4, m4) = out[1], out[4]
    assert m1["sdl/tokens"] > 0 and m1["grpo/seqs"] == sum(s.valid for s in samples)
    for k in m1:
        np.testing.assert_allclose(m4[k], m1[k], rtol=1e-5, atol=1e-6, err_msg=k)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(p1)[0], jax.tree.leaves(p4)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5, err_msg=jax.tree_util.keystr(path))


def dataclasses_replace_ids(s, rng, vocab):
    import dataclasses
    return dataclasses.replace(s, token_ids=rng.integers(1, vocab, len(s.token_ids)).tolist(),
                               teacher_prompt=None if s.teacher_prompt is None
                               else rng.integers(1, vocab, len(s.teacher_prompt)).tolist())
