"""Builders that turn a model and the shared flags into a training DeepSpeed engine (used by every step)."""
import deepspeed

from training.utils import args as shared_args
from training.utils import runtime
from training.utils.ds_config import get_train_ds_config, global_batch_size
from training.utils.lora import (convert_linear_layer_to_lora, make_model_gradient_checkpointing_compatible,
                                 only_optimize_lora_parameters)
from training.utils.optim import create_lr_scheduler, create_optimizer, get_optimizer_grouped_parameters


def train_ds_config(args, device, tb_name: str) -> dict:
    """The DeepSpeed config of a trained model from the shared flags (plus --deepspeed_config overrides)."""
    config = get_train_ds_config(
        offload=args.offload, dtype=shared_args.resolve_dtype(args.dtype, device.type), stage=args.zero_stage,
        train_batch_size=global_batch_size(args.per_device_train_batch_size, args.gradient_accumulation_steps,
                                           runtime.world_size()),
        micro_batch_size=args.per_device_train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        enable_tensorboard=args.enable_tensorboard, tb_path=args.tensorboard_path, tb_name=tb_name,
        device=device.type)
    return shared_args.merge_user_ds_config(config, args.deepspeed_config)


def apply_lora(model, args, force_optimize_params: tuple[str, ...] = ()):
    """--lora_dim / --lora_module_name / --only_optimize_lora (`force_optimize_params` stay trainable)."""
    if args.lora_dim > 0:
        convert_linear_layer_to_lora(model, args.lora_module_name, args.lora_dim)
        if args.only_optimize_lora:
            only_optimize_lora_parameters(model, force_optimize_params)
            make_model_gradient_checkpointing_compatible(model)
    return model


def initialize_train_engine(model, args, ds_config: dict, device, steps_per_epoch: int):
    """Optimizer (decay / no-decay / LoRA groups), LR schedule over all epochs, DeepSpeed engine."""
    optimizer = create_optimizer(
        get_optimizer_grouped_parameters(model, args.weight_decay, args.lora_learning_rate),
        lr=args.learning_rate, offload=args.offload, device=device.type)
    lr_scheduler = create_lr_scheduler(optimizer, args.lr_scheduler_type, args.num_warmup_steps,
                                       steps_per_epoch * args.num_train_epochs)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=lr_scheduler,
                                      config=ds_config, dist_init_required=False)
    if args.gradient_checkpointing:
        engine.module.gradient_checkpointing_enable()
    return engine, lr_scheduler


def initialize_frozen_engine(model, ds_config: dict):
    """A DeepSpeed engine for a model that only runs forward passes (a reference or reward model):
    no optimizer, no gradients, eval mode (dropout off), parameters partitioned under a stage-3 config."""
    model.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=model, config=ds_config, dist_init_required=False)
    engine.eval()
    return engine
