"""Argument groups shared by the step recipes, with DeepSpeed-Chat's names and defaults.

Each option is documented once here. Additions beyond DeepSpeed-Chat are marked [new].
"""
import argparse
import json
import os

from training.utils.errors import UserInputError
from training.utils.io import is_run_artifact
from training.utils.model.reward_model import is_reward_model_dir
from training.utils.optim import check_lr_scheduler_type

# What a step saves, as `saved_kind` names what a directory holds.
LANGUAGE_MODEL, REWARD_MODEL, RLHF_MODELS = "language model", "reward model", "step-3 actor/ and critic/"
RLHF_SUBDIRS = ("actor", "critic", "actor_ema")


def add_data_args(parser: argparse.ArgumentParser, *, sft_only: bool, max_seq_len: int | None = 512) -> None:
    """The data flags; `max_seq_len=None` leaves out --max_seq_len (step 3 limits prompt and answer apart)."""
    group = parser.add_argument_group("data")
    group.add_argument("--data_path", nargs="*", default=["Dahoas/rm-static"],
                       help="Datasets to blend: DeepSpeed-Chat hub names, synthetic/arithmetic[:k=v,...], "
                            "local/jsonfile, a .json/.jsonl/.parquet file, or a dataset directory.")
    group.add_argument("--data_split", type=str, default="2,4,4",
                       help="Shares of every dataset for phase 1 (SFT), 2 (reward/DPO), 3 (PPO).")
    if sft_only:
        group.add_argument("--sft_only_data_path", nargs="*", default=[],
                           help="Datasets used whole, and only, for SFT.")
    group.add_argument("--data_output_path", type=str, default="/tmp/data_files/",
                       help="Where split indices and the tokenised cache are stored (shared by all ranks).")
    group.add_argument("--data_seed", type=int, default=1234,
                       help="[new] Seed of the phase split, independent of --seed so phases never overlap.")
    if max_seq_len is not None:
        group.add_argument("--max_seq_len", type=int, default=max_seq_len,
                           help="Maximum tokens of prompt + reply; longer samples lose the start of the prompt.")


def add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model_name_or_path", type=str, required=True,
                       help="Local HF model directory, hub id (needs network), or tiny/opt | tiny/llama | "
                            "tiny/opt-20m | tiny/llama-20m (random-initialised configs shipped in the repo).")
    group.add_argument("--dropout", type=float, default=None,
                       help="Override every dropout probability of the model config (None keeps them).")
    add_tokenizer_args(group)


def add_tokenizer_args(group) -> None:
    """The end-of-turn token and remote-code flags, shared by every step's model group."""
    group.add_argument("--add_eot_token", action="store_true",
                       help="Add --eot_token as a special token and use it as the end-of-turn (EOS) token "
                            "(step 3: give it exactly as steps 1 and 2 did).")
    group.add_argument("--eot_token", type=str, default="<|endoftext|>", help="See --add_eot_token.")
    group.add_argument("--trust_remote_code", action="store_true",
                       help="[new] Allow model code from the model directory / hub (off by default).")


def add_training_args(parser: argparse.ArgumentParser, *, learning_rate: float, tensorboard_path: str,
                      weight_decay: float = 0.0, batch_size: int = 16) -> None:
    group = parser.add_argument_group("training")
    group.add_argument("--per_device_train_batch_size", type=int, default=batch_size)
    group.add_argument("--per_device_eval_batch_size", type=int, default=batch_size)
    group.add_argument("--learning_rate", type=float, default=learning_rate)
    group.add_argument("--weight_decay", type=float, default=weight_decay)
    group.add_argument("--num_train_epochs", type=int, default=1)
    group.add_argument("--gradient_accumulation_steps", type=int, default=1)
    group.add_argument("--lr_scheduler_type", type=str, default="cosine",
                       help="linear, cosine, cosine_with_restarts, polynomial, constant, constant_with_warmup.")
    group.add_argument("--num_warmup_steps", type=int, default=0)
    group.add_argument("--output_dir", type=str, default=None, help="Where the trained model is saved.")
    group.add_argument("--seed", type=int, default=1234, help="Training seed (init, dropout, data order).")
    group.add_argument("--local_rank", type=int, default=-1, help="Set by the launcher.")
    group.add_argument("--gradient_checkpointing", action="store_true")
    group.add_argument("--compute_fp32_loss", action="store_true",
                       help="Compute the loss in fp32 when training in fp16/bf16.")
    group.add_argument("--print_loss", action="store_true", help="Print the loss of every step.")
    group.add_argument("--enable_tensorboard", action="store_true")
    group.add_argument("--tensorboard_path", type=str, default=tensorboard_path)


def add_lora_args(parser: argparse.ArgumentParser, *, module_name: str = "decoder.layers.") -> None:
    group = parser.add_argument_group("LoRA")
    group.add_argument("--lora_dim", type=int, default=0, help="LoRA rank; 0 disables LoRA.")
    group.add_argument("--lora_module_name", type=str, default=module_name,
                       help="Convert every nn.Linear whose name contains this text (OPT: decoder.layers., "
                            "Llama: layers.).")
    group.add_argument("--only_optimize_lora", action="store_true", help="Freeze everything but LoRA.")
    group.add_argument("--lora_learning_rate", type=float, default=5e-4)


def add_deepspeed_args(parser: argparse.ArgumentParser) -> None:
    import deepspeed

    group = parser.add_argument_group("DeepSpeed")
    group.add_argument("--offload", action="store_true", help="ZeRO-Offload optimizer (and params at stage 3).")
    group.add_argument("--dtype", type=str, default=None, choices=["fp16", "bf16", "fp32"],
                       help="Training precision. Default: fp16 on CUDA (DeepSpeed-Chat's default), fp32 on CPU.")
    group.add_argument("--zero_stage", type=int, default=0, choices=[0, 1, 2, 3])
    deepspeed.add_config_arguments(parser)


def validate_common(args) -> None:
    """Flag combinations that can be rejected before any work starts."""
    if not args.output_dir:
        raise UserInputError("--output_dir is required: the directory the trained model is saved to")
    if getattr(args, "only_optimize_lora", False) and getattr(args, "lora_dim", 0) <= 0:
        raise UserInputError("--only_optimize_lora needs --lora_dim > 0 (otherwise nothing would train)")
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                 "num_train_epochs", "max_seq_len"):
        if getattr(args, name, 1) < 1:
            raise UserInputError(f"--{name} must be at least 1 (got {getattr(args, name)})")
    check_lr_scheduler_type(args.lr_scheduler_type)
    # Step 2's reward-model recipe is the one with --eval_iters; step 1 and DPO save a language model.
    check_output_dir(args.output_dir, REWARD_MODEL if hasattr(args, "eval_iters") else LANGUAGE_MODEL, {
        "--model_name_or_path": [args.model_name_or_path], "--data_path": args.data_path,
        "--sft_only_data_path": getattr(args, "sft_only_data_path", []), "--deepspeed_config": [args.deepspeed_config]})


def saved_kind(directory: str) -> str | None:
    """What an earlier run saved in `directory`: a language model, a reward model, step 3's models, or None."""
    if is_reward_model_dir(directory):
        return REWARD_MODEL
    if os.path.isfile(os.path.join(directory, "config.json")):
        return LANGUAGE_MODEL
    if any(os.path.isdir(os.path.join(directory, sub)) for sub in RLHF_SUBDIRS):
        return RLHF_MODELS
    return None


def check_output_dir(output_dir: str, saves: str, inputs: dict[str, list[str | None]]) -> None:
    """Refuse an --output_dir whose save would destroy something, before any work (so nothing is written).

    Saving replaces the whole directory (steps 1 and 2) or its actor/, critic/ and actor_ema/ (step 3)
    in one rename (training.utils.io), keeping only run artifacts: logs, checkpoints, TensorBoard events.
    So the directory must not hold this run's inputs, another step's output, or unrelated files.
    """
    out = os.path.realpath(output_dir)
    replaced = [os.path.join(out, sub) for sub in RLHF_SUBDIRS] if saves == RLHF_MODELS else [out]
    for flag, paths in inputs.items():
        for path in filter(None, paths):
            real = os.path.realpath(path)
            if os.path.exists(real) and any(os.path.commonpath([real, r]) == r for r in replaced):
                raise UserInputError(f"--output_dir '{output_dir}' would overwrite the input {flag} '{path}' when "
                                     "the result is saved: pass a different --output_dir")
    if not os.path.exists(out):
        return
    if not os.path.isdir(out):
        raise UserInputError(f"--output_dir '{output_dir}' is a file, not a directory: pass a directory path")
    found = saved_kind(out)
    if found not in (None, saves):
        raise UserInputError(f"--output_dir '{output_dir}' holds another run's {found}, which saving this "
                             f"{saves} would replace: pass a new directory")
    if found is None and saves != RLHF_MODELS:
        others = sorted(e for e in os.listdir(out) if not is_run_artifact(os.path.join(out, e)))
        if others:
            raise UserInputError(f"--output_dir '{output_dir}' holds files that are not a saved model "
                                 f"({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}), which saving "
                                 "would delete: pass a new or empty directory")


def resolve_dtype(dtype: str | None, device_type: str) -> str:
    return dtype or ("fp16" if device_type == "cuda" else "fp32")


def merge_user_ds_config(built: dict, deepspeed_config: str | None) -> dict:
    """`--deepspeed_config FILE` entries override the built config (nested dicts merge key by key)."""
    if not deepspeed_config:
        return built
    try:
        with open(deepspeed_config, encoding="utf-8") as f:
            user = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) else err
        raise UserInputError(f"--deepspeed_config '{deepspeed_config}' is not a readable JSON file ({reason}): "
                             "pass a JSON file of DeepSpeed config entries") from None
    if not isinstance(user, dict):
        raise UserInputError(f"--deepspeed_config '{deepspeed_config}' holds a JSON {type(user).__name__}: "
                             'write one object of DeepSpeed config entries, e.g. {"gradient_clipping": 1.0}')

    def merge(base: dict, override: dict) -> dict:
        out = dict(base)
        for key, value in override.items():
            out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        return out

    return merge(built, user)
