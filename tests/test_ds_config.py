"""DeepSpeed config builders, optimizer groups and choice, and one real DeepSpeed step on CPU."""

import deepspeed
import pytest
import torch
from transformers import OPTConfig, OPTForCausalLM

from training.utils.ds_config import get_eval_ds_config, get_train_ds_config, global_batch_size
from training.utils.errors import UserInputError
from training.utils.lora import convert_linear_layer_to_lora
from training.utils.optim import create_lr_scheduler, create_optimizer, get_optimizer_grouped_parameters

BATCH = {"train_batch_size": 8, "micro_batch_size": 2, "gradient_accumulation_steps": 4}


def train_config(**overrides):
    kwargs = {"offload": False, "dtype": "fp32", "stage": 2, "device": "cpu", **BATCH, **overrides}
    return get_train_ds_config(**kwargs)


def tiny_opt(hidden: int = 32) -> OPTForCausalLM:
    """A 2-layer OPT; hidden=30 gives tensors whose sizes are no multiple of 16 (the fused AdamW kernel's tails)."""
    torch.manual_seed(0)
    config = OPTConfig(vocab_size=128, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2, ffn_dim=64,
                       max_position_embeddings=64, word_embed_proj_dim=hidden, dropout=0.0)
    return OPTForCausalLM(config)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_train_config_blocks(stage, dtype):
    config = train_config(stage=stage, dtype=dtype)
    assert config["train_batch_size"] == 8 and config["train_micro_batch_size_per_gpu"] == 2
    assert config["gradient_accumulation_steps"] == 4 and config["gradient_clipping"] == 1.0
    assert config["zero_optimization"]["stage"] == stage
    assert ("stage3_param_persistence_threshold" in config["zero_optimization"]) == (stage == 3)
    if stage == 3:
        assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert "fp16" not in config
    assert ("bf16" in config) == (dtype == "bf16")
    assert config["hybrid_engine"]["enabled"] is False and "tensorboard" not in config
    assert "offload_optimizer" not in config["zero_optimization"]


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_eval_config_blocks(stage):
    config = get_eval_ds_config(offload=True, dtype="bf16", stage=stage, micro_batch_size=2, train_batch_size=8,
                                device="cpu")
    zero = config["zero_optimization"]
    assert zero["stage"] == (3 if stage == 3 else 0)
    assert ("offload_param" in zero) == (stage == 3)
    assert config["bf16"] == {"enabled": True} and "offload_optimizer" not in zero


def test_fp16_on_cpu_is_a_user_error_naming_fp32():
    with pytest.raises(UserInputError, match="fp32"):
        train_config(dtype="fp16")
    with pytest.raises(UserInputError, match="fp32"):
        get_eval_ds_config(offload=False, dtype="fp16", stage=0, micro_batch_size=1, train_batch_size=1,
                           device="cpu")


def test_fp16_on_cuda_has_loss_scaling():
    fp16 = train_config(dtype="fp16", device="cuda")["fp16"]
    assert fp16["enabled"] and fp16["loss_scale"] == 0
    assert fp16["initial_scale_power"] == 16 and fp16["loss_scale_window"] == 100


@pytest.mark.parametrize("bad", [{"dtype": "fp8"}, {"stage": 4}, {"inference_tp_size": 2, "stage": 2},
                                 {"offload": True, "stage": 0}, {"enable_tensorboard": True}])
def test_bad_flags_are_user_errors(bad):
    with pytest.raises(UserInputError):
        train_config(**bad)


def test_inference_tp_error_names_the_flag():
    with pytest.raises(UserInputError, match="--inference_tp_size"):
        train_config(inference_tp_size=2, stage=2)
    assert train_config(inference_tp_size=2, stage=3)["hybrid_engine"]["inference_tp_size"] == 2


def test_mixed_precision_lora():
    with pytest.raises(UserInputError, match="CUDA"):
        train_config(enable_mixed_precision_lora=True, stage=3)
    with pytest.raises(UserInputError, match="stage 3"):
        train_config(enable_mixed_precision_lora=True, stage=2, device="cuda")
    zero = train_config(enable_mixed_precision_lora=True, stage=3, device="cuda")["zero_optimization"]
    assert zero["zero_quantized_nontrainable_weights"] is True


def test_hybrid_engine_and_tensorboard_blocks_carry_values():
    config = train_config(stage=3, enable_hybrid_engine=True, inference_tp_size=2, release_inference_cache=True,
                          pin_parameters=False, tp_gather_partition_size=4, max_out_tokens=256,
                          enable_tensorboard=True, tb_path="/tmp/tb", tb_name="step3_actor")
    assert config["hybrid_engine"] == {"enabled": True, "max_out_tokens": 256, "inference_tp_size": 2,
                                       "release_inference_cache": True, "pin_parameters": False,
                                       "tp_gather_partition_size": 4}
    assert config["tensorboard"] == {"enabled": True, "output_path": "/tmp/tb",
                                     "job_name": "step3_actor_tensorboard"}


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_offload(stage):
    zero = train_config(offload=True, stage=stage)["zero_optimization"]
    assert zero["offload_optimizer"] == {"device": "cpu"}
    assert ("offload_param" in zero) == (stage == 3)


def test_global_batch_size():
    assert global_batch_size(2, 4, 3) == 24


def test_param_groups_plain_model():
    model = tiny_opt()
    groups = get_optimizer_grouped_parameters(model, weight_decay=0.1)
    assert len(groups) == 2
    decay, no_decay = groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    n_params = len(list(model.parameters()))
    assert len(decay["params"]) + len(no_decay["params"]) == n_params
    # Per layer: 6 linear biases + 2 layer norms x (weight, bias) = 10; plus the final norm's 2.
    assert len(no_decay["params"]) == 2 * 10 + 2
    # Per layer: 6 linear weights; plus token and position embeddings (lm_head is tied).
    assert len(decay["params"]) == 2 * 6 + 2


def test_param_groups_lora_has_own_lr_and_frozen_params_are_left_out():
    model = convert_linear_layer_to_lora(tiny_opt(), "decoder.layers.", lora_dim=4)
    decay, lora, no_decay = get_optimizer_grouped_parameters(model, weight_decay=0.1, lora_learning_rate=5e-4)
    assert lora["lr"] == 5e-4 and lora["weight_decay"] == 0.1 and len(lora["params"]) == 2 * 6 * 2
    assert "lr" not in decay and len(decay["params"]) == 2  # embeddings; the converted weights are frozen
    assert len(no_decay["params"]) == 2 * 4 + 2  # norms only; the converted biases are frozen


def test_create_optimizer_and_scheduler_on_cpu():
    model = tiny_opt()
    groups = get_optimizer_grouped_parameters(model, weight_decay=0.1)
    optimizer = create_optimizer(groups, lr=1e-3, offload=False, device="cpu")
    assert type(optimizer) is torch.optim.AdamW and optimizer.defaults["betas"] == (0.9, 0.95)
    scheduler = create_lr_scheduler(optimizer, "linear", num_warmup_steps=2, num_training_steps=10)
    assert optimizer.param_groups[0]["lr"] == 0.0
    optimizer.step()
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(5e-4)


def test_unknown_scheduler_lists_valid_names():
    optimizer = torch.optim.AdamW(tiny_opt().parameters())
    with pytest.raises(UserInputError, match="cosine_with_restarts"):
        create_lr_scheduler(optimizer, "inverse_sqrt", 0, 10)


def test_deepspeed_zero2_step_on_cpu(distributed):
    model = convert_linear_layer_to_lora(tiny_opt(), "decoder.layers.", lora_dim=4)
    groups = get_optimizer_grouped_parameters(model, weight_decay=0.0, lora_learning_rate=1e-2)
    optimizer = create_optimizer(groups, lr=1e-3, offload=False, device="cpu")
    config = train_config(stage=2, train_batch_size=2, micro_batch_size=2, gradient_accumulation_steps=1)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    left = model.model.decoder.layers[0].fc1.lora_left_weight
    before = left.detach().clone()
    input_ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    loss = engine(input_ids=input_ids, labels=input_ids).loss
    engine.backward(loss)
    engine.step()
    assert torch.isfinite(loss) and not torch.equal(left.detach(), before)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_a_lone_rank_without_zero_skips_the_all_reduce_with_the_same_weights(distributed, dtype, monkeypatch):
    """engine.skip_lone_allreduce: one rank, ZeRO 0 -> DeepSpeed's all-reduce is off, and three steps give bit for bit
    the weights of an engine that all-reduces; ZeRO 1-2 and RLHF_LONE_RANK_NO_ALLREDUCE=0 keep it."""
    from training.utils.engine import skip_lone_allreduce

    def trained(skip: bool, stage: int = 0):
        model = tiny_opt()
        optimizer = create_optimizer(get_optimizer_grouped_parameters(model, weight_decay=0.1), lr=1e-2,
                                     offload=False, device="cpu")
        config = train_config(stage=stage, dtype=dtype, train_batch_size=2, micro_batch_size=2,
                              gradient_accumulation_steps=1)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        assert skip_lone_allreduce(engine) is (skip and stage == 0)
        assert engine.enable_backward_allreduce is not (skip and stage == 0)
        generator = torch.Generator().manual_seed(0)
        for _ in range(3):
            input_ids = torch.randint(0, 128, (2, 8), generator=generator)
            engine.backward(engine(input_ids=input_ids, labels=input_ids).loss)
            engine.step()
        return [p.detach().clone() for p in model.parameters()]

    skipped = trained(skip=True)
    monkeypatch.setenv("RLHF_LONE_RANK_NO_ALLREDUCE", "0")
    reduced = trained(skip=False)
    assert all(torch.equal(a, b) for a, b in zip(skipped, reduced))
    monkeypatch.delenv("RLHF_LONE_RANK_NO_ALLREDUCE")
    trained(skip=True, stage=1)
