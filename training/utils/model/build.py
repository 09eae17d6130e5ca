"""Build a causal LM from a tiny in-repo config, a local Hugging Face directory, or a hub id.

ZeRO-3: when the DeepSpeed config has stage 3, an `HfDeepSpeedConfig` is registered while transformers
builds the model (and resizes its embeddings), so parameters are partitioned as they are created (a 70B
model never materialises on one rank). transformers keeps that registration process-wide, so it is
removed right after: otherwise every later model of the process (say a ZeRO-0 reward model next to a
ZeRO-3 actor in step 3) would be partitioned too.
"""
import json
import math
import os

import torch

from training.utils.errors import UserInputError
from training.utils.model.attention import use_segment_attention
from training.utils.model.configs import TINY_PREFIX, load_tiny_config
from training.utils.model.dropout import install_fast_dropout
from training.utils.model.linear_grad import install_lean_weight_grad

DROPOUT_KEYS = ("dropout", "attention_dropout", "activation_dropout", "hidden_dropout", "attn_pdrop",
                "resid_pdrop", "embd_pdrop", "hidden_dropout_prob", "attention_probs_dropout_prob",
                "summary_first_dropout")
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
# Config keys that bound the sequence length (learned or fixed position tables); a config with none of them
# (ALiBi models such as Bloom) has no limit here.
POSITION_LIMIT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")
REWARD_META_FILE = "reward_model.json"  # (reward_model.META_FILE; that module imports this one)


def load_model_config(model_name_or_path: str, trust_remote_code: bool = False):
    """The transformers config for a tiny name, a local directory (config.json required) or a hub id."""
    from transformers import AutoConfig

    if model_name_or_path.startswith(TINY_PREFIX):
        return load_tiny_config(model_name_or_path)
    if os.path.isdir(model_name_or_path):
        if not os.path.isfile(os.path.join(model_name_or_path, "config.json")):
            raise UserInputError(f"model directory '{model_name_or_path}' has no config.json: point "
                                 "--model_name_or_path at a Hugging Face model directory (save_pretrained output)")
        if "auto_map" in _read_config_json(model_name_or_path) and not trust_remote_code:
            raise UserInputError(f"model directory '{model_name_or_path}' runs its own Python code (auto_map in "
                                 "config.json): pass --trust_remote_code if you trust that code, or use a model "
                                 "transformers supports")
        try:
            return AutoConfig.from_pretrained(model_name_or_path, local_files_only=True,
                                              trust_remote_code=trust_remote_code)
        except ValueError as err:
            raise UserInputError(f"model directory '{model_name_or_path}': transformers cannot build its config.json "
                                 f"(model_type '{_declared_model_type(model_name_or_path)}'): use an architecture "
                                 "this transformers version knows, or --trust_remote_code for a model that ships "
                                 "its own code") from err
    try:
        return AutoConfig.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise UserInputError(f"cannot load model '{model_name_or_path}': not a local directory, and the hub "
                             f"is not reachable or has no such model ({str(err).splitlines()[0]}); "
                             "pass a local model directory or tiny/opt | tiny/llama") from None


def position_limit(config) -> int | None:
    """The longest sequence (prompt + reply) the model's position embeddings allow, when its config says."""
    for key in POSITION_LIMIT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def check_fits_positions(config, length: int, what: str, model: str, fix: str) -> None:
    """Refuse `length` tokens beyond the model's positions: the embedding lookup would fail mid-run (IndexError)
    or, with rotary positions, the model would read positions it never saw. `fix` may name {limit}."""
    limit = position_limit(config)
    if limit is not None and length > limit:
        raise UserInputError(f"{what} is more than the {limit} positions of model '{model}' (its config's "
                             f"position limit): {fix.format(limit=limit)}")


def check_model_input(model_name_or_path: str, *, language_model: bool, length: int | None = None,
                      what: str = "", fix: str = "", trust_remote_code: bool = False):
    """Everything about an input model that can be refused before data or weights are loaded: its config,
    its files (check_model_files) and, given `length`, that sequences of that many tokens fit its positions.
    Returns the config."""
    config = load_model_config(model_name_or_path, trust_remote_code)
    check_model_files(model_name_or_path, language_model=language_model)
    if length is not None:
        check_fits_positions(config, length, what, model_name_or_path, fix)
    return config


def check_model_files(model_name_or_path: str, *, language_model: bool = False) -> None:
    """Refuse a local model directory whose files cannot be what the loaders expect, before any work:
    a reward model given where a language model is trained, no weights, or a weights file that is
    truncated or empty (safetensors would fail mid-run with a Rust error)."""
    if model_name_or_path.startswith(TINY_PREFIX) or not os.path.isdir(model_name_or_path):
        return
    if language_model and os.path.isfile(os.path.join(model_name_or_path, REWARD_META_FILE)):
        raise UserInputError(f"'{model_name_or_path}' is a reward model (step 2 output), not a language model: "
                             "pass the actor saved by step 1 (or another causal LM directory); the reward model "
                             "goes to step 3's --critic_model_name_or_path")
    names = sorted(os.listdir(model_name_or_path))
    weights = [n for n in names if n.endswith(".safetensors")]
    if not weights and not any(n in names for n in PICKLE_WEIGHTS):
        raise UserInputError(f"model directory '{model_name_or_path}' has config.json but no weights "
                             "(model.safetensors): it is incomplete; pass the --output_dir of a finished run, or "
                             "save the model again with model.save_pretrained(dir)")
    for name in weights:
        _check_safetensors_file(os.path.join(model_name_or_path, name))


def _check_safetensors_file(path: str) -> None:
    """Open the file's header (memory-mapped, no tensor is read): safetensors checks that the header is
    complete and that the tensors it lists cover the file exactly, which a truncated copy fails."""
    from safetensors import SafetensorError, safe_open

    size = os.path.getsize(path)
    try:
        with safe_open(path, framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError) as err:
        raise UserInputError(f"weights file '{path}' ({size} bytes) is damaged ({err}): it was probably cut off "
                             "while copying or saving; copy it again or re-save the model") from None


def _declared_model_type(directory: str) -> str:
    return _read_config_json(directory).get("model_type", "<missing>")


def _read_config_json(directory: str) -> dict:
    path = os.path.join(directory, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserInputError(f"'{path}' is not valid JSON ({err}): re-save the model with save_pretrained") from None
    if not isinstance(config, dict):
        raise UserInputError(f"'{path}' holds a JSON {type(config).__name__}, not a model config: re-save the "
                             "model with save_pretrained")
    return config


def check_model_class_supports(model_class, config) -> None:
    """Refuse early, naming the model_type, when an Auto class has no model for this config.

    Otherwise transformers fails deep inside construction with a message about config classes.
    """
    mapping = getattr(model_class, "_model_mapping", None)
    if mapping is None or type(config) in mapping:
        return
    if model_class.__name__ in (getattr(config, "auto_map", None) or {}):
        return  # remote code provides the class
    raise UserInputError(f"model_type '{config.model_type}' has no {model_class.__name__} in transformers: "
                         "pick a decoder model that transformers supports (OPT, Llama, Qwen2, GPT-2, Bloom, ...)")


def set_dropout(config, dropout: float | None) -> None:
    """`--dropout` overrides every dropout probability the architecture's config has."""
    if dropout is None:
        return
    for key in DROPOUT_KEYS:
        if hasattr(config, key):
            setattr(config, key, dropout)


def active_dropout(model) -> list[str]:
    """What would drop activations in train mode: the config's non-zero dropout probabilities (read by the
    architecture's functional dropout) and nn.Dropout modules with p > 0 (e.g. LoRA's). Empty: train mode
    computes what eval mode does."""
    config = getattr(model, "config", None)
    found = [f"{key}={getattr(config, key)}" for key in DROPOUT_KEYS
             if isinstance(getattr(config, key, None), (int, float)) and getattr(config, key) > 0]
    found += sorted({f"{type(m).__name__}(p={m.p})" for m in model.modules()
                    if isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0})
    return found


def create_hf_model(model_name_or_path: str, tokenizer, *, ds_config: dict | None = None,
                    dropout: float | None = None, trust_remote_code: bool = False,
                    model_class=None):
    """A causal LM in fp32 (DeepSpeed casts for fp16/bf16) with embeddings sized for the tokenizer.

    The tokenizer's EOS/pad ids are written into the model and generation configs, so a saved model
    generates with the right stop token without extra flags.
    """
    from transformers import AutoModelForCausalLM
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    model_class = model_class or AutoModelForCausalLM
    config = load_model_config(model_name_or_path, trust_remote_code)
    check_model_class_supports(model_class, config)
    set_dropout(config, dropout)
    unset_hf_deepspeed_config()
    zero3 = ds_config is not None and ds_config.get("zero_optimization", {}).get("stage") == 3
    zero3_registration = HfDeepSpeedConfig(ds_config) if zero3 else None
    try:
        return _build(model_class, model_name_or_path, config, tokenizer, trust_remote_code)
    finally:
        del zero3_registration
        unset_hf_deepspeed_config()


def _build(model_class, model_name_or_path: str, config, tokenizer, trust_remote_code: bool):
    if model_name_or_path.startswith(TINY_PREFIX):
        model = model_class.from_config(config, dtype=torch.float32)
    else:
        local = os.path.isdir(model_name_or_path)
        if local and _has_only_pickle_weights(model_name_or_path):
            raise UserInputError(f"model directory '{model_name_or_path}' holds only pickle weights "
                                 "(pytorch_model.bin): convert it to safetensors with "
                                 "model.save_pretrained(dir) (safe_serialization is the default)")
        # A causal LM is never built from a reward model directory (its backbone is, as a bare AutoModel body).
        check_model_files(model_name_or_path, language_model=model_class.__name__ != "AutoModel")
        model = model_class.from_pretrained(model_name_or_path, config=config, dtype=torch.float32,
                                            local_files_only=local, trust_remote_code=trust_remote_code)
    fit_to_tokenizer(model, tokenizer)
    use_segment_attention(model)
    install_fast_dropout()
    install_lean_weight_grad()
    return model


def fit_to_tokenizer(model, tokenizer) -> None:
    """The tokenizer's special ids in the model's configs, and embeddings sized for the tokenizer (a multiple of 8;
    rows for tokens it adds, such as a distinct pad), as every model of the project is built."""
    configure_special_tokens(model, tokenizer)
    model.resize_token_embeddings(int(8 * math.ceil(len(tokenizer) / 8.0)))


def _has_only_pickle_weights(directory: str) -> bool:
    names = set(os.listdir(directory))
    has_safetensors = any(n.endswith(".safetensors") or n == "model.safetensors.index.json" for n in names)
    return not has_safetensors and any(n in names for n in PICKLE_WEIGHTS)


def configure_special_tokens(model, tokenizer) -> None:
    for cfg in (model.config, getattr(model, "generation_config", None)):
        if cfg is None:
            continue
        cfg.eos_token_id = tokenizer.eos_token_id
        cfg.pad_token_id = tokenizer.pad_token_id
        if tokenizer.bos_token_id is not None:
            cfg.bos_token_id = tokenizer.bos_token_id


def unwrap_model(model):
    """The transformers model inside DeepSpeed engines / DDP (`.module`) and PEFT wrappers."""
    while True:
        inner = getattr(model, "module", None)
        if isinstance(inner, torch.nn.Module) and inner is not model:
            model = inner
            continue
        base = getattr(model, "get_base_model", None)
        if callable(base) and base() is not model:
            model = base()
            continue
        return model
