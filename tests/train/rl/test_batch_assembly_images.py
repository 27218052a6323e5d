"""Image observations in RL batches: multi-turn rollouts of a random tiny Qwen3-VL through the
JaxEngine with images of two sizes in their observations → assemble_evolve_batch → the trainer's
forward gives the sampler's log-probs; MRoPE positions equal transformers' rope index; text-only
batches keep their layout; several samples' images packed into one row give the same numbers as
a row each; accumulation splits the per-row image blocks exactly; unreadable images mask their
sample."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from PIL import Image

from genevolve_jax.agent.trajectory import Segment, Trajectory
from genevolve_jax.models.hf_io import model_from_state_dict, random_state_dict
from genevolve_jax.models.qwen3_vl import config as qwen_config
from genevolve_jax.models.qwen3_vl.model import forward_hidden, prepare_inputs
from genevolve_jax.ops.fused_logprob import token_logprobs
from genevolve_jax.processing.image import ImageProcessorConfig, preprocess_images
from genevolve_jax.processing.tokenizer import default_tokenizer, special_token_ids
from genevolve_jax.rollout.config import default_engine_config
from genevolve_jax.rollout.engine import GenerationRequest, SamplingParams
from genevolve_jax.rollout.jax_engine import JaxEngine
from genevolve_jax.sharding.mesh import make_mesh
from genevolve_jax.train.losses.config import default_loss_config
from genevolve_jax.train.losses.step_losses import EvolveLoss, policy_logprobs, teacher_logprobs
from genevolve_jax.train.rl.batch_assembly import assemble_evolve_batch, place_samples, row_tokens
from genevolve_jax.train.rl.config import default_rl_config, validate_rl
from genevolve_jax.train.rl.logprob_forward import LogprobForward
from genevolve_jax.train.rl.loss_weights import WEIGHT_FIELDS
from genevolve_jax.train.rl.masking import MaskRules, mask_samples
from genevolve_jax.train.rl.records import RolloutSample
from genevolve_jax.train.rl.sample_images import ImageBatchSpec
from genevolve_jax.train.runtime import step_config
from genevolve_jax.train.runtime.batch_layout import ROW_IMAGE_FIELDS
from genevolve_jax.train.runtime.state import create_train_state
from genevolve_jax.train.runtime.step import TrainStep
from tests.fixtures.hf_qwen3_vl import hf_config

PROCESSOR = ImageProcessorConfig(min_pixels=32 * 32, max_pixels=96 * 96)
FAST = {"xla_backend_optimization_level": 0}
TEMPERATURE = 0.7
TEXT_KEYS = {"input_ids", "targets", "loss_mask", "segment_ids", "position_ids", "old_logprobs", "sampler_logprobs",
             "teacher_input_ids", "teacher_targets", "teacher_segment_ids", "teacher_position_ids",
             "teacher_index", "advantages", "row_weight", *WEIGHT_FIELDS}


def tiny_config(tok):
    sp = special_token_ids(tok)
    cfg = qwen_config.tiny(vocab_size=len(tok))
    return cfg.replace(text=dataclasses.replace(cfg.text, num_hidden_layers=2),
                       vision=dataclasses.replace(cfg.vision, depth=2, deepstack_visual_indexes=(0, 1)),
                       image_token_id=sp["<|image_pad|>"], video_token_id=sp["<|video_pad|>"],
                       vision_start_token_id=sp["<|vision_start|>"], vision_end_token_id=sp["<|vision_end|>"])


def loss_cfg():
    c = default_loss_config()
    c.logprob.chunk_size = 512
    c.logprob.rl_temperature = TEMPERATURE
    return c


def write_image(path, rng, height, width):
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return str(path)


class World:
    """The model, the engine, images of two sizes and four sampled trajectories (prompt → turn →
    observation with 0, 1 or 2 images → turn), each with a teacher prompt (a guide before it)."""

    def __init__(self, tmp):
        self.tok = tok = default_tokenizer()
        self.cfg = cfg = tiny_config(tok)
        self.model = model_from_state_dict(cfg, random_state_dict(cfg, seed=3))
        ecfg = default_engine_config()
        ecfg.max_slots, ecfg.max_seq_len, ecfg.steps_per_sync, ecfg.min_prefill_bucket = 4, 128, 5, 64
        self.engine = JaxEngine(self.model, tok, ecfg, image_processor=PROCESSOR)
        self.spec = ImageBatchSpec.for_model(cfg, PROCESSOR, patch_multiple=32)
        rng = np.random.default_rng(0)
        self.rng = rng
        self.wide = write_image(tmp / "wide.png", rng, 70, 90)    # grid (1, 4, 6): 6 placeholders
        self.tall = write_image(tmp / "tall.png", rng, 100, 45)   # grid (1, 6, 2): 3 placeholders
        self.trajs = self._rollouts([[self.wide], [self.wide, self.tall], [self.wide], []])
        self.guides = [self.text(int(n)) for n in (5, 9, 3, 7)]

    def text(self, n):
        return self.rng.integers(len(special_token_ids(self.tok)), len(self.tok), n).tolist()

    def observation(self, images):
        body = "result" + "".join(f"\nIMG_{i:03d}: <|vision_start|><|image_pad|><|vision_end|>"
                                  for i in range(len(images)))
        ids = self.tok.encode(f"<|im_end|>\n<|im_start|>user\n{body}<|im_end|>\n<|im_start|>assistant\n",
                              add_special_tokens=False)
        counts = iter([self.engine.num_image_tokens(p) for p in images])
        return [t for i in ids for t in ([i] * next(counts) if i == self.cfg.image_token_id else [i])]

    def _rollouts(self, observation_images):
        trajs = [Trajectory(f"t{i}", "request", [Segment("prompt", self.text(6 + 2 * i))])
                 for i in range(len(observation_images))]
        for turn in range(2):
            if turn == 1:
                for t, imgs in zip(trajs, observation_images):
                    t.segments.append(Segment("observation", self.observation(imgs), images=list(imgs)))
            reqs = [GenerationRequest(t.token_ids(), SamplingParams(max_new_tokens=5, temperature=TEMPERATURE,
                                                                    top_p=1.0, seed=100 * turn + i),
                                      images=t.context_images()) for i, t in enumerate(trajs)]
            for t, res in zip(trajs, self.engine.generate(reqs)):
                assert res.finish_reason == "length", res.error
                t.segments.append(Segment("policy", list(res.token_ids), list(res.logprobs)))
        special = {self.cfg.image_token_id, self.cfg.video_token_id, self.cfg.vision_start_token_id}
        assert not any(tk in special for t in trajs for s in t.segments if s.kind == "policy" for tk in s.token_ids)
        return trajs

    def samples(self, images=True, bundles=True):
        out = []
        for i, t in enumerate(self.trajs):
            # As AgentRolloutPhase.collect builds them.
            teacher = self.guides[i] + t.token_ids()[:t.prompt_length] if bundles else None
            out.append(RolloutSample(t.traj_id, i // 2, t.token_ids(), t.loss_mask(), t.logprobs(), 0.5, True,
                                     prompt_length=t.prompt_length, images=t.context_images() if images else [],
                                     teacher_prompt=teacher))
        return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = World(tmp_path_factory.mktemp("images"))
    yield w
    w.engine.close()


ADV = [0.7, -0.4, -0.9, 0.6]


def row_len(samples):
    """A budget that holds the longest sample (student or teacher row), rounded up to 16: here
    no two samples share a row."""
    return 16 * -(-max(row_tokens(s) for s in samples if s.valid) // 16)


def placed(samples, batch):
    """{sample index: (row, student offset, teacher offset)}: where the batch packed each sample."""
    out = {}
    for r, row in enumerate(place_samples(samples, batch["targets"].shape[1])):
        off = t_off = 0
        for i in row:
            out[i] = (r, off, t_off)
            off, t_off = off + len(samples[i].token_ids), t_off + len(samples[i].teacher_ids()[0])
    return out


def assemble(samples, adv=ADV, **kw):
    return assemble_evolve_batch(samples, adv, **{"seq_len": row_len(samples), **kw})


def test_trainer_logprobs_equal_the_samplers_and_teacher_rows_see_the_images(world):
    samples = world.samples()
    batch = assemble(samples, image_spec=world.spec)
    assert set(batch) == TEXT_KEYS | set(ROW_IMAGE_FIELDS)
    where = placed(samples, batch)
    assert sorted(r for r, _, _ in where.values()) == [0, 1, 2, 3]   # a row each
    assert batch["row_pixel_values"].shape[:2] == (4, 64)     # 24 + 12 patches → a multiple of 32
    graphdef, state = nnx.split(world.model)
    cfg = loss_cfg()
    forward = jax.jit(lambda st, b: policy_logprobs(nnx.merge(graphdef, st), b, cfg), compiler_options=FAST)
    lp = np.asarray(forward(state, batch))
    m = batch["loss_mask"] > 0
    assert m.sum() == 4 * 10
    delta = np.abs(lp[m] - batch["old_logprobs"][m])
    print(f"max |logprob sampler - trainer| over {m.sum()} policy tokens: {delta.max():.2e}")
    assert delta.max() <= 1e-4
    assert np.ptp(batch["old_logprobs"][m]) > 0.1
    # The same forward with the image blocks emptied (placeholders read as text) disagrees on the
    # image rows, so the agreement above is the images' doing.
    blind = dict(batch, row_vision_segment_ids=np.zeros_like(batch["row_vision_segment_ids"]))
    blind_lp = np.asarray(forward(state, blind))
    image_rows = [where[i][0] for i in range(3)]
    text_row = where[3][0]
    assert np.abs(blind_lp[image_rows][m[image_rows]] - batch["old_logprobs"][image_rows][m[image_rows]]).max() > 1e-2
    np.testing.assert_allclose(blind_lp[text_row][m[text_row]], lp[text_row][m[text_row]], atol=1e-5)

    # Teacher rows: the guided sequences with the same images, through the model's own image path
    # (flat pixels, static grids, its own rope index over padded rows) as the oracle.
    teacher = np.asarray(jax.jit(lambda st, b: teacher_logprobs(nnx.merge(graphdef, st), b, cfg),
                                 compiler_options=FAST)(state, batch))
    rows = [s.teacher_ids()[0] for s in samples]
    width = max(map(len, rows)) + 1
    ids = np.zeros((len(rows), width), np.int32)
    mask = np.zeros_like(ids)
    for r, row in enumerate(rows):
        ids[r, :len(row)], mask[r, :len(row)] = row, 1
    images = [p for traj in world.trajs for p in traj.context_images()]
    pix, grid = preprocess_images([Image.open(p) for p in images], PROCESSOR)
    oracle = prepare_inputs(world.cfg, ids, mask, pixel_values=pix, image_grid_thw=grid)
    hidden = jax.jit(forward_hidden, compiler_options=FAST)(graphdef, state, oracle)
    targets = np.concatenate([ids[:, 1:], np.zeros((len(rows), 1), np.int32)], axis=1)
    want = np.asarray(token_logprobs(hidden, world.model.lm_head_kernel(), jnp.asarray(targets), chunk_size=512,
                                     temperature=TEMPERATURE))
    for i, s in enumerate(samples):
        r = where[i][0]
        shift = len(rows[i]) - len(s.token_ids)
        pos = np.nonzero(m[r])[0]
        np.testing.assert_allclose(teacher[r, pos], want[i, pos + shift], atol=1e-4, rtol=0)

    # All four samples packed into one row: one image block with their 4 images in order, MRoPE
    # positions per segment. The student and teacher log-probs are those of a row each.
    one = assemble(samples, seq_len=256, image_spec=world.spec)
    assert one["targets"].shape == (1, 256) and set(one["segment_ids"][0].tolist()) == {0, 1, 2, 3, 4}
    assert (one["row_vision_segment_ids"][0] > 0).sum() == 24 * 3 + 12
    lp_one = np.asarray(forward(state, one))
    t_one = np.asarray(jax.jit(lambda st, b: teacher_logprobs(nnx.merge(graphdef, st), b, cfg),
                               compiler_options=FAST)(state, one))
    m_one = one["loss_mask"][0] > 0
    assert np.abs(lp_one[0][m_one] - one["old_logprobs"][0][m_one]).max() <= 1e-4
    for i in range(4):
        r, off, _ = where[i]
        n = len(samples[i].token_ids)
        _, off_one, _ = placed(samples, one)[i]
        sl_one, sl = slice(off_one, off_one + n), slice(off, off + n)
        on = m[r, sl]
        np.testing.assert_allclose(lp_one[0, sl_one][on], lp[r, sl][on], atol=1e-4, rtol=0)
        np.testing.assert_allclose(t_one[0, sl_one][on], teacher[r, sl][on], atol=1e-4, rtol=0)


def test_position_ids_equal_transformers_rope_index(world):
    import transformers

    hf = transformers.Qwen3VLModel(hf_config(world.cfg))
    samples = world.samples()
    batch = assemble(samples, image_spec=world.spec)
    where = placed(samples, batch)
    for i, (s, traj) in enumerate(zip(samples, world.trajs)):
        r = where[i][0]
        images = traj.context_images()
        grid = (torch.as_tensor(preprocess_images([Image.open(p) for p in images], PROCESSOR)[1])
                if images else None)
        rows = ((s.token_ids, batch["position_ids"][r]), (s.teacher_ids()[0], batch["teacher_position_ids"][r]))
        for ids, got in rows:
            ids_t = torch.as_tensor([ids])
            types = (ids_t == world.cfg.image_token_id).long()
            want, _ = hf.get_rope_index(ids_t, types, grid, None, torch.ones_like(ids_t))
            np.testing.assert_array_equal(got[:, :len(ids)], want[:, 0].numpy())
            assert (got[:, len(ids):] == 0).all()
        if images:  # the teacher row's guide shifts every position after it, images included
            assert (batch["teacher_position_ids"][r].max() - batch["position_ids"][r].max()
                    == len(world.guides[i]))
            assert batch["position_ids"][r].max() < len(s.token_ids) - 1   # images take fewer positions than tokens


def test_text_only_batches_keep_exactly_the_old_layout(world):
    plain = assemble(world.samples(images=False)[3:], ADV[3:], num_rows=2)
    with_spec = assemble(world.samples(images=False)[3:], ADV[3:], num_rows=2, image_spec=world.spec)
    assert set(plain) == set(with_spec) == TEXT_KEYS
    for k in TEXT_KEYS:
        np.testing.assert_array_equal(plain[k], with_spec[k], err_msg=k)
    n = len(world.trajs[3].token_ids())
    np.testing.assert_array_equal(plain["position_ids"][0, :, :n], np.broadcast_to(np.arange(n), (3, n)))
    # Image samples that are all masked before assembly leave a text batch too.
    samples = [s.masked("judge_failed") for s in world.samples()]
    assert set(assemble_evolve_batch(samples, ADV, seq_len=64, image_spec=world.spec)) == TEXT_KEYS
    # Images need the spec; a bad patch multiple is named.
    with pytest.raises(ValueError, match="image_spec"):
        assemble(world.samples())
    with pytest.raises(ValueError, match="rl.patch_multiple"):
        ImageBatchSpec.for_model(world.cfg, PROCESSOR, patch_multiple=0)
    rl = default_rl_config()
    rl.patch_multiple = -8
    with pytest.raises(ValueError, match="rl.patch_multiple must be an int >= 1, got -8"):
        validate_rl(rl)


def _train_state(world, mesh):
    c = step_config.default_config()
    c.optimizer.learning_rate, c.optimizer.eps = 1e-2, 1e-3
    c.schedule.warmup_ratio = 0.0
    return create_train_state(world.model, step_config.validate(c), mesh, "dp", total_steps=10)


def _host(tree):
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def test_grad_accumulation_splits_image_rows_exactly_and_steps_reuse_compiles(world, tmp_path):
    cfg = loss_cfg()
    mesh = make_mesh({"data": 2}, jax.devices()[:2])
    batch = assemble(world.samples(), image_spec=world.spec, row_multiple=4, loss_cfg=cfg)
    setup, params, opt = _train_state(world, mesh)
    batch["ref_logprobs"] = np.asarray(LogprobForward(setup, cfg, jnp.float32)(params, batch))
    m = batch["loss_mask"] > 0
    np.testing.assert_allclose(batch["ref_logprobs"][m], batch["old_logprobs"][m], atol=1e-4)
    results = {}
    for accum in (1, 2):
        setup, params, opt = _train_state(world, mesh)
        before = _host(params["train"])   # the step donates params
        step = TrainStep(setup, EvolveLoss(cfg), grad_accum_steps=accum, compiler_options=FAST)
        new, _, mets = step(params, opt, batch, jax.random.key(0))
        results[accum] = (_host(new["train"]), {k: float(v) for k, v in mets.items()}, step)
    (p1, m1, step1), (p2, m2, _) = results[1], results[2]
    # Step 1: π = π_old on every policy token, and every bundled sample has SDL tokens.
    assert m1["grpo/approx_kl_old"] < 1e-8 and abs(m1["grpo/ratio_mean"] - 1) < 1e-5
    assert m1["sdl/samples"] == 4 and m1["grpo/seqs"] == 4
    for k in ("loss", "grad_norm", "grpo/loss", "sdl/loss", "grpo/ratio_mean", "sdl/tokens", "grpo/seqs"):
        np.testing.assert_allclose(m2[k], m1[k], rtol=2e-5, atol=1e-6, err_msg=k)
    vision_moved = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(p1["visual"]),
                                                                   jax.tree.leaves(before["visual"])))
    assert vision_moved > 1e-3, "the vision tower must get gradients for the comparison to mean anything"
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(p1)[0], jax.tree.leaves(p2)):
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-5, err_msg=jax.tree_util.keystr(path))
    # Other images (a 90×70 image: grid (1, 6, 4), as many placeholders) in the same patch bucket:
    # the same compiled step (grids are not part of the compile key).
    upright = write_image(tmp_path / "upright.png", np.random.default_rng(5), 90, 70)
    other = world.samples()
    other[0], other[2] = (dataclasses.replace(other[i], images=[upright]) for i in (0, 2))
    again = assemble(other, image_spec=world.spec, row_multiple=4, loss_cfg=cfg)
    again["ref_logprobs"] = batch["ref_logprobs"]
    assert {k: v.shape for k, v in again.items()} == {k: v.shape for k, v in batch.items()}
    assert all(s.valid for s in other)
    assert not np.array_equal(again["row_vision_rope_positions"], batch["row_vision_rope_positions"])
    setup, params, opt = _train_state(world, mesh)
    step1(params, opt, again, jax.random.key(1))
    assert step1.compiled_layouts == 1


def test_unreadable_or_mismatched_images_are_masked_before_assembly(world, tmp_path):
    samples = world.samples()
    samples[1] = dataclasses.replace(samples[1], images=[world.wide, str(tmp_path / "gone.png")])
    samples[2] = dataclasses.replace(samples[2], images=[world.tall])   # 3 placeholders' worth behind 6
    rules = MaskRules(max_tokens_per_row=4096, image_spec=world.spec)
    masked, images = mask_samples(samples, rules)
    assert masked.counts == {"image_unreadable": 1, "image_token_mismatch": 1}
    out = masked.samples
    assert out[1].mask_reason.startswith("image_unreadable") and "gone.png" in out[1].mask_reason
    assert out[2].mask_reason.startswith("image_token_mismatch")
    assert samples[1].valid and samples[1].reward == 0.5      # records are not changed in place
    assert sorted(images) == sorted([out[0].sample_id])        # decoded once, for the rows that train
    batch = assemble(out, image_spec=world.spec, images=images)
    where = placed(out, batch)
    assert sorted(where) == [0, 3] and batch["targets"].shape[0] == 2     # masked samples get no row
    seg = batch["row_vision_segment_ids"]
    assert (seg[where[0][0]] > 0).sum() == 24 and (seg[where[3][0]] == 0).all()
    # Assembly refuses a sample that cannot be trained on instead of training it silently.
    with pytest.raises(ValueError, match="sample t1 cannot be trained on .image_unreadable"):
        assemble(samples, image_spec=world.spec)
    # Placeholders without images behind them (pixels dropped) are masked, not trained as text.
    masked, _ = mask_samples(world.samples(images=False), rules)
    assert masked.counts == {"image_token_mismatch": 3} and [s.valid for s in masked.samples] == [0, 0, 0, 1]
