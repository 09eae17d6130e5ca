"""AdamW on fp32 master weights straight from bf16 gradients, in one pass that also writes the bf16 weights.

DeepSpeed's bf16 step without ZeRO (optimizer_step.lean_step) feeds torch's fused AdamW an fp32 copy of every
gradient, takes the gradients' norms of those copies and copies the fp32 master weights back into the bf16 model:
~75 ms a step of a ~21M-parameter model on one CPU thread, of which the update itself is ~30 ms (bound by reading
and writing the weights and moments). The C++ kernel (csrc/fused_adamw.cpp) reads each bf16 gradient, applies
the clipping factor, updates the master weight and both moments and stores the bf16 weight in one pass, with
torch's arithmetic operation by operation, and takes each bf16 gradient's norm in torch's order of summation
(~4 ms against ~10): every value is the one torch computes. A probe at first use compares them bit for bit on the
running torch and keeps torch's step for good if they differ. The last numel % 16 elements of a tensor (torch's
scalar tail rounds differently) and parameters without a gradient run through torch's own kernel, on fp32 copies
of just those elements.

Used by lean_step for torch.optim.AdamW(fused=True) (optim.create_optimizer's CPU choice) with plain settings (no
amsgrad, maximize, capturable or differentiable; a float learning rate; no step hooks) on bf16 models whose
optimizer state exists (DeepSpeed creates it when it builds the engine), on CPUs with the AVX-512 the kernel is
compiled for (native.py). RLHF_FUSED_ADAMW_KERNEL=0 turns it off.
"""
import functools

import torch
from torch.optim import optimizer as torch_optimizer

from training.utils import native
from training.utils.errors import env_switch

VECTOR = 16  # the elements the kernel updates per instruction; the rest of a tensor goes to torch
_PLAIN_SETTINGS = {"amsgrad": False, "maximize": False, "capturable": False, "differentiable": False,
                   "fused": True, "decoupled_weight_decay": True}


@functools.cache
def _extension():
    return native.build("fused_adamw", "the fused AdamW kernel", "optimizer steps use torch's AdamW",
                        "RLHF_FUSED_ADAMW_KERNEL")


def applies(optimizer) -> bool:
    """Whether DeepSpeed's FP16_UnfusedOptimizer `optimizer` may take its step through the kernel."""
    adamw = optimizer.optimizer
    if (type(adamw) is not torch.optim.AdamW or adamw._optimizer_step_pre_hooks or adamw._optimizer_step_post_hooks
            or torch_optimizer._global_optimizer_pre_hooks or torch_optimizer._global_optimizer_post_hooks
            or not env_switch("RLHF_FUSED_ADAMW_KERNEL") or not native.cpu_runs_avx512()):
        return False
    for group, low_precision in zip(adamw.param_groups, optimizer.fp16_groups):
        if (any(group.get(key) != value for key, value in _PLAIN_SETTINGS.items())
                or isinstance(group["lr"], torch.Tensor) or any(isinstance(b, torch.Tensor) for b in group["betas"])):
            return False
        for master, param in zip(group["params"], low_precision):
            grad = param.grad
            if ("step" not in adamw.state.get(master, {}) or master.dtype != torch.float32
                    or param.dtype != torch.bfloat16 or master.device.type != "cpu" or not master.is_contiguous()
                    or not param.is_contiguous() or master.numel() != param.numel()
                    or (grad is not None and (grad.dtype != torch.bfloat16 or not grad.is_contiguous()))):
                return False
    return _extension() is not None and _kernel_matches_torch()


def grad_norms(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each bf16 gradient's 2-norm in fp32 (0-d tensors), bit for bit torch's norm of its fp32 copy."""
    return list(_extension().bf16_grad_norms(grads).unbind()) if grads else []


def step(optimizer, combined_scale: float) -> None:
    """torch's AdamW step on `optimizer`'s master weights from its bf16 model's gradients divided by
    `combined_scale` (DeepSpeed's clipping and loss-scale factor), the bf16 weights updated from the result."""
    adamw = optimizer.optimizer
    for group, low_precision in zip(adamw.param_groups, optimizer.fp16_groups):
        masters = group["params"]
        states = [adamw.state[m] for m in masters]
        torch._foreach_add_([s["step"] for s in states], 1)
        beta1, beta2 = group["betas"]
        hyper = dict(lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"])
        trained = [i for i, p in enumerate(low_precision) if p.grad is not None]
        _extension().fused_adamw_bf16(
            [masters[i] for i in trained], [low_precision[i].data for i in trained],
            [low_precision[i].grad for i in trained], [states[i]["exp_avg"] for i in trained],
            [states[i]["exp_avg_sq"] for i in trained], [float(states[i]["step"]) for i in trained],
            *hyper.values(), 1.0 / combined_scale, combined_scale != 1.0)
        _torch_step_on_the_rest(masters, low_precision, states, combined_scale, hyper)


def _torch_step_on_the_rest(masters, low_precision, states, combined_scale, hyper) -> None:
    """torch's own fused AdamW on what the kernel leaves: each tensor's last numel % 16 elements, and whole tensors
    without a gradient (a zero gradient, as DeepSpeed's step gives them)."""
    views = []  # (start, master, model weight, gradient or None, state)
    for master, param, state in zip(masters, low_precision, states):
        start = 0 if param.grad is None else master.numel() - master.numel() % VECTOR
        if start < master.numel():
            views.append((start, master, param, param.grad, state))
    if not views:
        return
    params = [m.view(-1)[start:] for start, m, *_ in views]
    grads = [torch.zeros_like(p) if g is None else g.view(-1)[start:].float()
             for p, (start, _, _, g, _) in zip(params, views)]
    if combined_scale != 1.0:
        torch._foreach_mul_(grads, 1.0 / combined_scale)
    torch._fused_adamw_(params, grads, [s["exp_avg"].view(-1)[start:] for start, *_, s in views],
                        [s["exp_avg_sq"].view(-1)[start:] for start, *_, s in views], [],
                        [s["step"] for *_, s in views], amsgrad=False, maximize=False, **hyper)
    torch._foreach_copy_([p.data.view(-1)[start:] for start, _, p, *_ in views], params)


@functools.cache
def _kernel_matches_torch() -> bool:
    """Whether the kernel reproduces this torch's fused AdamW and gradient norms bit for bit: a few steps from the
    same state, with and without weight decay and clipping, a small and a large first-moment weight (torch's two
    lerp forms)."""
    generator = torch.Generator().manual_seed(0)
    size = 64 * VECTOR
    for beta1, weight_decay, multiplier in ((0.9, 0.1, 0.37), (0.3, 0.0, None)):
        start = torch.randn(size, generator=generator) * 0.02
        reference = start.clone()
        adamw = torch.optim.AdamW([reference], lr=3e-3, betas=(beta1, 0.95), weight_decay=weight_decay, fused=True)
        param, weight = start.clone(), torch.empty(size, dtype=torch.bfloat16)
        exp_avg, exp_avg_sq = torch.zeros(size), torch.zeros(size)
        for count in range(1, 4):
            grad = (torch.randn(size, generator=generator) * 0.01 * count).to(torch.bfloat16)
            reference.grad = grad.float() if multiplier is None else grad.float() * multiplier
            adamw.step()
            _extension().fused_adamw_bf16([param], [weight], [grad], [exp_avg], [exp_avg_sq], [float(count)], 3e-3,
                                          beta1, 0.95, weight_decay, 1e-8, multiplier or 1.0, multiplier is not None)
            state = adamw.state[reference]
            norm = torch._foreach_norm([grad[: size - 3].float()], 2.0)[0]  # (8-lane sums, then a tail of 5)
            if not (torch.equal(param, reference) and torch.equal(exp_avg, state["exp_avg"])
                    and torch.equal(grad_norms([grad[: size - 3]])[0], norm)
                    and torch.equal(exp_avg_sq, state["exp_avg_sq"]) and torch.equal(weight, reference.bfloat16())):
                print("warning: the fused AdamW kernel does not reproduce this torch's AdamW bit for bit; optimizer "
                      "steps use torch's own", flush=True)
                return False
    return True
