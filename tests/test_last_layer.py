"""model.last_layer: the last decoder layer computed after its attention only from a start position gives the full
forward's logits, values and gradients at the positions read, runs on fewer rows, and steps aside where it would
change something (dropout, activation checkpointing, RLHF_LAST_LAYER_SUFFIX=0)."""
import pytest
import torch
from torch import nn

from training.utils.errors import UserInputError
from training.utils.model import last_layer
from training.utils.model.last_layer import last_layer_from
from training.utils.model.logits import last_logits

FAMILIES = ["tiny/opt", "tiny/llama", "tiny/qwen2"]


def model_for(name, tokenizer, dtype=torch.float32, **config):
    from training.utils.model.build import create_hf_model

    torch.manual_seed(0)
    model = create_hf_model(name, tokenizer, dropout=0.0).to(dtype)
    for key, value in config.items():
        setattr(model.config, key, value)
        for layer in model.modules():
            if hasattr(layer, key):
                setattr(layer, key, value)
    return model


def rows(tokenizer, width=40, pads=(0, 5, 11)):
    generator = torch.Generator().manual_seed(2)
    ids = torch.randint(10, 4000, (len(pads), width), generator=generator)
    mask = torch.ones_like(ids)
    for row, pad in enumerate(pads):
        mask[row, :pad] = 0
    return ids.masked_fill(mask == 0, tokenizer.pad_token_id), mask


def mlp_rows(model) -> list[int]:
    """Rows each last-layer MLP call sees (a spy on its first linear layer)."""
    layer = last_layer._last_decoder_layer(model)
    first = layer.fc1 if hasattr(layer, "fc1") else layer.mlp.gate_proj
    seen = []
    first.register_forward_hook(lambda module, args, out: seen.append(args[0].reshape(-1, args[0].size(-1)).size(0)))
    return seen


@pytest.mark.parametrize("name", FAMILIES)
def test_logits_and_gradients_at_the_kept_positions_are_the_full_forwards(name, tokenizer):
    model = model_for(name, tokenizer)
    ids, mask = rows(tokenizer)
    seen = mlp_rows(model)
    count = 13  # the last 13 positions: the last layer's MLP runs on 3 x 13 rows

    def loss_and_grads(switch: str):
        import os

        os.environ["RLHF_LAST_LAYER_SUFFIX"] = switch
        try:
            model.zero_grad(set_to_none=True)
            logits = last_logits(model, count, input_ids=ids, attention_mask=mask, use_cache=False)
            (logits.log_softmax(-1)[..., :7].sum()).backward()
            return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        finally:
            del os.environ["RLHF_LAST_LAYER_SUFFIX"]

    suffix_logits, suffix_grads = loss_and_grads("1")
    assert seen == [3 * count]
    seen.clear()
    full_logits, full_grads = loss_and_grads("0")
    assert seen == [3 * 40]
    torch.testing.assert_close(suffix_logits, full_logits, atol=1e-5, rtol=1e-5)
    assert suffix_grads.keys() == full_grads.keys()
    for key in full_grads:
        torch.testing.assert_close(suffix_grads[key], full_grads[key], atol=1e-5, rtol=1e-5, msg=key)
    assert "forward" not in vars(last_layer._last_decoder_layer(model))  # the class's own again


def test_post_norm_opt_and_bf16_give_the_full_logits(tokenizer):
    """OPT-350m's layout (norms after the residual) in fp32; and bf16, where fewer matmul rows change no bit here."""
    for dtype, config in ((torch.float32, {"do_layer_norm_before": False}), (torch.bfloat16, {})):
        model = model_for("tiny/opt", tokenizer, dtype, **config).eval()
        ids, mask = rows(tokenizer)
        with torch.no_grad():
            full = model(input_ids=ids, attention_mask=mask).logits[:, -9:]
            kept = last_logits(model, 9, input_ids=ids, attention_mask=mask)
        if dtype == torch.float32:
            torch.testing.assert_close(kept, full, atol=1e-5, rtol=1e-5)
        else:
            assert torch.equal(kept, full)


def test_critic_values_and_reward_scores_match_the_full_forward(tokenizer):
    from training.utils.model.reward_model import create_reward_model
    from training.utils.rlhf.ppo_trainer import PPOTrainer

    torch.manual_seed(0)
    critic = create_reward_model("tiny/opt", tokenizer, dropout=0.0).eval()
    ids, mask = rows(tokenizer)
    seen = mlp_rows(critic)
    with torch.no_grad():
        values = PPOTrainer._action_values(critic, ids, mask, prompt_width=25)
        assert seen == [3 * (40 - 24)]
        full = critic(input_ids=ids, attention_mask=mask)
        with last_layer_from(critic, 39):
            ends = critic(input_ids=ids, attention_mask=mask).end_scores
    torch.testing.assert_close(values, full.values[:, 24:-1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ends, full.end_scores, atol=1e-5, rtol=1e-5)


def test_full_forward_where_the_suffix_would_change_something(tokenizer, monkeypatch):
    ids, mask = rows(tokenizer)
    # Dropout after OPT's attention in training mode: its mask would cover fewer positions.
    model = model_for("tiny/opt", tokenizer, dropout=0.1).train()
    seen = mlp_rows(model)
    with last_layer_from(model, 30):
        model(input_ids=ids, attention_mask=mask)
    assert seen == [3 * 40]
    # Activation checkpointing: the recomputation runs the layer's own forward.
    model = model_for("tiny/llama", tokenizer)
    model.gradient_checkpointing_enable()
    model.train()
    seen = mlp_rows(model)
    with last_layer_from(model, 30):
        model(input_ids=ids, attention_mask=mask).logits.sum().backward()
    assert seen[0] == 3 * 40
    # Start 0, and the switch off.
    model = model_for("tiny/qwen2", tokenizer).eval()
    seen = mlp_rows(model)
    with torch.no_grad():
        with last_layer_from(model, 0):
            model(input_ids=ids, attention_mask=mask)
        monkeypatch.setenv("RLHF_LAST_LAYER_SUFFIX", "off")
        with last_layer_from(model, 30):
            model(input_ids=ids, attention_mask=mask)
    assert seen == [3 * 40, 3 * 40]
    monkeypatch.setenv("RLHF_LAST_LAYER_SUFFIX", "sometimes")
    with pytest.raises(UserInputError, match="RLHF_LAST_LAYER_SUFFIX='sometimes'"), last_layer_from(model, 30):
        pass


def test_the_layer_is_restored_when_the_block_raises_and_other_models_are_left_alone(tokenizer):
    model = model_for("tiny/opt", tokenizer)
    layer = last_layer._last_decoder_layer(model)
    with pytest.raises(KeyError), last_layer_from(model, 5):
        assert "forward" in vars(layer)
        raise KeyError("inside")
    assert "forward" not in vars(layer)
    plain = nn.Sequential(nn.Linear(4, 4))
    with last_layer_from(plain, 2):
        assert not any("forward" in vars(module) for module in plain.modules())
