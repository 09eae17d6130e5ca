"""RLHF (step 3): the PPO engine, trainer and their controllers."""
