"""Shared code for every step: data, tokenizer, models, LoRA, DeepSpeed configs, distributed helpers."""
