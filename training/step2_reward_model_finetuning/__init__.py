"""Step 2: reward model training and evaluation (run main.py / rw_eval.py from this folder)."""
