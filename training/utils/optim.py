"""Optimizer parameter groups, optimizer choice per device, and learning-rate schedules."""
from typing import Iterable

import torch
from deepspeed.ops.adam import DeepSpeedCPUAdam, FusedAdam
from torch import nn
from transformers import get_scheduler

from training.utils.errors import UserInputError
from training.utils.lora import LORA_PARAM_NAMES

NO_DECAY_NAMES = ("bias", "layer_norm.weight", "layernorm.weight", "norm.weight", "ln_f.weight",
                  "LayerNorm.weight")

# DeepSpeed-Chat's --lr_scheduler_type choices (all understood by transformers.get_scheduler).
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")


def get_optimizer_grouped_parameters(model: nn.Module, weight_decay: float, lora_learning_rate: float | None = None,
                                     no_decay_name_list: Iterable[str] = NO_DECAY_NAMES) -> list[dict]:
    """Trainable parameters in up to three groups: decayed base, decayed LoRA, no decay.

    Biases and norm weights are not decayed (decay pulls norm gains towards zero, which only hurts).
    LoRA factors get their own group so they can use `--lora_learning_rate`. Empty groups are
    dropped because DeepSpeed's ZeRO optimizers fail on them.
    """
    no_decay_name_list = tuple(no_decay_name_list)
    decay, lora, no_decay = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if any(nd in name for nd in no_decay_name_list):
            no_decay.append(param)
        elif any(ln in name for ln in LORA_PARAM_NAMES):
            lora.append(param)
        else:
            decay.append(param)
    lora_group = {"params": lora, "weight_decay": weight_decay}
    if lora_learning_rate is not None:
        lora_group["lr"] = lora_learning_rate
    groups = [{"params": decay, "weight_decay": weight_decay}, lora_group,
              {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def create_optimizer(param_groups: list[dict], *, lr: float, betas: tuple[float, float] = (0.9, 0.95),
                     offload: bool, device: str) -> torch.optim.Optimizer:
    """AdamW in the implementation that suits where the optimizer state lives.

    - offload: DeepSpeedCPUAdam, the CPU kernel ZeRO-Offload requires for state moved to the host.
    - an accelerator (cuda, ...): DeepSpeed's FusedAdam.
    - cpu without offload: torch.optim.AdamW. DeepSpeed's CPU builds of FusedAdam/CPUAdam are
      JIT-compiled on first use (about a minute), and torch's AdamW runs under ZeRO 0-3 as is.
    """
    if offload:
        return DeepSpeedCPUAdam(param_groups, lr=lr, betas=betas)
    if device == "cpu":
        return torch.optim.AdamW(param_groups, lr=lr, betas=betas)
    return FusedAdam(param_groups, lr=lr, betas=betas)


def check_lr_scheduler_type(name: str) -> None:
    if name not in LR_SCHEDULERS:
        raise UserInputError(f"--lr_scheduler_type {name} is not supported: use one of {', '.join(LR_SCHEDULERS)}")


def create_lr_scheduler(optimizer: torch.optim.Optimizer, name: str, num_warmup_steps: int,
                        num_training_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """`--lr_scheduler_type` as a scheduler; each group's lr (LoRA's too) follows the same shape."""
    check_lr_scheduler_type(name)
    return get_scheduler(name, optimizer=optimizer, num_warmup_steps=num_warmup_steps,
                         num_training_steps=num_training_steps)
