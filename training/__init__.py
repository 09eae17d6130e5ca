"""DeepSpeed-Chat-style RLHF training: step folders plus the shared `training.utils` package."""
