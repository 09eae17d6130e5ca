"""Step 2 alternative: DPO of the actor (run main.py from this folder, or import its functions)."""
