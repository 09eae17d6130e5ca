"""Step 1: supervised fine-tuning (run main.py from this folder, or import its functions)."""
