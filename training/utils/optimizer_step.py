"""DeepSpeed's mixed-precision optimizer step on CPU, without the passes it repeats: the same update, bit for bit.

A bf16 model without ZeRO (every CPU run at --zero_stage 0 with --dtype bf16 or auto on a CPU with native bf16)
trains through DeepSpeed's FP16_UnfusedOptimizer: fp32 master weights beside the bf16 ones, updated by the
client optimizer (torch's fused AdamW on CPU). Its step reads every gradient four times before the optimizer
sees it: an overflow check (the max and the min of each gradient), a norm (of an fp32 copy made for it), the fp32
copy the optimizer reads, and a multiplication by 1/scale even when the scale is 1 (bf16 has no loss scale, and
the gradient is clipped only when its norm is above --gradient_clipping). On tiny/opt-20m on one CPU thread that
is ~125 ms a step, ~65 ms of it in those passes (~9% of an SFT step).

lean_step makes each fp32 copy once and takes the norms of those copies. The overflow check was redundant: a
gradient with an inf or a NaN has an inf or NaN norm, which DeepSpeed's step treats exactly as an overflow
(the step is skipped, the loss scale lowered), and a finite gradient whose fp32 norm overflows is skipped by
both. Where fused_adamw applies (torch's fused AdamW, a CPU with AVX-512) there is no fp32 copy at all: the norms
are taken of the bf16 gradients in fp32 (the copies' norms, bit for bit) and one C++ pass updates the master
weights, moments and bf16 weights from the bf16 gradients. Every value the step computes (norms, clip factor,
master and model weights, optimizer state, overflow flag, loss scale) is the one DeepSpeed's own step computes:
tests/test_optimizer_step.py compares them bitwise.
"""
import math
import types

import torch
from deepspeed.moe.utils import is_moe_param
from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
from deepspeed.runtime.utils import get_global_norm, is_invalid_grad_norm

from training.utils import fused_adamw
from training.utils.errors import env_switch


def use_lean_step(engine) -> bool:
    """Give `engine`'s FP16_UnfusedOptimizer lean_step (returns whether it did). Left alone: other optimizers
    (ZeRO's, fp32 runs, FusedAdam's fused wrapper on accelerators), LAMB's legacy fused step, model or expert
    parallelism (their norms are reduced across ranks), and RLHF_LEAN_OPTIMIZER_STEP=0."""
    optimizer = engine.optimizer
    if (not isinstance(optimizer, FP16_UnfusedOptimizer) or optimizer.fused_lamb_legacy or optimizer.mpu is not None
            or any(is_moe_param(p) for group in optimizer.fp16_groups for p in group)
            or not env_switch("RLHF_LEAN_OPTIMIZER_STEP")):
        return False
    optimizer.step = types.MethodType(lean_step, optimizer)
    return True


def lean_step(optimizer: FP16_UnfusedOptimizer, closure=None) -> bool:
    """FP16_UnfusedOptimizer.step with one fp32 copy of each gradient (none where the fused kernel runs) and no
    separate overflow pass; returns whether the step was skipped (DeepSpeed's `overflow`)."""
    fused = fused_adamw.applies(optimizer)
    norm_groups = []
    for low_precision, master in zip(optimizer.fp16_groups, optimizer.fp32_groups):
        if fused:  # the norm of each bf16 gradient taken in fp32: the fp32 copy's norm, bit for bit
            norm_groups.append(_group_norm(fused_adamw.grad_norms([p.grad for p in low_precision
                                                                   if p.grad is not None])))
            continue
        for master_param, param in zip(master, low_precision):
            master_param.grad = (torch.zeros_like(master_param) if param.grad is None
                                 else param.grad.to(master_param.dtype))
        grads = [m.grad for m, p in zip(master, low_precision) if p.grad is not None]
        norm_groups.append(_group_norm(torch._foreach_norm(grads, 2.0) if grads else []))
    optimizer._global_grad_norm = get_global_norm(norm_list=norm_groups)
    if is_invalid_grad_norm(optimizer._global_grad_norm):
        return optimizer._skip_invalid_grad_norm()  # sets `overflow`, lowers the loss scale, drops the gradients
    optimizer.overflow = False
    optimizer._update_scale(False)
    combined_scale = optimizer.unscale_and_clip_grads(optimizer._global_grad_norm, apply_scale=False)
    if fused:
        fused_adamw.step(optimizer, combined_scale)
        return False
    master_grads = [m.grad for group in optimizer.fp32_groups for m in group]
    if combined_scale != 1.0:  # a multiplication by 1.0 changes no bit
        torch._foreach_mul_(master_grads, 1.0 / combined_scale)
    optimizer.optimizer.step()
    for low_precision, master in zip(optimizer.fp16_groups, optimizer.fp32_groups):
        torch._foreach_copy_([p.data for p in low_precision], master)
        for master_param in master:
            master_param.grad = None
    return False


def _group_norm(norms: list[torch.Tensor]) -> float:
    """The 2-norm of a group's fp32 gradients from each tensor's fp32 norm as deepspeed.runtime.utils.get_weight_norm
    computes it (their squares summed in order in fp32, the root in Python), or -1 where it is not finite."""
    if not norms:
        return 0.0
    total = 0.0
    for norm in norms:
        total += norm ** 2.0
    total = float(total) ** 0.5
    return total if math.isfinite(total) else -1
