"""Training: the two loops (sft/, rl/) over one runtime (runtime/) and one set of losses (losses/)."""
