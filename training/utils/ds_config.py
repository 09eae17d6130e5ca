"""DeepSpeed config dicts for trained and frozen (eval-only) models.

Values are plain dicts passed to `deepspeed.initialize(config=...)`. Incompatible flag combinations
fail here with one actionable line instead of deep inside DeepSpeed.
"""
import json
import os

import torch
from deepspeed.accelerator import get_accelerator

from training.utils.errors import UserInputError

DTYPES = ("fp32", "fp16", "bf16")

# We print our own metrics; DeepSpeed's periodic step log would only duplicate them.
STEPS_PER_PRINT = 1_000_000_000

# ZeRO-3 tuning (numbers of elements). Parameters below the persistence threshold (biases,
# norms) stay whole on every rank: gathering them costs more latency than the memory it saves.
# Live parameters and prefetch bucket bound how much is gathered at once: ~30M elements keeps
# peak memory modest for 1B-class models while still overlapping fetch and compute.
STAGE3_PARAM_PERSISTENCE_THRESHOLD = 10_000
STAGE3_MAX_LIVE_PARAMETERS = 30_000_000
STAGE3_PREFETCH_BUCKET_SIZE = 30_000_000

# Dynamic fp16 loss scaling: start at 2**16 and try raising the scale after 100 overflow-free steps
# (DeepSpeed's default window is 1000; RLHF losses move fast, so we adapt sooner).
FP16_INITIAL_SCALE_POWER = 16
FP16_LOSS_SCALE_WINDOW = 100


def global_batch_size(micro_batch_size: int, gradient_accumulation_steps: int, world_size: int) -> int:
    """DeepSpeed's `train_batch_size`: samples per optimizer step summed over all ranks."""
    return micro_batch_size * gradient_accumulation_steps * world_size


def _device_name(device: str | None) -> str:
    return device if device is not None else get_accelerator().device_name()


def _precision_block(dtype: str, device: str) -> dict:
    """The fp16/bf16 entries; fp32 needs none."""
    if dtype not in DTYPES:
        raise UserInputError(f"--dtype {dtype} is not supported: use one of {', '.join(DTYPES)}")
    if dtype == "fp16" and device == "cpu":
        raise UserInputError("--dtype fp16 is not supported on CPU (DeepSpeed's CPU accelerator has no fp16): "
                             "use --dtype fp32 (fastest on CPU) or bf16")
    if dtype == "fp16":
        return {"fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": FP16_INITIAL_SCALE_POWER,
                         "loss_scale_window": FP16_LOSS_SCALE_WINDOW, "hysteresis": 2, "min_loss_scale": 1}}
    if dtype == "bf16":
        return {"bf16": {"enabled": True}}
    return {}


def _check_stage(stage: int) -> None:
    if stage not in (0, 1, 2, 3):
        raise UserInputError(f"--zero_stage {stage} is not a ZeRO stage: use 0, 1, 2 or 3")


def _world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def _mixed_precision_lora_entries(stage: int, device: str) -> dict:
    """ZeRO++ settings for --enable_mixed_precision_lora (DeepSpeed-Chat's meaning).

    The frozen base weights are stored quantized (`zero_quantized_nontrainable_weights`), and
    across several nodes a secondary copy of the partitioned weights is kept within each node
    (hpZ, `zero_hpz_partition_size` = devices per node) so all-gathers stay on the fast intra-node
    links. Quantization uses DeepSpeed's CUDA quantizer kernels and exists only for ZeRO-3.
    """
    if device != "cuda":
        raise UserInputError(f"--enable_mixed_precision_lora needs CUDA GPUs (DeepSpeed's quantizer has no "
                             f"{device} kernels): drop --enable_mixed_precision_lora")
    if stage != 3:
        raise UserInputError(f"--enable_mixed_precision_lora needs ZeRO stage 3 (got {stage}): "
                             "set --actor_zero_stage 3")
    entries = {"zero_quantized_nontrainable_weights": True}
    devices_per_node = get_accelerator().device_count()
    if _world_size() > devices_per_node:
        entries["zero_hpz_partition_size"] = devices_per_node
    return entries


def _zero_block(stage: int, offload: bool) -> dict:
    zero = {"stage": stage}
    if offload:
        zero["offload_optimizer"] = {"device": "cpu"}
    if stage == 3:
        if offload:
            zero["offload_param"] = {"device": "cpu"}
        zero.update({
            "stage3_param_persistence_threshold": STAGE3_PARAM_PERSISTENCE_THRESHOLD,
            "stage3_max_live_parameters": STAGE3_MAX_LIVE_PARAMETERS,
            "stage3_prefetch_bucket_size": STAGE3_PREFETCH_BUCKET_SIZE,
            "stage3_gather_16bit_weights_on_model_save": True,
        })
    return zero


def get_train_ds_config(*, offload: bool, dtype: str, stage: int, train_batch_size: int, micro_batch_size: int,
                        gradient_accumulation_steps: int, enable_hybrid_engine: bool = False,
                        inference_tp_size: int = 1, release_inference_cache: bool = False,
                        pin_parameters: bool = True, tp_gather_partition_size: int = 8, max_out_tokens: int = 512,
                        enable_tensorboard: bool = False, enable_mixed_precision_lora: bool = False,
                        tb_path: str = "", tb_name: str = "", gradient_clipping: float = 1.0,
                        device: str | None = None) -> dict:
    """Config for a model that is trained (actor, critic, SFT, reward model).

    `train_batch_size` is the global batch (see `global_batch_size`); DeepSpeed checks that it equals
    micro batch x accumulation steps x world size. `device` defaults to the current accelerator.
    """
    device = _device_name(device)
    _check_stage(stage)
    if offload and stage == 0:
        raise UserInputError("--offload needs ZeRO stage 1, 2 or 3 (ZeRO-Offload moves partitioned optimizer "
                             "state): set --zero_stage 1, 2 or 3, or drop --offload")
    if inference_tp_size > 1 and stage != 3:
        raise UserInputError(f"--inference_tp_size {inference_tp_size} needs ZeRO stage 3 for the actor "
                             f"(got {stage}): set --actor_zero_stage 3 or --inference_tp_size 1")
    if enable_tensorboard and not tb_path:
        raise UserInputError("--enable_tensorboard needs a directory: set --tensorboard_path")

    zero = _zero_block(stage, offload)
    if enable_mixed_precision_lora:
        zero.update(_mixed_precision_lora_entries(stage, device))
    config = {
        "train_batch_size": train_batch_size,
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps,
        "steps_per_print": STEPS_PER_PRINT,
        "zero_optimization": zero,
        **_precision_block(dtype, device),
        "gradient_clipping": gradient_clipping,
        "prescale_gradients": False,
        "wall_clock_breakdown": False,
        "hybrid_engine": {
            "enabled": enable_hybrid_engine,
            "max_out_tokens": max_out_tokens,
            "inference_tp_size": inference_tp_size,
            "release_inference_cache": release_inference_cache,
            "pin_parameters": pin_parameters,
            "tp_gather_partition_size": tp_gather_partition_size,
        },
    }
    if enable_tensorboard:
        config["tensorboard"] = {"enabled": True, "output_path": tb_path, "job_name": f"{tb_name}_tensorboard"}
    return config


def get_eval_ds_config(*, offload: bool, dtype: str, stage: int, micro_batch_size: int, train_batch_size: int,
                       device: str | None = None) -> dict:
    """Config for a frozen model (reference, reward) that only runs forward passes.

    Stages 1 and 2 partition optimizer state and gradients, which a frozen model does not have, so
    they are given to DeepSpeed as stage 0. Offload moves partitioned parameters, so it applies at
    stage 3 only; below that the model stays on the device (the caller may log this).
    """
    device = _device_name(device)
    _check_stage(stage)
    stage = 3 if stage == 3 else 0
    zero = {"stage": stage}
    if stage == 3:
        zero.update({
            "stage3_param_persistence_threshold": STAGE3_PARAM_PERSISTENCE_THRESHOLD,
            "stage3_gather_16bit_weights_on_model_save": True,
        })
        if offload:
            zero["offload_param"] = {"device": "cpu"}
    return {
        "train_batch_size": train_batch_size,
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "steps_per_print": STEPS_PER_PRINT,
        "zero_optimization": zero,
        **_precision_block(dtype, device),
        "prescale_gradients": False,
        "wall_clock_breakdown": False,
    }


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

    merged = merge(built, user)
    check_ds_config(merged, deepspeed_config)
    return merged


def check_ds_config(config: dict, source: str) -> None:
    """Refuse, in one line, a config DeepSpeed would reject later (or crash on with a Python error): the entries
    we know are type- and range-checked, then DeepSpeed's own validation (its pydantic models and sanity checks)
    runs on a copy, as deepspeed.initialize would."""
    problem = _entry_problem(config)
    if problem is None:
        problem = _deepspeed_validation_problem(config)
    if problem is not None:
        raise UserInputError(f"--deepspeed_config '{source}': {problem}; fix that entry (see "
                             "https://www.deepspeed.ai/docs/config-json/)")


# Top-level entries DeepSpeed reads as JSON objects, as integers with a minimum, as numbers with a minimum and
# as switches. DeepSpeed's own checks of these fail with Python errors ('int' object has no attribute 'keys').
OBJECT_ENTRIES = ("optimizer", "scheduler", "zero_optimization", "fp16", "bf16", "amp", "hybrid_engine", "tensorboard",
                  "wandb", "csv_monitor", "comet", "activation_checkpointing", "flops_profiler", "aio", "comms_logger",
                  "autotuning", "compression_training", "data_efficiency", "checkpoint", "elasticity", "nebula",
                  "curriculum_learning", "pipeline", "sparse_attention", "data_types", "compile", "timers")
INT_ENTRIES = {"train_batch_size": 1, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
               "steps_per_print": 1}
NUMBER_ENTRIES = {"gradient_clipping": 0.0}
SWITCH_ENTRIES = ("prescale_gradients", "wall_clock_breakdown", "zero_allow_untested_optimizer", "memory_breakdown",
                  "dump_state", "sparse_gradients")


# DeepSpeed's pydantic model of a config block -> the block's key (its errors name fields inside the block).
PYDANTIC_BLOCKS = {"DeepSpeedZeroConfig": "zero_optimization", "DeepSpeedBF16Config": "bf16",
                   "DeepSpeedFP16Config": "fp16", "HybridEngineConfig": "hybrid_engine",
                   "DeepSpeedActivationCheckpointingConfig": "activation_checkpointing",
                   "DeepSpeedFlopsProfilerConfig": "flops_profiler", "DeepSpeedCommsConfig": "comms_logger"}


def _entry_problem(config: dict) -> str | None:
    for key in OBJECT_ENTRIES:
        if key in config and not isinstance(config[key], dict):
            return f'"{key}" must be a JSON object, got {json.dumps(config[key])}'
    numbers = {**{key: (int, low) for key, low in INT_ENTRIES.items()},
               **{key: ((int, float), low) for key, low in NUMBER_ENTRIES.items()}}
    for key, (kind, low) in numbers.items():
        value = config.get(key)
        if key not in config:
            continue
        wanted = "an integer" if kind is int else "a number"
        if isinstance(value, bool) or not isinstance(value, kind):
            return f'"{key}" must be {wanted}, got {json.dumps(value)}'
        if value < low:
            return f'"{key}" must be at least {low}, got {value}'
    for key in SWITCH_ENTRIES:
        if key in config and not isinstance(config[key], bool):
            return f'"{key}" must be true or false, got {json.dumps(config[key])}'
    for key in ("optimizer", "scheduler"):
        block = config.get(key, {})
        if "type" in block and not isinstance(block["type"], str):
            return f'"{key}.type" must be a string, got {json.dumps(block["type"])}'
        if "params" in block and not isinstance(block["params"], dict):
            return f'"{key}.params" must be a JSON object, got {json.dumps(block["params"])}'
    return None


def _deepspeed_validation_problem(config: dict) -> str | None:
    """DeepSpeed's own verdict on the config (None: accepted), as one line."""
    import copy

    from deepspeed.runtime.config import DeepSpeedConfig
    from pydantic import ValidationError

    try:
        DeepSpeedConfig(copy.deepcopy(config))
    except ValidationError as err:
        first = err.errors()[0]
        block = [PYDANTIC_BLOCKS[err.title]] if err.title in PYDANTIC_BLOCKS else []
        where = ".".join(block + [str(part) for part in first["loc"]])
        return f'"{where}": {first["msg"]} (got {json.dumps(first.get("input"), default=str)})'
    except (AssertionError, TypeError, ValueError, AttributeError, KeyError) as err:
        return f"DeepSpeed rejects it: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
    return None
