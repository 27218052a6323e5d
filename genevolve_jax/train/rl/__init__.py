"""The RL loop (`genevolve train`): GRPO + Visual Experience Distillation as a pipeline of stages
over immutable records (trainer.py reads top to bottom as the stages of pipeline.py):

    collect rollouts (rollout_phase.py) → mask (masking.py) → group advantages → experience
    → teacher rows → assemble (batch_assembly.py, loss_weights.py) → π_old / reference forwards
    (logprob_forward.py) → sharded update (train/runtime/step.py) → weight sync

config.py holds the ``rl`` section and the run's cross-section checks; outage.py decides what a step
full of service failures does.
"""
