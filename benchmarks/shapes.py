"""Random-weight model shapes for step-3 benchmarks on a GPU: `random/opt-1.3b` and `random/opt-350m`.

The layers (widths, depth, heads) of facebook/opt-1.3b and facebook/opt-350m as their published configs
give them, with the project's 4096-token vocabulary and special ids instead of OPT's 50272 tokens (the
1.3B shape has ~0.1B fewer embedding parameters than the real model; nothing is downloaded).
"""
import tempfile

RANDOM_PREFIX = "random/"
OPT_SHAPES = {
    "opt-1.3b": {"hidden_size": 2048, "word_embed_proj_dim": 2048, "num_hidden_layers": 24,
                 "num_attention_heads": 32, "ffn_dim": 8192, "do_layer_norm_before": True},
    "opt-350m": {"hidden_size": 1024, "word_embed_proj_dim": 512, "num_hidden_layers": 24,
                 "num_attention_heads": 16, "ffn_dim": 4096, "do_layer_norm_before": False},
}


def opt_shape_config(name: str, tokenizer):
    """The transformers config of `random/<shape>` with the tokenizer's vocabulary and special ids."""
    from transformers import OPTConfig

    shape = name.removeprefix(RANDOM_PREFIX)
    if shape not in OPT_SHAPES:
        raise SystemExit(f"unknown model shape '{name}': use one of "
                         f"{', '.join(RANDOM_PREFIX + known for known in OPT_SHAPES)}")
    return OPTConfig(vocab_size=len(tokenizer), max_position_embeddings=2048, dropout=0.0, **OPT_SHAPES[shape],
                     bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id)


def materialise(model_name: str, tokenizer) -> str:
    """A name step 3 can load: `random/<shape>` becomes a saved random-weight directory (with the
    tokenizer) under the temporary folder; any other name is returned as it is."""
    if not model_name.startswith(RANDOM_PREFIX):
        return model_name
    from transformers import AutoModelForCausalLM

    directory = tempfile.mkdtemp(prefix=f"bench_{model_name.removeprefix(RANDOM_PREFIX)}_")
    AutoModelForCausalLM.from_config(opt_shape_config(model_name, tokenizer)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
