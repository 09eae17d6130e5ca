"""Step 3: RLHF with PPO (run main.py from this folder, or import its functions)."""
