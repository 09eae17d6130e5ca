"""Builders that turn a model and its flags into DeepSpeed engines (used by every step).

`config` is a step's configuration (it has the TrainingFlags, DeepSpeedFlags and LoggingFlags);
`model_flags` is one trained model's ModelFlags (`config.model`, or step 3's `config.actor` / `config.critic`).
"""
import math

import deepspeed

from training.utils import distributed
from training.utils.ds_config import get_eval_ds_config, get_train_ds_config, global_batch_size, merge_user_ds_config
from training.utils.errors import UserInputError, env_switch
from training.utils.flags import ModelFlags
from training.utils.lora import (
    convert_linear_layer_to_lora,
    make_model_gradient_checkpointing_compatible,
    only_optimize_lora_parameters,
)
from training.utils.optim import create_lr_scheduler, create_optimizer, get_optimizer_grouped_parameters
from training.utils.optimizer_step import use_lean_step
from training.utils.precision import resolve_dtype

_logged_dtypes: set = set()


def training_dtype(config, device) -> str:
    """The precision every model of the run uses (--dtype; auto picks from the hardware), logged once."""
    dtype, reason = resolve_dtype(config.dtype, device.type)
    if (dtype, reason) not in _logged_dtypes:
        _logged_dtypes.add((dtype, reason))
        distributed.print_rank_0(f"precision: {dtype} ({reason})")
    return dtype


def train_ds_config(config, model_flags: ModelFlags, micro_batch_size: int, device, tb_name: str | None = None,
                    **entries) -> dict:
    """The DeepSpeed config of a trained model, with --deepspeed_config's entries merged over it.
    `tb_name` turns DeepSpeed's own TensorBoard events on (with --enable_tensorboard); `entries` are
    further get_train_ds_config keywords (step 3's Hybrid Engine settings)."""
    built = get_train_ds_config(
        offload=config.offload, dtype=training_dtype(config, device), stage=model_flags.zero_stage,
        train_batch_size=global_batch_size(micro_batch_size, config.gradient_accumulation_steps,
                                           distributed.world_size()),
        micro_batch_size=micro_batch_size, gradient_accumulation_steps=config.gradient_accumulation_steps,
        enable_tensorboard=config.enable_tensorboard and tb_name is not None, tb_path=config.tensorboard_path,
        tb_name=tb_name or "", device=device.type, **entries)
    return merge_user_ds_config(built, config.deepspeed_config)


def frozen_ds_config(config, stage: int, offload: bool, micro_batch_size: int, device) -> dict:
    """The DeepSpeed config of a frozen model (reference, reward, EMA) beside a trained one."""
    return get_eval_ds_config(
        offload=offload, dtype=training_dtype(config, device), stage=stage, micro_batch_size=micro_batch_size,
        train_batch_size=global_batch_size(micro_batch_size, config.gradient_accumulation_steps,
                                           distributed.world_size()),
        device=device.type)


def frozen_stage(trained_stage: int) -> int:
    """The ZeRO stage of a frozen model that sits next to a trained one (DeepSpeed-Chat's rule): partitioned
    when the trained model is, whole otherwise (stages 1-2 partition optimizer state, which it has not)."""
    return 3 if trained_stage == 3 else 0


def apply_lora(model, model_flags: ModelFlags, only_optimize_lora: bool = False,
               force_optimize_params: tuple[str, ...] = ()):
    """LoRA layers per the model's flags; with `only_optimize_lora` everything else but
    `force_optimize_params` (a value head) is frozen."""
    if model_flags.lora_dim > 0:
        convert_linear_layer_to_lora(model, model_flags.lora_module_name, model_flags.lora_dim)
        if only_optimize_lora:
            only_optimize_lora_parameters(model, force_optimize_params)
            make_model_gradient_checkpointing_compatible(model)
    return model


def supervised_steps_per_epoch(config, micro_batches_per_epoch: int, unit: str = "samples") -> int:
    """Optimizer steps per epoch for the LR schedule of steps 1, 2 and DPO, after refusing a run that would make
    no optimizer step and warning about a warmup that outlasts the run.

    DeepSpeed counts micro-batches across epochs and steps the optimizer on every
    --gradient_accumulation_steps-th, so the whole run makes (micro-batches per epoch x epochs) // accumulation
    optimizer steps; with none, the "trained" model saved at the end would be the untouched start."""
    accumulation, epochs = config.gradient_accumulation_steps, config.num_train_epochs
    total = micro_batches_per_epoch * epochs // accumulation
    if total == 0:
        raise UserInputError(
            f"--gradient_accumulation_steps {accumulation} is more than the {micro_batches_per_epoch * epochs} "
            f"micro-batches of the whole run ({micro_batches_per_epoch} per epoch of --per_device_train_batch_size "
            f"{config.per_device_train_batch_size} {unit} x {epochs} epochs), so the optimizer would never step and "
            f"the model would be saved untrained: lower --gradient_accumulation_steps to at most "
            f"{max(micro_batches_per_epoch * epochs, 1)}, raise --num_train_epochs, lower the batch size or add data")
    warn_long_warmup(config, total)
    return math.ceil(micro_batches_per_epoch / accumulation)


def warn_long_warmup(config, total_steps: int, what: str = "optimizer steps") -> None:
    """One warning line (rank 0) when --num_warmup_steps covers the whole run: the learning rate then never gets
    to --learning_rate (with a decaying schedule there is nothing left after the warmup). Not refused: a short
    test run with a production warmup is a legitimate choice."""
    if config.num_warmup_steps >= total_steps and config.lr_scheduler_type != "constant":
        distributed.print_rank_0(
            f"WARNING: --num_warmup_steps {config.num_warmup_steps} >= the {total_steps} {what} of this run: the "
            f"learning rate is still warming up when training ends; lower --num_warmup_steps (e.g. to "
            f"{total_steps // 10}) to train at the full --learning_rate")


def initialize_train_engine(model, config, model_flags: ModelFlags, ds_config: dict, device, steps_per_epoch: int,
                            gradient_checkpointing: bool | None = None):
    """Optimizer (decay / no-decay / LoRA groups), LR schedule over all epochs, DeepSpeed engine.
    `gradient_checkpointing` None follows the model's flag (step 3 turns it on per training pass instead)."""
    optimizer = create_optimizer(
        get_optimizer_grouped_parameters(model, model_flags.weight_decay, model_flags.lora_learning_rate),
        lr=model_flags.learning_rate, offload=config.offload, device=device.type)
    lr_scheduler = create_lr_scheduler(optimizer, config.lr_scheduler_type, config.num_warmup_steps,
                                       steps_per_epoch * config.num_train_epochs)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=lr_scheduler,
                                      config=ds_config, dist_init_required=False)
    skip_lone_allreduce(engine)
    use_lean_step(engine)
    if model_flags.gradient_checkpointing if gradient_checkpointing is None else gradient_checkpointing:
        engine.module.gradient_checkpointing_enable()
    return engine, lr_scheduler


def skip_lone_allreduce(engine) -> bool:
    """One process without ZeRO: no gradient all-reduce after each backward (returns whether it was switched off).

    DeepSpeed all-reduces every gradient even over a world of one: it flattens them into one buffer, reduces it
    with itself, divides by 1 and copies every gradient back (~25 ms of a ~800 ms SFT step of tiny/opt-20m on one
    CPU thread). With one rank the result is the gradients themselves, bit for bit. ZeRO stages 1-3 keep it: their
    reduction step also sorts the gradients into the partitions their optimizer steps. RLHF_LONE_RANK_NO_ALLREDUCE=0
    keeps it everywhere."""
    if (distributed.world_size() == 1 and engine.zero_optimization_stage() == 0
            and env_switch("RLHF_LONE_RANK_NO_ALLREDUCE")):
        engine.enable_backward_allreduce = False
    return not engine.enable_backward_allreduce


def initialize_frozen_engine(model, ds_config: dict):
    """A DeepSpeed engine for a model that only runs forward passes (a reference or reward model):
    no optimizer, no gradients, eval mode (dropout off), parameters partitioned under a stage-3 config."""
    model.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=model, config=ds_config, dist_init_required=False)
    engine.eval()
    return engine
