"""Reward model: where the score sits under any padding, save/load round trips (LoRA fused), loading a
step-1 causal LM's body, and errors a user can act on. The pairwise losses are in test_losses.py."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModel

from conftest import write_pickle_only_model_dir

from training.utils.errors import UserInputError
from training.utils.lora import LoRALinear, convert_linear_layer_to_lora
from training.utils.model.build import create_hf_model
from training.utils.model.reward_model import (
    RewardModel,
    create_reward_model,
    is_reward_model_dir,
    load_reward_model,
    save_reward_model,
)
from training.utils.model.save import save_hf_format
from training.utils.tokenizer import load_tokenizer

EOS = 0  # the shipped tokenizer's EOS id; its pad is 1
LONG = [5, 17, 99, 300, 7, EOS]
SHORT = [8, 9, EOS]
STATS = {"mean": 0.25, "std": 1.5, "accuracy": 0.75}


def padded(rows: list[list[int]], pad_id: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids and mask built by hand (not with the collator), padding on either side."""
    length = max(map(len, rows))
    ids, mask = [], []
    for row in rows:
        pad = length - len(row)
        ids.append([pad_id] * pad + row if left else row + [pad_id] * pad)
        mask.append([0] * pad + [1] * len(row) if left else [1] * len(row) + [0] * pad)
    return torch.tensor(ids), torch.tensor(mask)


def run(model, ids, mask):
    with torch.no_grad():
        return model(ids, mask)


def end_scores(model, rows, pad_id=1, left=False):
    return run(model, *padded(rows, pad_id, left)).end_scores


def new_reward_model(name, tokenizer, seed=0):
    torch.manual_seed(seed)
    model = create_reward_model(name, tokenizer, dropout=0.0).eval()
    with torch.no_grad():
        model.v_head.weight.normal_()  # a trained-looking head, so a lost head would show
    return model


@pytest.mark.parametrize("name", ["tiny/opt", "tiny/llama"])
def test_score_is_the_same_for_right_left_padding_and_alone(tokenizer, name):
    model = new_reward_model(name, tokenizer)
    right = end_scores(model, [LONG, SHORT])
    left = end_scores(model, [LONG, SHORT], left=True)
    alone = torch.cat([end_scores(model, [LONG]), end_scores(model, [SHORT])])
    assert torch.allclose(right, left, atol=1e-5) and torch.allclose(right, alone, atol=1e-5)
    assert right.dtype == torch.float32 and right.shape == (2,)


def test_score_sits_at_the_eos_even_when_pad_is_eos(tokenizer):
    model = new_reward_model("tiny/opt", tokenizer)
    out = run(model, *padded([LONG, SHORT], pad_id=1))
    assert out.values.shape == (2, len(LONG))
    assert out.end_scores[0] == out.values[0, LONG.index(EOS)]
    assert out.end_scores[1] == out.values[1, SHORT.index(EOS)]
    # pad == EOS: the padded row ends in four EOS ids; the score must stay on the real one (index 2)
    ids, mask = padded([LONG, SHORT], pad_id=EOS)
    same_id = run(model, ids, mask)
    assert ids[1].tolist() == [8, 9, EOS, EOS, EOS, EOS]
    assert same_id.end_scores[1] == same_id.values[1, 2]
    assert torch.allclose(same_id.end_scores, out.end_scores, atol=1e-5)


FAMILY_CONFIGS = {
    "gpt2": {"n_embd": 32, "n_layer": 2, "n_head": 2, "vocab_size": 64, "n_positions": 64, "bos_token_id": 0,
             "eos_token_id": 0},
    "bloom": {"hidden_size": 32, "n_layer": 2, "n_head": 2, "vocab_size": 64},
    "qwen2": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
              "num_key_value_heads": 1, "vocab_size": 64},
    # word_embed_proj_dim != hidden_size: OPT's body ends with project_out to 16
    "opt": {"hidden_size": 32, "word_embed_proj_dim": 16, "ffn_dim": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "max_position_embeddings": 64, "vocab_size": 64},
}


@pytest.mark.parametrize("model_type,width", [("gpt2", 32), ("bloom", 32), ("qwen2", 32), ("opt", 16)])
def test_other_families_by_config(model_type, width):
    torch.manual_seed(0)
    model = RewardModel(AutoModel.from_config(AutoConfig.for_model(model_type, **FAMILY_CONFIGS[model_type]))).eval()
    assert model.v_head.in_features == width
    rows = [[5, 17, 9, 30, 7, EOS], [8, 9, EOS]]
    right, left = end_scores(model, rows), end_scores(model, rows, left=True)
    alone = torch.cat([end_scores(model, rows[:1]), end_scores(model, rows[1:])])
    assert torch.allclose(right, left, atol=1e-5) and torch.allclose(right, alone, atol=1e-5)


def test_save_and_load_round_trip(tmp_path, tokenizer):
    model = new_reward_model("tiny/opt", tokenizer)
    expected = end_scores(model, [LONG, SHORT])
    out = tmp_path / "rm"
    save_reward_model(model, tokenizer, str(out), reward_stats=STATS, extra_json={"training_args.json": {"lr": 1}})
    files = set(os.listdir(out))
    assert {"config.json", "model.safetensors", "value_head.safetensors", "reward_model.json", "tokenizer.json",
            "training_args.json"} <= files
    assert not any(f.endswith(".bin") for f in files) and is_reward_model_dir(str(out))
    meta = json.loads((out / "reward_model.json").read_text())
    assert meta == {"format": "rlhf-chat/reward-model", "version": 1, "score_position": "last_real_token",
                    "end_token": tokenizer.eos_token, "end_token_id": EOS, "value_head": {"in_features": 192},
                    "reward_stats": STATS}
    assert set(load_file(str(out / "value_head.safetensors"))) == {"v_head.weight"}

    reloaded, reloaded_tokenizer, reloaded_meta = load_reward_model(str(out))
    assert reloaded_meta == meta and reloaded_tokenizer.eos_token_id == EOS and reloaded_tokenizer.pad_token_id == 1
    assert torch.allclose(end_scores(reloaded.eval(), [LONG, SHORT]), expected, atol=1e-6)
    # step 3 builds its critic and reward model from the same directory
    assert torch.allclose(end_scores(create_reward_model(str(out), tokenizer).eval(), [LONG, SHORT]), expected,
                          atol=1e-6)
    # the backbone is a plain HF base model
    body, info = AutoModel.from_pretrained(out, local_files_only=True, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    live = model.backbone.state_dict()
    assert all(torch.equal(tensor, live[key]) for key, tensor in body.state_dict().items())


def test_lora_reward_model_saves_fused(tmp_path, tokenizer):
    model = convert_linear_layer_to_lora(new_reward_model("tiny/opt", tokenizer), "layers.", 4).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.lora_left_weight.normal_(std=0.05)
    expected = end_scores(model, [LONG, SHORT])
    save_reward_model(model, tokenizer, str(tmp_path / "rm"), reward_stats=STATS)
    assert not any("lora" in key for key in load_file(str(tmp_path / "rm" / "model.safetensors")))
    reloaded, _, _ = load_reward_model(str(tmp_path / "rm"))
    assert torch.allclose(end_scores(reloaded.eval(), [LONG, SHORT]), expected, atol=1e-5)
    assert any(isinstance(m, LoRALinear) and not m.fuse_lora for m in model.modules())  # live model untouched


@pytest.mark.parametrize("name", ["tiny/opt", "tiny/llama"])
def test_backbone_is_the_step1_causal_lms_body(tmp_path, tokenizer, name):
    torch.manual_seed(0)
    causal_lm = create_hf_model(name, tokenizer)
    save_hf_format(causal_lm, tokenizer, str(tmp_path / "sft"))
    torch.manual_seed(1)  # a different seed: a re-initialised weight could not match by chance
    model = create_reward_model(str(tmp_path / "sft"), tokenizer)
    body, backbone = causal_lm.base_model.state_dict(), model.backbone.state_dict()
    assert set(body) == set(backbone)
    assert all(torch.equal(body[key], backbone[key]) for key in body)


def test_errors_name_the_input(tmp_path, tokenizer):
    save_hf_format(create_hf_model("tiny/opt", tokenizer), tokenizer, str(tmp_path / "sft"))
    with pytest.raises(UserInputError, match="not a reward model directory .*--output_dir of step 2"):
        load_reward_model(str(tmp_path / "sft"))

    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"model_type": "nonexistent-arch"}))
    with pytest.raises(UserInputError, match="nonexistent-arch"):
        create_reward_model(str(unknown), tokenizer)
    (unknown / "config.json").write_text(json.dumps({"model_type": "trocr"}))  # a config, but no AutoModel
    with pytest.raises(UserInputError, match="model_type 'trocr' has no AutoModel"):
        create_reward_model(str(unknown), tokenizer)

    model = new_reward_model("tiny/opt", tokenizer)
    pickle_dir = write_pickle_only_model_dir(model, tmp_path / "pickle")
    with pytest.raises(UserInputError, match="pickle"):
        create_reward_model(str(pickle_dir), tokenizer)
    with pytest.raises(UserInputError, match="not a reward model directory.*pickle"):
        load_reward_model(str(pickle_dir))

    saved = tmp_path / "rm"
    save_reward_model(model, tokenizer, str(saved), reward_stats=STATS)
    os.replace(saved / "model.safetensors", saved / "pytorch_model.bin")  # a reward model with pickle weights
    with pytest.raises(UserInputError, match="pickle"):
        load_reward_model(str(saved))


def test_tokenizer_with_another_end_token_is_refused(tmp_path, tokenizer):
    save_reward_model(new_reward_model("tiny/opt", tokenizer), tokenizer, str(tmp_path / "rm"), reward_stats=STATS)
    other = load_tokenizer("tiny/opt", add_eot_token=True, eot_token="<|eot|>")
    with pytest.raises(UserInputError, match="scores at end token"):
        create_reward_model(str(tmp_path / "rm"), other)
