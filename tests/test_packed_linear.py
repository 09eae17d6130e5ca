"""model.packed_linear: inference passes of a bf16 model on CPU run nn.Linear on weights packed once for oneDNN, with
the same values as F.linear, only without gradients, only inside the block, and RLHF_PACKED_WEIGHTS=0 turns it off.
On a CPU without oneDNN bf16 kernels nothing is packed and the tests check that instead."""
import pytest
import torch
from torch import nn

from training.utils.errors import UserInputError
from training.utils.model import packed_linear
from training.utils.model.packed_linear import packed_linears

SUPPORTED = packed_linear._kernels_match()


def patched(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if "forward" in vars(module)]


@pytest.fixture(scope="module")
def bf16_model(tokenizer):
    from training.utils.model.build import create_hf_model

    torch.manual_seed(0)
    return create_hf_model("tiny/opt", tokenizer, dropout=0.0).to(torch.bfloat16).eval()


def batch(tokenizer):
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(10, 4000, (3, 17), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # a left-padded row
    return ids.masked_fill(mask == 0, tokenizer.pad_token_id), mask


def test_forward_and_sampled_generation_are_bitwise_those_of_f_linear(bf16_model, tokenizer):
    ids, mask = batch(tokenizer)
    linears = [n for n, m in bf16_model.named_modules() if type(m) is nn.Linear]
    with torch.no_grad():
        expected = bf16_model(input_ids=ids, attention_mask=mask).logits
        torch.manual_seed(5)
        expected_tokens = bf16_model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=True,
                                              pad_token_id=tokenizer.pad_token_id)
        with packed_linears(bf16_model, rows_hint=3):
            assert patched(bf16_model) == (linears if SUPPORTED else [])
            assert len(linears) >= 4 * 2 + 1  # q, k, v, out, fc1, fc2 per layer and the LM head
            logits = bf16_model(input_ids=ids, attention_mask=mask).logits
            torch.manual_seed(5)
            tokens = bf16_model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=True,
                                         pad_token_id=tokenizer.pad_token_id)
    assert patched(bf16_model) == []
    assert torch.equal(logits, expected) and torch.equal(tokens, expected_tokens)


@pytest.mark.skipif(not SUPPORTED, reason="this CPU has no oneDNN bf16 kernels: nothing is packed")
def test_packed_kernel_is_the_one_that_runs(bf16_model, tokenizer, monkeypatch):
    calls = []
    real = torch.ops.mkldnn._linear_pointwise

    def counting(*args):
        calls.append(args[3])
        return real(*args)

    monkeypatch.setattr(packed_linear.torch.ops.mkldnn, "_linear_pointwise", counting)
    ids, mask = batch(tokenizer)
    layers = bf16_model.model.decoder.layers
    activations = [layer.activation_fn for layer in layers]
    with torch.no_grad(), packed_linears(bf16_model):
        assert all(type(layer.activation_fn) is nn.Identity for layer in layers)  # the ReLU runs in fc1's call
        bf16_model(input_ids=ids, attention_mask=mask)
    assert len(calls) == len([m for m in bf16_model.modules() if type(m) is nn.Linear])
    assert calls.count("relu") == len(layers) and set(calls) == {"none", "relu"}
    assert all(layer.activation_fn is activation for layer, activation in zip(layers, activations))


def test_with_gradients_on_inside_the_block_the_plain_linear_runs_and_gradients_flow(bf16_model, tokenizer):
    ids, mask = batch(tokenizer)
    weight = bf16_model.get_output_embeddings().weight
    weight.grad = None
    with packed_linears(bf16_model):
        bf16_model(input_ids=ids, attention_mask=mask).logits.float().sum().backward()
    packed_grad, weight.grad = weight.grad, None
    bf16_model(input_ids=ids, attention_mask=mask).logits.float().sum().backward()
    assert packed_grad is not None and torch.equal(packed_grad, weight.grad)
    bf16_model.zero_grad(set_to_none=True)


def test_modules_are_restored_when_the_block_raises(bf16_model):
    with pytest.raises(KeyError), packed_linears(bf16_model):
        raise KeyError("inside")
    assert patched(bf16_model) == []
    assert all(type(layer.activation_fn) is nn.ReLU for layer in bf16_model.model.decoder.layers)


def test_left_alone_fp32_other_layer_types_and_partitioned_weights(tokenizer):
    from training.utils.lora import LoRALinear
    from training.utils.model.build import create_hf_model

    fp32 = create_hf_model("tiny/opt", tokenizer)
    with packed_linears(fp32):
        assert patched(fp32) == []

    class Subclass(nn.Linear):
        pass

    plain, sub = nn.Linear(8, 8).to(torch.bfloat16), Subclass(8, 8).to(torch.bfloat16)
    lora = LoRALinear(nn.Parameter(torch.randn(8, 8, dtype=torch.bfloat16)), None, lora_dim=2)
    partitioned = nn.Linear(8, 8).to(torch.bfloat16)
    partitioned.weight = nn.Parameter(torch.empty(0, dtype=torch.bfloat16))  # what ZeRO-3 leaves between gathers
    own = nn.Linear(8, 8).to(torch.bfloat16)
    own.forward = lambda x: x  # a forward someone else already replaced
    model = nn.ModuleDict({"plain": plain, "sub": sub, "lora": lora, "partitioned": partitioned, "own": own})
    with packed_linears(model):
        assert patched(model) == (["plain", "own"] if SUPPORTED else ["own"])
    assert patched(model) == ["own"]


@pytest.mark.parametrize("value", ["0", "off", "False"])
def test_environment_switch_turns_packing_off(bf16_model, monkeypatch, value):
    monkeypatch.setenv("RLHF_PACKED_WEIGHTS", value)
    with packed_linears(bf16_model):
        assert patched(bf16_model) == []


def test_bad_environment_value_is_one_clear_error(bf16_model, monkeypatch):
    monkeypatch.setenv("RLHF_PACKED_WEIGHTS", "fast")
    with pytest.raises(UserInputError, match="RLHF_PACKED_WEIGHTS='fast': use 1 .* or 0"), packed_linears(bf16_model):
        pass


def test_step3_experience_is_bitwise_the_same_with_packed_weights(tmp_path, distributed, tokenizer, monkeypatch):
    """generate_experience in bf16 (generation, the actor, reference, critic and reward passes) gives the same
    answers, log-probs, values, advantages and scores with packing on and off."""
    from training.step3_rlhf_finetuning.main import parse_args
    from training.utils import seeding
    from training.utils.data.collators import PromptCollator
    from training.utils.model.reward_model import create_reward_model, save_reward_model
    from training.utils.rlhf.engine import build_rlhf_engine
    from training.utils.rlhf.ppo_trainer import PPOTrainer

    save_reward_model(create_reward_model("tiny/opt", tokenizer), tokenizer, str(tmp_path / "reward"),
                      reward_stats={})
    config = parse_args(["--actor_model_name_or_path", "tiny/opt", "--critic_model_name_or_path",
                         str(tmp_path / "reward"), "--data_path", "synthetic/copy", "--output_dir",
                         str(tmp_path / "unused"), "--dtype", "bf16", "--max_answer_seq_len", "10",
                         "--per_device_generation_batch_size", "4", "--per_device_training_batch_size", "4",
                         "--separate_scoring_pass"])
    seeding.set_random_seed(0)
    trainer = PPOTrainer(build_rlhf_engine(config, tokenizer, torch.device("cpu"), 10, 10), config)
    generator = torch.Generator().manual_seed(0)
    prompts = PromptCollator(tokenizer.pad_token_id)(
        [{"prompt_ids": torch.randint(10, 4000, (n,), generator=generator).tolist()} for n in (6, 11, 3, 9)])
    real, calls = torch.ops.mkldnn._linear_pointwise, {}

    def counting(*args):
        calls[setting] = calls.get(setting, 0) + 1
        return real(*args)

    monkeypatch.setattr(packed_linear.torch.ops.mkldnn, "_linear_pointwise", counting)
    results = {}
    for setting in ("0", "1"):
        monkeypatch.setenv("RLHF_PACKED_WEIGHTS", setting)
        torch.manual_seed(7)
        experience, rollout = trainer.generate_experience(prompts)
        results[setting] = [experience.answer_ids, experience.log_probs, experience.values, experience.advantages,
                            rollout.scores]
    # every pass packed: generation (prompt + one call per new token) and the four scoring passes
    assert "0" not in calls and (calls.get("1", 0) > 4 * 9 if SUPPORTED else "1" not in calls)
    assert results["0"][1].abs().sum() > 0 and results["0"][2].abs().sum() > 0
    for off, on in zip(results["0"], results["1"]):
        assert torch.equal(off, on)


@pytest.mark.skipif(not SUPPORTED, reason="this CPU has no oneDNN bf16 kernels: nothing is packed")
def test_a_frozen_models_packed_weights_are_kept_until_a_weight_changes(tokenizer, monkeypatch):
    """A reference or reward model packs its weights once for the run; an in-place change (loading new weights)
    repacks that layer, and the values follow it; a trained model repacks at every block."""
    from training.utils.model.build import create_hf_model

    reorders = []
    real = torch.ops.mkldnn._reorder_linear_weight
    monkeypatch.setattr(packed_linear.torch.ops.mkldnn, "_reorder_linear_weight",
                        lambda *args: reorders.append(args[0].shape) or real(*args))
    torch.manual_seed(0)
    model = create_hf_model("tiny/opt", tokenizer, dropout=0.0).to(torch.bfloat16).eval()
    linears = len([m for m in model.modules() if type(m) is nn.Linear])
    ids, mask = batch(tokenizer)

    def packed_logits():
        with torch.no_grad(), packed_linears(model, rows_hint=3):
            return model(input_ids=ids, attention_mask=mask).logits

    packed_logits()
    packed_logits()
    assert len(reorders) == 2 * linears  # trained weights: packed at every block
    model.requires_grad_(False)
    first = packed_logits()
    assert torch.equal(packed_logits(), first) and len(reorders) == 3 * linears  # frozen: packed once
    fc1 = model.model.decoder.layers[0].fc1
    with torch.no_grad():
        fc1.weight.mul_(2.0)
        expected = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(packed_logits(), expected) and len(reorders) == 3 * linears + 1
