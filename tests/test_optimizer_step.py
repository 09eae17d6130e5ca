"""optimizer_step.lean_step against DeepSpeed's own FP16_UnfusedOptimizer.step, on real engines: every value bit for
bit (model and master weights, Adam moments, gradient norm, skipped steps, loss scale), with and without the fused
AdamW kernel (fused_adamw.py)."""
import math

import deepspeed
import pytest
import torch
from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

from tests.test_ds_config import tiny_opt, train_config
from training.utils import fused_adamw, native
from training.utils.engine import skip_lone_allreduce
from training.utils.optim import create_optimizer, get_optimizer_grouped_parameters
from training.utils.optimizer_step import use_lean_step

needs_avx512 = pytest.mark.skipif(not native.cpu_runs_avx512(),
                                  reason="the fused AdamW kernel is compiled for AVX-512, which this CPU lacks")



class KernelCalls:
    """Counts the fused kernel's calls on model parameters (the probe's single tensor is not counted)."""

    def __init__(self, monkeypatch):
        self.calls, compiled = 0, fused_adamw._extension()

        def counted(params, *args):
            self.calls += len(params) > 1
            return compiled.fused_adamw_bf16(params, *args)
        counting = type("Counted", (), {"fused_adamw_bf16": counted, "bf16_grad_norms": compiled.bf16_grad_norms})
        monkeypatch.setattr(fused_adamw, "_extension", lambda: counting)


def engine_for(dtype: str, lean: bool, stage: int = 0, hidden: int = 32, optimizer_options=None):
    model = tiny_opt(hidden)
    model.register_parameter("unused", torch.nn.Parameter(torch.ones(3)))  # trained, but never gets a gradient
    groups = get_optimizer_grouped_parameters(model, weight_decay=0.1)
    optimizer = (torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.95), **optimizer_options) if optimizer_options
                 else create_optimizer(groups, lr=1e-2, offload=False, device="cpu"))
    config = train_config(stage=stage, dtype="bf16" if dtype == "bf16" else "fp32", train_batch_size=2,
                          micro_batch_size=2, gradient_accumulation_steps=1)
    if dtype == "fp16":  # DeepSpeed's fp16 on CPU: our configs refuse it (slow), the optimizer wrapper is the same
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 8}  # dynamic loss scale
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    skip_lone_allreduce(engine)  # as every run builds it: `unused` then keeps no gradient at all
    if lean:
        assert use_lean_step(engine) is (stage == 0 and dtype != "fp32")
    return engine


def train(engine, steps: int, loss_factors=(1.0,), poison_step: int | None = None) -> list[dict]:
    """Per step: the weights, master weights, Adam state, gradient norm, skip flag and loss scale after it."""
    generator = torch.Generator().manual_seed(0)
    history = []
    for step in range(steps):
        input_ids = torch.randint(0, 128, (2, 8), generator=generator)
        loss = engine(input_ids=input_ids, labels=input_ids).loss * loss_factors[step % len(loss_factors)]
        engine.backward(loss)
        if step == poison_step:  # an overflow: one gradient entry is inf
            engine.module.model.decoder.embed_tokens.weight.grad[5, 3] = math.inf
        engine.step()
        optimizer = engine.optimizer
        masters = optimizer.fp32_groups if isinstance(optimizer, FP16_UnfusedOptimizer) else []
        state = optimizer.optimizer.state if masters else optimizer.state
        history.append({
            "weights": [p.detach().clone() for p in engine.module.parameters()],
            "masters": [m.detach().clone() for group in masters for m in group],
            "moments": [s[key].clone() for s in state.values() for key in ("exp_avg", "exp_avg_sq")],
            "norm": engine.get_global_grad_norm(), "skipped": engine.skipped_steps,
            "scale": getattr(optimizer, "loss_scale_config", None) and optimizer.loss_scale_config.cur_scale,
            "master_grads": [m.grad for group in masters for m in group]})
    return history


def assert_same(lean: list[dict], reference: list[dict]):
    assert len(lean) == len(reference)
    for got, want in zip(lean, reference):
        for key in ("weights", "masters", "moments"):
            assert len(got[key]) == len(want[key]) and all(torch.equal(a, b) for a, b in zip(got[key], want[key])), key
        assert (got["norm"], got["skipped"], got["scale"]) == (want["norm"], want["skipped"], want["scale"])
        assert all(g is None for g in got["master_grads"])  # fp32 gradients only inside the step


@pytest.mark.parametrize("dtype, hidden, kernel", [("bf16", 32, "1"), ("bf16", 30, "1"), ("bf16", 32, "0"),
                                                   ("fp16", 32, "1")])
def test_lean_step_equals_deepspeeds_step_bit_for_bit(distributed, dtype, hidden, kernel, monkeypatch):
    """Clipped (loss x 50: norms above --gradient_clipping 1.0) and unclipped steps, and a step whose gradient holds
    an inf (skipped by both; fp16 lowers its dynamic loss scale). bf16 steps after the first run the fused kernel
    (tensor tails and the parameter without a gradient through torch's own kernel), unless it is switched off."""
    factors = (1.0, 50.0, 0.01, 1.0, 50.0, 0.01)
    monkeypatch.setenv("RLHF_FUSED_ADAMW_KERNEL", kernel)
    kernel_calls = KernelCalls(monkeypatch) if native.cpu_runs_avx512() and kernel == "1" else None
    lean = train(engine_for(dtype, lean=True, hidden=hidden), steps=8, loss_factors=factors, poison_step=3)
    if kernel_calls:
        # every step but the skipped one (DeepSpeed creates the optimizer state up front), once per parameter group
        assert kernel_calls.calls == (7 * 2 if dtype == "bf16" else 0)
    monkeypatch.setenv("RLHF_LEAN_OPTIMIZER_STEP", "0")
    reference_engine = engine_for(dtype, lean=False, hidden=hidden)
    assert use_lean_step(reference_engine) is False
    reference = train(reference_engine, steps=8, loss_factors=factors, poison_step=3)
    assert_same(lean, reference)
    norms = [h["norm"] for h in reference]
    assert norms[1] > 1.0 and norms[2] < 1.0 and norms[3] == math.inf  # both clip paths and the overflow ran
    assert norms[4] > 1.0 and norms[5] < 1.0
    assert [h["skipped"] for h in reference] == [0, 0, 0, 1, 1, 1, 1, 1]
    assert not torch.equal(reference[0]["weights"][1], reference[-1]["weights"][1])
    if dtype == "fp16":
        assert reference[3]["scale"] == reference[2]["scale"] / 2


def test_lean_step_keeps_its_hands_off_other_optimizers(distributed):
    """fp32 (no wrapper) and ZeRO's optimizers keep their own step."""
    for engine in (engine_for("fp32", lean=True), engine_for("bf16", lean=True, stage=1)):
        assert "step" not in vars(engine.optimizer)


@needs_avx512
@pytest.mark.parametrize("options", [{"fused": True, "amsgrad": True}, {"fused": False}, {"foreach": True}])
def test_the_fused_kernel_keeps_its_hands_off_other_adamw_settings(distributed, monkeypatch, options):
    """amsgrad, torch's unfused AdamW: torch's own step (DeepSpeed's values still, through lean_step)."""
    kernel_calls = KernelCalls(monkeypatch)
    engine = engine_for("bf16", lean=True, optimizer_options=options)
    lean = train(engine, steps=3)
    monkeypatch.setenv("RLHF_LEAN_OPTIMIZER_STEP", "0")
    assert_same(lean, train(engine_for("bf16", lean=False, optimizer_options=options), steps=3))
    assert kernel_calls.calls == 0


@needs_avx512
def test_the_fused_kernel_steps_aside_for_step_hooks_and_a_torch_it_does_not_match(distributed, monkeypatch, capsys):
    kernel_calls = KernelCalls(monkeypatch)
    engine = engine_for("bf16", lean=True)
    handle = engine.optimizer.optimizer.register_step_post_hook(lambda *args: None)
    train(engine, steps=2)
    assert kernel_calls.calls == 0
    handle.remove()
    train(engine, steps=1)
    assert kernel_calls.calls == 2  # one step, two parameter groups

    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, closure=None: None)  # a "torch" whose AdamW differs
    fused_adamw._kernel_matches_torch.cache_clear()
    try:
        assert not fused_adamw.applies(engine.optimizer) and not fused_adamw.applies(engine.optimizer)
        assert capsys.readouterr().out.count("warning: the fused AdamW kernel does not reproduce this torch's") == 1
    finally:
        fused_adamw._kernel_matches_torch.cache_clear()
