"""`genevolve plan` with LoRA: the planned RL state trains only adapters (optimiser state of their
size), holds no KL reference copy (the reference is the base with adapters off) and reports the
bytes that saves; the planned engine holds the plain model. Abstract states only (nothing traced)."""
import jax
import pytest
from flax import nnx

from genevolve_jax.config_loader import load_config
from genevolve_jax.models.layers import LoRAParam
from genevolve_jax.models.qwen3_vl.config import TEXT_LORA_TARGETS
from genevolve_jax.plan import abstract, phases
from genevolve_jax.sharding.mesh import make_mesh


@pytest.fixture(scope="module")
def states():
    """{rank: (run config, abstract RL state)} for rank 0 (full tuning) and rank 8, the 2B preset's width
    on a 2-layer cut, fsdp over 8 simulated devices."""
    out = {}
    mesh = make_mesh({"fsdp": 8})
    for rank in (0, 8):
        cfg = load_config("tiny_cpu")
        cfg.model.preset, cfg.model.num_layers, cfg.model.vision_depth, cfg.model.hidden_size = "qwen3vl_2b", 2, 1, 0
        cfg.model.param_dtype = "bfloat16"
        cfg.model.lora.rank = rank
        cfg.model.lora.targets = list(TEXT_LORA_TARGETS)   # the 2B preset ties its head: no head adapter
        cfg.model.lora.head_rank = 0
        cfg.sharding.strategy = "fsdp"
        config = abstract.model_config(cfg, cfg.train)
        out[rank] = cfg, phases.rl_state(cfg, config, mesh)
    return out


def test_lora_plan_trains_adapters_and_shares_the_reference(states):
    full_cfg, full = states[0]
    lora_cfg, lora = states[8]
    assert lora_cfg.loss.grpo.kl_coef > 0 and not phases.lora_on(full) and phases.lora_on(lora)
    variables = jax.tree.leaves(lora.params["train"], is_leaf=lambda x: isinstance(x, nnx.Variable))
    assert variables and all(isinstance(v, LoRAParam) for v in variables)
    full_res, lora_res = phases.rl_resident(full_cfg, full), phases.rl_resident(lora_cfg, lora)
    assert "reference params" in full_res and "reference params" not in lora_res
    saved = phases.reference_bytes_saved(lora_cfg, lora)
    assert saved == abstract.bytes_per_device(full_res["reference params"]) > 0
    assert phases.reference_bytes_saved(full_cfg, full) == 0
    # Adapters of rank 8 on a 2048-wide decoder: optimiser state a few % of full tuning's, and the
    # base in bf16 (the adapters, float32, add little).
    ratio = abstract.bytes_per_device(lora.opt_state) / abstract.bytes_per_device(full.opt_state)
    assert 0 < ratio < 0.05, ratio
    base = abstract.bytes_per_device(lora.params["frozen"])
    assert abstract.bytes_per_device(lora.params["train"]) < 0.05 * base
    assert all(x.dtype == jax.numpy.bfloat16 for x in jax.tree.leaves(lora.params["frozen"]))
    print(f"per device: optimiser {abstract.bytes_per_device(full.opt_state)} -> "
          f"{abstract.bytes_per_device(lora.opt_state)} bytes, KL reference copy {saved} bytes saved")


def test_the_shipped_8b_lora_config_is_sized_as_benchmarks_says():
    """configs/qwen3vl_8b_lora_gpu.py: qwen3vl_8b_gpu with rank-64 adapters, a bf16 base, 10× the
    learning rates and 2 rows per device per micro-batch on 8 GPUs, the settings of BENCHMARKS.md's
    2.52 GiB row (an fp32 base would be 4.56)."""
    from tests.fixtures.config_reads import leaf_paths

    lora, full = load_config("qwen3vl_8b_lora_gpu"), load_config("qwen3vl_8b_gpu")

    def value(cfg, path):
        for part in path.split("."):
            cfg = cfg[part]
        return cfg
    changed = {p for p in leaf_paths(full) if value(lora, p) != value(full, p)}
    assert changed == {"workdir", "model.lora.rank", "model.lora.alpha", "model.param_dtype",
                       "train.optimizer.learning_rate", "sft.optimizer.learning_rate",
                       "train.grad_accum_steps", "sft.grad_accum_steps"}
    assert lora.model.lora.targets == full.model.lora.targets and lora.model.lora.dropout == 0
    rollouts = lora.data.rl.prompts_per_step * lora.rl.group_size
    assert rollouts // lora.train.grad_accum_steps == 2 * 8 and rollouts % lora.train.grad_accum_steps == 0
    assert lora.data.sft.rows_per_batch // lora.sft.grad_accum_steps == 2 * 8
    # The settings of BENCHMARKS.md's 2.52 GiB row (bench/lora_state_bytes.py: rank 64, bf16 base,
    # fsdp over 8; the abstract 8B state costs ~6 CPU-s, so it is not rebuilt here).
    assert (lora.model.lora.rank, lora.model.param_dtype, lora.sharding.strategy) == (64, "bfloat16", "fsdp")
    assert lora.model.lora.alpha == 128.0
