"""Data pipeline: source adapters -> deterministic phase split -> tokenised cache -> collators."""
