"""Every section at the paper's defaults (METHOD.md); the other configs are deltas on this one.

    from configs import base
    cfg = base.get_config()

Sections are the package's own config factories. Values that must be equal are defined once and
linked with an ml_collections FieldReference, so that setting either field (in a config file or as
``--config.a.b=value``) sets both:

- ``agent.sampling.temperature`` is ``loss.logprob.rl_temperature``: the importance ratio compares
  the sampler's log-probs with the trainer's at the same temperature;
- ``agent.program.min_references`` is ``reward.program.min_references``: the policy is told the
  reference range that the reward enforces.

(The KScore weights are defined once too: the eval job reads ``reward.kscore``.)

Batch sizes are not separate fields: SFT takes ``data.sft.rows_per_batch`` packed rows per
optimiser step; GRPO takes ``data.rl.prompts_per_step × rl.group_size`` rollouts per optimiser
step (the paper's 8 × 6 = 48), split into ``train.grad_accum_steps`` micro-batches.
"""
import ml_collections

from genevolve_jax.agent.config import default_agent_config
from genevolve_jax.data.config import get_config as data_config
from genevolve_jax.experience.config import get_config as experience_config
from genevolve_jax.render.config import get_config as render_config
from genevolve_jax.reward.config import get_config as reward_config
from genevolve_jax.rollout.config import default_engine_config
from genevolve_jax.sharding.config import default_config as sharding_config
from genevolve_jax.train.losses.config import default_loss_config
from genevolve_jax.train.rl.config import default_rl_config
from genevolve_jax.train.runtime.checkpoint import default_checkpoint_config
from genevolve_jax.train.runtime.model_setup import default_model_config
from genevolve_jax.train.runtime.observability import default_logging_config
from genevolve_jax.train.runtime.step_config import default_config as train_config
from genevolve_jax.train.sft.config import default_sft_run_config


def get_config() -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict()
    cfg.seed = 0
    cfg.workdir = "runs/genevolve"
    cfg.model = default_model_config()
    cfg.sharding = sharding_config()
    cfg.sft = train_config()                 # SFT optimiser: lr 1e-5 cosine, warmup 0.02 (paper)
    cfg.train = train_config()               # GRPO optimiser: lr 1e-6 cosine, no warmup (paper)
    cfg.train.optimizer.learning_rate = 1e-6
    cfg.train.schedule.warmup_ratio = 0.0
    cfg.sft_run = default_sft_run_config()
    cfg.loss = default_loss_config()
    cfg.rl = default_rl_config()
    cfg.agent = default_agent_config()
    cfg.engine = default_engine_config()
    cfg.reward = reward_config()
    cfg.render = render_config()
    cfg.data = data_config()
    cfg.experience = experience_config()
    cfg.checkpoint = default_checkpoint_config()
    cfg.logging = default_logging_config()
    # The synthetic set (data/synthetic.py): plans are the scripted teacher's tool orders.
    cfg.synthetic = ml_collections.ConfigDict({"enabled": False, "num_prompts": 16, "num_sft": 16,
                                               "plans": ["query_knowledge,search,image_search"]})

    # One definition each (module docstring).
    cfg.agent.sampling.temperature = cfg.loss.logprob.get_ref("rl_temperature")
    cfg.agent.program.min_references = cfg.reward.program.get_ref("min_references")
    return cfg
