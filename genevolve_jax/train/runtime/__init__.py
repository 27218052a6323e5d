"""What runs around any train step, SFT's or RL's: the jitted sharded step and its state, the
driver's loop with checkpoints, preemption, non-finite steps and observability, the model and mesh
setup both loops share, and the compile log."""
