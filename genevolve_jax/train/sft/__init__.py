"""The SFT loop (`genevolve sft`): the cold start over packed teacher trajectories."""
