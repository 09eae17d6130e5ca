"""LoRA: conversion is output-preserving, fusing is exact and idempotent, only LoRA trains, saving fuses."""

import deepspeed
import pytest
import torch
from deepspeed.module_inject.policy import maybe_get_lora
from transformers import OPTConfig, OPTForCausalLM

from training.utils.errors import UserInputError
from training.utils.lora import (
    LoRALinear,
    convert_linear_layer_to_lora,
    count_lora_modules,
    fuse_lora,
    lora_scalings,
    lora_state_dict_to_fused,
    make_model_gradient_checkpointing_compatible,
    only_optimize_lora_parameters,
    unfuse_lora,
)

LORA_MODULES = "decoder.layers."


def tiny_opt() -> OPTForCausalLM:
    torch.manual_seed(0)
    config = OPTConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, ffn_dim=64,
                       max_position_embeddings=64, word_embed_proj_dim=32, dropout=0.0, attention_dropout=0.0)
    return OPTForCausalLM(config).eval()


def lora_opt(lora_dim=4, lora_scaling=0.5):
    return convert_linear_layer_to_lora(tiny_opt(), LORA_MODULES, lora_dim, lora_scaling=lora_scaling)


def randomize_left(model):
    """Give the zero-initialised left factors values, as training would."""
    torch.manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.lora_left_weight.normal_(std=0.1)


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids).logits


@pytest.fixture
def input_ids():
    return torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(2))


def test_conversion_keeps_logits_and_state_dict_keys(input_ids):
    base = tiny_opt()
    expected = logits(base, input_ids)
    base_keys = set(base.state_dict())
    model = convert_linear_layer_to_lora(base, LORA_MODULES, lora_dim=4)
    # 6 linears (q, k, v, out, fc1, fc2) per layer, 2 layers; lm_head is not matched.
    assert count_lora_modules(model) == 12
    assert torch.equal(logits(model, input_ids), expected)
    lora_keys = {k for k in model.state_dict() if "lora_" in k}
    assert set(model.state_dict()) - lora_keys == base_keys
    lora_modules = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert not any(m.weight.requires_grad or m.bias.requires_grad for m in lora_modules)


def test_lora_dim_zero_is_no_conversion():
    model = convert_linear_layer_to_lora(tiny_opt(), LORA_MODULES, lora_dim=0)
    assert count_lora_modules(model) == 0


def test_fuse_matches_unfused_is_idempotent_and_reversible(input_ids):
    model = lora_opt()
    randomize_left(model)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    unfused = logits(model, input_ids)
    assert not torch.allclose(unfused, logits(tiny_opt(), input_ids), atol=1e-4)

    fuse_lora(model)
    fused_once = {k: v.clone() for k, v in model.state_dict().items()}
    torch.testing.assert_close(logits(model, input_ids), unfused, atol=1e-5, rtol=0)
    fuse_lora(model)
    for key, value in model.state_dict().items():
        assert torch.equal(value, fused_once[key]), key

    unfuse_lora(model)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, original[key], atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(model, input_ids), unfused, atol=1e-5, rtol=0)


def test_only_lora_parameters_change(input_ids):
    model = only_optimize_lora_parameters(lora_opt())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_right_weight" in n or "lora_left_weight" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, param in model.named_parameters():
        if name in trainable:
            assert not torch.equal(param, before[name]), name
        else:
            assert torch.equal(param, before[name]), name


def test_force_optimize_params_keeps_named_params_trainable():
    model = only_optimize_lora_parameters(lora_opt(), force_optimize_params=["final_layer_norm"])
    assert model.model.decoder.layers[0].final_layer_norm.weight.requires_grad
    assert not model.model.decoder.layers[0].fc1.weight.requires_grad


def test_only_optimize_without_lora_is_a_user_error():
    with pytest.raises(UserInputError, match="--lora_dim"):
        only_optimize_lora_parameters(tiny_opt())


def test_fused_state_dict_loads_into_plain_model(input_ids):
    model = lora_opt()
    randomize_left(model)
    expected = logits(model, input_ids)
    state_dict = {k: v.clone() for k, v in model.state_dict().items()}
    fused = lora_state_dict_to_fused(state_dict, lora_scalings(model))
    assert not any("lora_" in k for k in fused)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state_dict.items())  # input untouched
    plain = tiny_opt()
    plain.load_state_dict(fused)
    torch.testing.assert_close(logits(plain, input_ids), expected, atol=1e-5, rtol=0)


def test_lora_scalings_refuses_fused_model():
    model = fuse_lora(lora_opt())
    with pytest.raises(RuntimeError, match="unfuse_lora"):
        lora_scalings(model)


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_with_only_lora_gives_lora_grads(input_ids, use_reentrant):
    model = only_optimize_lora_parameters(lora_opt())
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    make_model_gradient_checkpointing_compatible(model)
    model.train()
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    lora_params = [p for n, p in model.named_parameters() if "lora_" in n]
    assert all(p.grad is not None for p in lora_params)
    assert any(p.grad.abs().sum() > 0 for p in lora_params)


def test_compatibility_hook_makes_frozen_embedding_output_require_grad(input_ids):
    model = only_optimize_lora_parameters(lora_opt())
    assert not model.get_input_embeddings()(input_ids).requires_grad
    make_model_gradient_checkpointing_compatible(model)
    assert model.get_input_embeddings()(input_ids).requires_grad


@pytest.mark.parametrize("names", ["not_a_module.", ["nope.", "also_nope."]])
def test_unknown_module_name_lists_real_names(names):
    with pytest.raises(UserInputError) as err:
        convert_linear_layer_to_lora(tiny_opt(), names, lora_dim=4)
    message = str(err.value)
    assert "--lora_module_name" in message and "OPTForCausalLM" in message
    assert "model.decoder.layers.0.self_attn.k_proj" in message
    assert "\n" not in message


def test_hybrid_engine_contract_matches_our_fuse():
    model = lora_opt(lora_scaling=0.5)
    randomize_left(model)
    module = model.model.decoder.layers[1].self_attn.q_proj
    right, left, scaling = maybe_get_lora(module)
    assert right is module.lora_right_weight and left is module.lora_left_weight and scaling == 0.5
    assert right.shape == (32, 4) and left.shape == (4, 32)
    # The formula of deepspeed/module_inject/containers/features/hybrid_engine.py fuse_lora().
    deepspeed_fused = module.weight.detach().clone() + scaling * torch.matmul(left.t(), right.t())
    module.fuse_lora_weight()
    torch.testing.assert_close(module.weight.detach(), deepspeed_fused, atol=1e-6, rtol=0)
    assert maybe_get_lora(torch.nn.Linear(2, 2)) == []


def test_zero3_partitioned_model_converts_without_gathering(distributed, input_ids):
    """Built under ZeRO-3 (weights are empty shards), converted, then trained one step by DeepSpeed."""
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from training.utils.ds_config import get_train_ds_config

    config = get_train_ds_config(offload=False, dtype="fp32", stage=3, train_batch_size=2, micro_batch_size=2,
                                 gradient_accumulation_steps=1, device="cpu")
    model_config = tiny_opt().config
    dschf = HfDeepSpeedConfig(config)  # noqa: F841  (zero.Init applies while this object is alive)
    try:
        model = OPTForCausalLM._from_config(model_config)
    finally:
        unset_hf_deepspeed_config()
    q_proj = model.model.decoder.layers[0].self_attn.q_proj
    assert hasattr(q_proj.weight, "ds_id") and q_proj.weight.numel() < 32 * 32
    convert_linear_layer_to_lora(model, LORA_MODULES, lora_dim=4)
    module = model.model.decoder.layers[0].self_attn.q_proj
    assert module.lora_right_weight.shape == (32, 4) and module.lora_left_weight.shape == (4, 32)
    only_optimize_lora_parameters(model)
    engine, *_ = deepspeed.initialize(model=model, config=config, optimizer=torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-2))
    loss = engine(input_ids=input_ids, labels=input_ids).loss
    engine.backward(loss)
    engine.step()
    with deepspeed.zero.GatheredParameters([module.lora_left_weight]):
        assert module.lora_left_weight.abs().sum() > 0

    engine.eval()
    expected = logits(engine, input_ids)
    fuse_lora(engine.module)
    torch.testing.assert_close(logits(engine, input_ids), expected, atol=1e-5, rtol=0)
    unfuse_lora(engine.module)
    gathered = engine._zero3_consolidated_16bit_state_dict()  # what engine.save_16bit_model writes
    plain = tiny_opt()
    plain.load_state_dict(lora_state_dict_to_fused(gathered, lora_scalings(engine.module)))
    torch.testing.assert_close(logits(plain, input_ids), expected, atol=1e-5, rtol=0)
