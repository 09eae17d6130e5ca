"""optimizer_step.lean_step against DeepSpeed's own FP16_UnfusedOptimizer.step, on real engines: every value bit for
bit (model and master weights, Adam moments, gradient norm, skipped steps, loss scale)."""
import math

import deepspeed
import pytest
import torch
from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

from tests.test_ds_config import tiny_opt, train_config
from training.utils.engine import skip_lone_allreduce
from training.utils.optim import create_optimizer, get_optimizer_grouped_parameters
from training.utils.optimizer_step import use_lean_step


def engine_for(dtype: str, lean: bool, stage: int = 0):
    model = tiny_opt()
    model.register_parameter("unused", torch.nn.Parameter(torch.ones(3)))  # trained, but never gets a gradient
    optimizer = create_optimizer(get_optimizer_grouped_parameters(model, weight_decay=0.1), lr=1e-2,
                                 offload=False, device="cpu")
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


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_lean_step_equals_deepspeeds_step_bit_for_bit(distributed, dtype, monkeypatch):
    """Clipped (loss x 50: norms above --gradient_clipping 1.0) and unclipped steps, and a step whose gradient holds
    an inf (skipped by both; fp16 lowers its dynamic loss scale)."""
    factors = (1.0, 50.0, 0.01)
    lean = train(engine_for(dtype, lean=True), steps=6, loss_factors=factors, poison_step=3)
    monkeypatch.setenv("RLHF_LEAN_OPTIMIZER_STEP", "0")
    reference_engine = engine_for(dtype, lean=False)
    assert use_lean_step(reference_engine) is False
    reference = train(reference_engine, steps=6, loss_factors=factors, poison_step=3)
    assert_same(lean, reference)
    norms = [h["norm"] for h in reference]
    assert norms[1] > 1.0 and norms[2] < 1.0 and norms[3] == math.inf  # both clip paths and the overflow ran
    assert [h["skipped"] for h in reference] == [0, 0, 0, 1, 1, 1]
    assert not torch.equal(reference[0]["weights"][1], reference[-1]["weights"][1])
    if dtype == "fp16":
        assert reference[3]["scale"] == reference[2]["scale"] / 2


def test_lean_step_keeps_its_hands_off_other_optimizers(distributed):
    """fp32 (no wrapper) and ZeRO's optimizers keep their own step."""
    for engine in (engine_for("fp32", lean=True), engine_for("bf16", lean=True, stage=1)):
        assert "step" not in vars(engine.optimizer)
